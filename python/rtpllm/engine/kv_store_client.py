"""The shared KV store as a tier of this engine (`kv_store="HOST:PORT"`): a C++ RemoteStoreTier
over the UCX transfer engine, chained after host and disk by the tiered connector.

The tier answers match() from its local view of the store's index (kept current by the store),
so the step loop never waits on the network; loads and saves run on its own thread. A store
that is down at start is retried in the background (the engine serves, recomputing); one that
refuses this instance (another model, dtype, block size or KV layout) is a ValueError here.
"""

from __future__ import annotations

import os
from typing import Optional

from rtpllm import _C
from rtpllm.config import CacheConfig

# A PIN or RESERVE reply slower than this means the store is gone (it then counts as a miss).
_REQUEST_TIMEOUT_S = 2.0


def remote_store_tier(cache: CacheConfig, layout: "_C.KVLayout", root_hash: int,
                      stream: Optional[int], first_kv_head: int = 0) -> "_C.RemoteStoreTier":
    """`first_kv_head`: tensor parallelism, the first of the model's KV heads this rank's pool holds;
    the store keeps each rank's share of a block under a key of its own (RemoteStoreOptions.key_salt)."""
    if not getattr(_C, "has_kvstore_remote", False):
        raise ValueError("kv_store: this rtpllm build has no UCX transfer engine (pip install libucx-cu13, "
                         "then reinstall rtpllm)")
    host, _, port = cache.kv_store.rpartition(":")
    on_cuda = layout.memory == _C.MemoryKind.CUDA
    try:
        return _C.RemoteStoreTier(
            layout, host=host, port=int(port), identity=root_hash, name=f"rtpllm-{os.getpid()}",
            request_timeout_s=min(_REQUEST_TIMEOUT_S, cache.kv_load_timeout_s),
            cuda_device=layout.device_index if on_cuda else None, stream=stream if on_cuda else None,
            key_salt=first_kv_head)
    except RuntimeError as e:  # the store refused this instance
        raise ValueError(f"kv_store: {e}") from None
