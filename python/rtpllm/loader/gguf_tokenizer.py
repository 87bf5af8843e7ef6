"""The tokenizer of a GGUF file, converted once and then cached on disk.

Building a fast tokenizer from GGUF metadata means parsing the whole vocabulary out of the file
and converting it (transformers' GGUF support): over ten seconds for a 49k-token vocabulary on a
small machine, every start. The converted tokenizer is saved under the cache folder, keyed by
the file's path, size and modification time (and the transformers version), so later starts load it in well under a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)


def cache_root() -> str:
    """$RTPLLM_CACHE_DIR, else ~/.cache/rtpllm."""
    return os.environ.get("RTPLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rtpllm")


def _cache_dir(path: str) -> str:
    import transformers

    stat = os.stat(path)
    # A new transformers may convert differently: its version is part of the key.
    key = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    return os.path.join(cache_root(), "gguf-tokenizers", hashlib.sha256(key.encode()).hexdigest()[:24])


def load_gguf_tokenizer(path: str):
    """The tokenizer and chat template stored in the GGUF metadata of `path`."""
    from transformers import AutoTokenizer  # imported here: a thread loads the tokenizer at start-up

    cached = _cache_dir(path)
    if os.path.isdir(cached):
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception as e:  # a damaged cache entry is rebuilt, never fatal
            logger.warning("ignoring the unreadable tokenizer cache %s (%s)", cached, e)
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                              gguf_file=os.path.basename(path))
    _save(tokenizer, cached)
    return tokenizer


def _save(tokenizer, cached: str) -> None:
    """Writes the entry into a temporary folder first, so a concurrent reader never sees half of it."""
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(cached))
        tokenizer.save_pretrained(staging)
        os.replace(staging, cached)
    except OSError as e:
        logger.info("not caching the GGUF tokenizer (%s)", e)
