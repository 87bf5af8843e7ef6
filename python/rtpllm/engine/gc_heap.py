"""Keeps Python's cyclic garbage collector off the objects that live as long as the process.

Importing torch and transformers and loading a model leaves millions of long-lived objects. Every
full collection walks all of them, and a step that allocates a few thousand small objects (per
request outputs, deltas, detokenizer state) triggers collections all the time: on the 2-core
development machine that was ~6 us of every streamed token in the server's decode of the engine's
outputs. Freezing the heap after start-up moves those objects out of the collector's view (vLLM
freezes its heap after start-up the same way); later garbage is still collected as usual.

Only processes that keep one engine for their whole life freeze (the engine process, the server,
the bench commands): a frozen object caught in a reference cycle is never freed, so a library
call such as `LLM(...)` must not freeze its caller's heap.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collects what start-up left behind, then exempts every surviving object from later
    collections. Call once the long-lived state (model, tokenizer, app) exists."""
    gc.collect()
    gc.freeze()
