"""`LazyTokenizer`: a model's tokenizer that loads on a thread of its own, when asked to.

The engine starts it beside the weights when it will need the tokenizer at once (offline: string
prompts, detokenizing), or only on first need in the engine process, whose server tokenizes and
detokenizes for it and loads its own copy: there the engine needs a tokenizer only for stop
strings (text must be checked where the sequence is stopped) and for string prompts sent through
`ProcessEngine`'s Python API. Building a Llama-3-sized tokenizer with transformers takes seconds
of Python (imports, `AutoConfig`, the tokenizer), all of it holding the GIL that the engine's
start-up also needs.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

from rtpllm.loader.tokenizer_loader import load_tokenizer


class LazyTokenizer:
    """`get()` returns the tokenizer of `path` (a folder or a .gguf file, as `load_tokenizer`
    takes), loading it first if nobody started it; a failed load raises its error on every `get()`."""

    def __init__(self, path: str):
        self.path = path
        self.seconds: Optional[float] = None  # the load's time, once it has ended
        # What the load was made of, once it has ended: its imports, reading the files, and the
        # CPU time of its thread (far below `seconds` when other threads held the GIL meanwhile).
        self.parts: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._done = threading.Event()
        self._tokenizer: Any = None
        self._error: Optional[BaseException] = None

    def start(self) -> None:
        """Starts the load on a thread (at most once)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="rtpllm-tokenizer", daemon=True)
                self._thread.start()

    @property
    def loaded(self) -> bool:
        """True once the load has ended (`get()` then returns, or raises, at once)."""
        return self._done.is_set()

    def get(self) -> Any:
        self.start()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._tokenizer

    def _load(self) -> None:
        start, cpu_start = time.perf_counter(), time.thread_time()
        parts: list[tuple[str, float]] = []
        try:
            self._tokenizer = load_tokenizer(self.path, parts)
        except BaseException as exc:  # noqa: BLE001 - raised by every get()
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - start
            self.parts = parts + [("thread CPU", time.thread_time() - cpu_start)]
            self._done.set()
