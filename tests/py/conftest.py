import os
import sys

# Tests import the shared checkpoint builders in this folder as plain modules.
sys.path.insert(0, os.path.dirname(__file__))

# Tests convert GGUF tokenizers of throwaway files: keep their cache out of the user's home.
import tempfile  # noqa: E402

os.environ.setdefault("RTPLLM_CACHE_DIR", tempfile.mkdtemp(prefix="rtpllm-test-cache-"))
