import os
import sys

# Tests import the shared checkpoint builders in this folder as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
