"""An ASGI middleware that sends the generation endpoints straight to their handlers.

FastAPI runs every request through its middleware stack (telemetry, body limit, exception
middleware, exit stack), the router and the dependency solver, and wraps `send` twice, so every
streamed chunk passes through two extra wrappers. For POST /v1/completions and
/v1/chat/completions none of it does anything (the handlers parse their own bodies and answer
every error themselves), yet it cost about 0.1 ms per request and a few microseconds per chunk of
the event loop's time, which the step thread then waits for (the GIL). Added with
`app.add_middleware`, this sits inside Starlette's ServerErrorMiddleware (the last-resort 500) and
before everything else; other paths and methods, and apps mounted under a root path, go on to
FastAPI unchanged.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    def __init__(self, app: ASGIApp, post_routes: dict[str, Handler]):
        self.app = app
        self.post_routes = post_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            handler = self.post_routes.get(scope["path"])
            if handler is not None:
                response = await handler(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
