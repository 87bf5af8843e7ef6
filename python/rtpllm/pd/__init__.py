"""Prefill-decode disaggregation: the instance roles' side of the hand-off (see protocol.py)."""
