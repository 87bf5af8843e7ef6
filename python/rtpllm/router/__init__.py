"""`rtpllm router`: one OpenAI endpoint in front of several instances, choosing for each request
the instance that already caches most of its prefix and has room for it (see docs/architecture.md)."""

from rtpllm.router.config import RouterConfig

__all__ = ["RouterConfig"]
