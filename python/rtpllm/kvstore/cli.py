"""`rtpllm kvstore serve`: a process that holds KV blocks by block hash in host memory (and,
with --disk-dir, on disk behind it) and serves them to every engine started with
`--kv-store HOST:PORT`, so that one instance finds a prefix another one computed.

Python only parses options, starts the C++ KVStoreServer and reports; the store protocol and the
KV bytes never pass through Python. The store takes its cache identity (model, dtype, block
size, KV layout) and block shape from its first client, or the identity from --identity; a
client that does not match is refused with the reason, on both sides. It stops on SIGINT or
SIGTERM. Its counters are on GET /metrics (Prometheus, kvstore/metrics.py) at --metrics-port.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from rtpllm.kvstore.metrics import MetricsServer

logger = logging.getLogger("rtpllm.kvstore")


def add_kvstore_parser(subparsers) -> None:
    parser = subparsers.add_parser("kvstore", help="Run a shared KV store for several instances.")
    commands = parser.add_subparsers(dest="kvstore_command", required=True, metavar="{serve}")
    serve = commands.add_parser("serve", help="Hold KV blocks by hash and serve them over the transfer engine.")
    serve.add_argument("--capacity-gib", type=float, required=True, help="Host memory for KV blocks, in GiB.")
    serve.add_argument("--disk-dir", default=None,
                       help="A directory for a disk tier behind the memory (kept across restarts).")
    serve.add_argument("--disk-capacity-gib", type=float, default=64.0, help="Size cap of the disk tier, in GiB.")
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on (also the transfer engine's).")
    serve.add_argument("--port", type=int, default=8200, help="Store protocol port (0: any free port).")
    serve.add_argument("--identity", default=None, metavar="HEX",
                       help="Accept only clients of this cache identity (hex, as logged by the store and the "
                            "engine); default: the first client's.")
    serve.add_argument("--transfer-timeout-s", type=float, default=10.0,
                       help="Bound on one client transfer; a vanished client's slots are kept twice as long.")
    serve.add_argument("--pin-lease-s", type=float, default=300.0,
                       help="A client's pin (a load in progress) is dropped after this long even if the client "
                            "never releases it (counted on /metrics); must exceed --transfer-timeout-s.")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="Port of the Prometheus /metrics endpoint (default: --port + 1, or any free port "
                            "with --port 0).")
    serve.add_argument("--max-blocks-per-request", type=int, default=4096)
    serve.add_argument("--stats-interval-s", type=float, default=60.0,
                       help="Log the store's counters this often (0: never).")
    serve.set_defaults(handler=serve_main)


def _parse_identity(text: str | None) -> int:
    if text is None:
        return 0
    try:
        value = int(text, 16)
    except ValueError:
        raise ValueError(f"--identity: must be a hexadecimal cache identity, got {text!r}") from None
    if not 0 < value < 2**64:
        raise ValueError(f"--identity: must be a non-zero 64-bit value, got {text!r}")
    return value


def serve_main(args) -> int:
    from rtpllm import _C

    if args.capacity_gib <= 0:
        raise ValueError(f"--capacity-gib: must be positive, got {args.capacity_gib}")
    if args.disk_dir is not None and args.disk_capacity_gib <= 0:
        raise ValueError(f"--disk-capacity-gib: must be positive, got {args.disk_capacity_gib}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port: must be in [0, 65535], got {args.port}")
    metrics_port = (args.port + 1 if args.port else 0) if args.metrics_port is None else args.metrics_port
    if not 0 <= metrics_port < 65536:
        raise ValueError(f"--metrics-port: must be in [0, 65535], got {metrics_port}")
    if not args.pin_lease_s > args.transfer_timeout_s:
        raise ValueError(f"--pin-lease-s: must exceed --transfer-timeout-s ({args.transfer_timeout_s:g}), "
                         f"got {args.pin_lease_s:g}")
    if not getattr(_C, "has_kvstore_remote", False):
        raise ValueError("this rtpllm build has no UCX transfer engine (pip install libucx-cu13, then reinstall)")
    try:
        server = _C.KVStoreServer(
            host=args.host, port=args.port, capacity_bytes=int(args.capacity_gib * 2**30),
            disk_dir=os.path.expanduser(args.disk_dir) if args.disk_dir else "",
            disk_capacity_bytes=int(args.disk_capacity_gib * 2**30), identity=_parse_identity(args.identity),
            transfer_timeout_s=args.transfer_timeout_s, pin_lease_s=args.pin_lease_s,
            max_blocks_per_request=args.max_blocks_per_request)
    except RuntimeError as e:  # the address is taken, the directory unusable
        raise ValueError(f"kvstore serve: {e}") from None
    try:
        metrics = MetricsServer(server.stats, args.host, metrics_port)
    except OSError as e:
        raise ValueError(f"--metrics-port: cannot listen on {args.host}:{metrics_port}: {e}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # One parseable line: tests and scripts wait for it.
    print(f"rtpllm kvstore: listening on {args.host}:{server.port}", flush=True)
    print(f"rtpllm kvstore: metrics on http://{args.host}:{metrics.port}/metrics", flush=True)
    interval = args.stats_interval_s if args.stats_interval_s > 0 else None
    while not stop.wait(interval):
        _log_stats(server.stats())
    _log_stats(server.stats())
    metrics.close()
    server.flush_disk()
    del server
    return 0


def _log_stats(s) -> None:
    logger.info("identity %016x, %d/%d blocks (%d pinned, %d on disk), %d clients; pins %d (%d blocks, %d misses), "
                "saved %d, evicted %d, expired pins %d, refused clients %d, bad requests %d", s.identity, s.used_blocks,
                s.capacity_blocks, s.pinned_blocks, s.disk_blocks, s.clients, s.pin_requests, s.pinned_hits,
                s.pin_misses, s.saved_blocks, s.evicted_blocks, s.expired_pins, s.refused_clients, s.bad_requests)
