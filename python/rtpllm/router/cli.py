"""`rtpllm router`: its command-line options (serving/cli.py registers the subcommand)."""

from __future__ import annotations

import argparse
import os

from rtpllm.router.config import POLICIES, RouterConfig


def add_router_parser(subparsers) -> None:
    p = subparsers.add_parser("router", help="Route OpenAI requests across instances by cache hit and load "
                                             "(colocated, or prefill and decode pools).")
    p.add_argument("--backend", action="append", default=[], metavar="URL",
                   help="A colocated instance (`rtpllm serve`); repeat for each.")
    p.add_argument("--prefill", nargs="+", action="extend", default=[], metavar="URL",
                   help="Prefill instances (`rtpllm serve --role prefill`); with --decode, instead of --backend.")
    p.add_argument("--decode", nargs="+", action="extend", default=[], metavar="URL",
                   help="Decode instances (`rtpllm serve --role decode`); with --prefill, instead of --backend.")
    p.add_argument("--pd-retry", action="store_true",
                   help="A failed prefill (5xx, connection, timeout) is tried once more on another prefill "
                        "instance, into the same decode reservation, before the client gets the error.")
    p.add_argument("--no-pd-overlap", dest="pd_overlap", action="store_false",
                   help="Send the prefill request only once decode reserved the KV blocks, instead of both at once "
                        "(the reservation following the prefill request).")
    p.add_argument("--pd-reserve-timeout", type=float, default=30.0,
                   help="Seconds a decode instance has to reserve KV blocks (then another is tried).")
    p.add_argument("--pd-prefill-timeout", type=float, default=30.0,
                   help="Seconds a prefill instance has to answer (KV written), and decode then to send output "
                        "(keep it below the decode instances' --pd-timeout-s for --pd-retry to have time).")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="Seconds to connect to an instance.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--policy", default="cache_aware", choices=POLICIES)
    p.add_argument("--cache-weight", type=float, default=1.0,
                   help="cache_aware: weight of the prompt tokens an instance would have to compute.")
    p.add_argument("--load-weight", type=float, default=1.0,
                   help="cache_aware: weight of the work already queued on an instance.")
    p.add_argument("--decode-weight", type=float, default=16.0,
                   help="cache_aware: prompt tokens one running request's decoding counts as.")
    p.add_argument("--host-hit-weight", type=float, default=0.8,
                   help="cache_aware: a prompt block in an instance's host tier, as a fraction of a device hit.")
    p.add_argument("--disk-hit-weight", type=float, default=0.5,
                   help="cache_aware: a prompt block in an instance's disk tier, as a fraction of a device hit.")
    p.add_argument("--long-prompt-threshold", type=int, default=2048,
                   help="Prompts over this many tokens take the long lane (0: no lanes).")
    p.add_argument("--long-lane", action="append", default=[], metavar="URL",
                   help="A backend (or prefill instance) reserved for long prompts (repeat); without any, each "
                        "takes at most --max-long-per-instance long prefills and one instance stays free of them.")
    p.add_argument("--max-long-per-instance", type=int, default=1)
    p.add_argument("--tokenizer", default=None,
                   help="Tokenizer folder or .gguf (default: the model path the instances report).")
    p.add_argument("--max-retries", type=int, default=2,
                   help="Other instances tried after a 503 or connection failure before the first token.")
    p.add_argument("--health-interval", type=float, default=1.0)
    p.add_argument("--api-key", default=None, help="Clients must send it (default: $RTPLLM_API_KEY).")
    p.add_argument("--backend-api-key", default=None, help="What the router sends to the instances.")
    p.add_argument("--max-request-bytes", "--max-request-body-bytes", dest="max_request_bytes", type=int,
                   default=16 << 20, help="Larger request bodies get a 413 (checked while reading).")
    p.add_argument("--allowed-hosts", default="",
                   help="Comma-separated Host header values to accept besides the bind address (and localhost "
                        "when bound to loopback), as `rtpllm serve --allowed-hosts`; '*': any.")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))
    p.set_defaults(handler=run_from_args)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig.from_env(
        backends=tuple(args.backend), prefill=tuple(args.prefill), decode=tuple(args.decode),
        policy=args.policy, cache_weight=args.cache_weight, load_weight=args.load_weight,
        decode_weight=args.decode_weight, host_hit_weight=args.host_hit_weight,
        disk_hit_weight=args.disk_hit_weight,
        long_prompt_threshold=args.long_prompt_threshold or None, long_lane=tuple(args.long_lane),
        max_long_per_instance=args.max_long_per_instance, tokenizer=args.tokenizer, max_retries=args.max_retries,
        health_interval_s=args.health_interval, api_key=args.api_key, pd_retry=args.pd_retry, pd_overlap=args.pd_overlap,
        pd_reserve_timeout_s=args.pd_reserve_timeout, pd_prefill_timeout_s=args.pd_prefill_timeout,
        connect_timeout_s=args.connect_timeout,
        backend_api_key=args.backend_api_key or os.environ.get("RTPLLM_BACKEND_API_KEY"),
        max_request_bytes=args.max_request_bytes,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        host=args.host, port=args.port)


def run_from_args(args: argparse.Namespace) -> int:
    from rtpllm.router.app import run_router

    run_router(config_from_args(args), log_level=args.uvicorn_log_level)
    return 0
