"""How `rtpllm serve` runs: the server's own options (the engine's live in config.py).

    options = ServerOptions(port=8000, api_key="sk-...")
    run_server(engine_config, options)

`add_server_args` adds the flags of the server's limits and access control to `rtpllm serve`;
`server_option_kwargs` reads them back. docs/security.md explains what each one guards against.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Optional

API_KEY_ENV = "RTPLLM_API_KEY"
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    # In-flight requests get this long to finish after SIGINT/SIGTERM; the rest end with an error.
    shutdown_timeout_s: float = 30.0
    access_log: bool = True
    log_level: str = "info"
    # Stream a chunk per this many new tokens (the first token always goes out at once).
    stream_interval: int = 1
    # uvicorn's HTTP parser ("auto": httptools when installed, else h11) and event loop ("auto":
    # uvloop when installed, else asyncio).
    http: str = "auto"
    loop: str = "auto"
    # Step the engine in a process of its own (default), or in a thread of the server's process.
    engine_process: bool = True

    # ---- access control
    # Requests must carry `Authorization: Bearer <api_key>` (except to `public_paths`).
    api_key: Optional[str] = None
    public_paths: tuple[str, ...] = ("/health", "/metrics")
    # Host header values accepted besides the bind address (and the loopback names when bound to
    # loopback). Empty and bound to every interface: any Host (docs/security.md says why).
    allowed_hosts: tuple[str, ...] = ()
    # Render chat templates that requests bring (`chat_template`); off: such requests get a 400.
    trust_request_chat_template: bool = False
    # Serve /docs, /redoc and /openapi.json.
    enable_docs: bool = False

    # ---- limits
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    # A connection must send a request's headers within this long, and its body within the next.
    header_read_timeout_s: float = 20.0
    body_read_timeout_s: float = 60.0
    # An idle keep-alive connection is closed after this long.
    keep_alive_timeout_s: float = 30.0
    # Open connections beyond this get uvicorn's 503 (None: no cap).
    max_connections: Optional[int] = 2048

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "header_read_timeout_s", "body_read_timeout_s",
                     "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout_s: must be >= 0, got {self.shutdown_timeout_s}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections: must be at least 1, got {self.max_connections}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key: must not be empty")


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of the server's access control and limits (`rtpllm serve`)."""
    defaults = ServerOptions()
    access = parser.add_argument_group("access control (docs/security.md)")
    access.add_argument("--api-key", default=None,
                        help=f"Require `Authorization: Bearer KEY` on every request but the public paths "
                             f"(default: ${API_KEY_ENV}, else no key).")
    access.add_argument("--public-paths", nargs="*", default=list(defaults.public_paths), metavar="PATH",
                        help="Paths served without the API key (default: /health /metrics; none when given "
                             "without paths).")
    access.add_argument("--allowed-hosts", nargs="+", default=[], metavar="HOST",
                        help="Host header values to accept besides the bind address (and localhost when bound "
                             "to loopback); `*.example.com` matches subdomains, `*` any host. Default when bound "
                             "to 0.0.0.0 or ::: any host.")
    access.add_argument("--trust-request-chat-template", action="store_true",
                        help="Render chat templates that requests bring (`chat_template`); without it they get "
                             "a 400.")
    access.add_argument("--enable-docs", action="store_true", help="Serve /docs, /redoc and /openapi.json.")
    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max-request-body-bytes", type=int, default=defaults.max_request_body_bytes,
                        help="Larger request bodies get a 413 (checked while reading).")
    limits.add_argument("--header-read-timeout", type=float, default=defaults.header_read_timeout_s,
                        help="Seconds a connection gets to send a request's headers before it is closed.")
    limits.add_argument("--body-read-timeout", type=float, default=defaults.body_read_timeout_s,
                        help="Seconds a request gets to send its body before it gets a 408.")
    limits.add_argument("--keep-alive-timeout", type=float, default=defaults.keep_alive_timeout_s,
                        help="Seconds an idle keep-alive connection stays open.")
    limits.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="Open connections beyond this get a 503 at once.")
    return parser


def server_option_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `add_server_args` flags as ServerOptions keyword arguments."""
    return dict(
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None,
        public_paths=tuple(args.public_paths), allowed_hosts=tuple(args.allowed_hosts),
        trust_request_chat_template=args.trust_request_chat_template, enable_docs=args.enable_docs,
        max_request_body_bytes=args.max_request_body_bytes, header_read_timeout_s=args.header_read_timeout,
        body_read_timeout_s=args.body_read_timeout, keep_alive_timeout_s=args.keep_alive_timeout,
        max_connections=args.max_connections)
