"""The `rtpllm` command.

    rtpllm serve [--model PATH] [--host H] [--port P] [engine options]
    rtpllm generate [--model PATH] [--max-tokens N] [engine options] "prompt"
    rtpllm bench serve      --base-url http://127.0.0.1:8000 --dataset-name random ...
    rtpllm bench throughput [--model PATH] --dataset-name random ...
    rtpllm bench latency    [--model PATH] --input-len 32 --output-len 128 --batch-size 8
    rtpllm router --backend URL [--backend URL ...] [--policy cache_aware|round_robin|least_loaded]
    rtpllm kvstore serve --capacity-gib N [--disk-dir D] [--host H] [--port P]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from rtpllm.kvstore.cli import add_kvstore_parser
from rtpllm.router.cli import add_router_parser
from rtpllm.serving.engine_args import add_engine_args, engine_config_from_args, engine_kwargs_from_args
from rtpllm.serving.server_options import add_server_args, server_option_kwargs


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="Run the OpenAI-compatible HTTP server.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for all).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="Seconds in-flight requests get to finish after SIGINT/SIGTERM before they end with an error.")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="Tokens per streamed chunk after the first; > 1 trades smoothness for throughput.")
    parser.add_argument("--disable-uvicorn-access-log", action="store_true",
                        help="Do not log a line per HTTP request (recommended for load tests).")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug", "trace"))
    parser.add_argument("--http", default="auto", choices=("auto", "httptools", "h11"),
                        help="HTTP/1.1 parser (auto: httptools when installed, else h11).")
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"),
                        help="Event loop (auto: uvloop when installed, else asyncio).")
    parser.add_argument("--no-engine-process", action="store_true",
                        help="Step the engine in a thread of the server's process instead of a process of its own "
                             "(they then share one GIL).")
    add_server_args(parser)
    add_engine_args(parser)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from rtpllm.engine.startup_phases import StartupPhases, since_process_start

    startup = StartupPhases("server")
    startup.add("python start and imports", since_process_start() or 0.0)
    config = engine_config_from_args(args)
    launch = None
    if not args.no_engine_process:
        # The engine process loads the model while this one imports the HTTP stack.
        from rtpllm.engine.link.process_engine import ProcessEngine

        launch = ProcessEngine.launch(config)
    try:
        with startup.phase("server imports"):
            from rtpllm.serving.openai_server import ServerOptions, run_server
    except BaseException:
        if launch is not None:
            launch.kill()
        raise

    options = ServerOptions(host=args.host, port=args.port, shutdown_timeout_s=args.shutdown_timeout,
                            access_log=not args.disable_uvicorn_access_log, log_level=args.uvicorn_log_level,
                            stream_interval=args.stream_interval, http=args.http, loop=args.loop,
                            engine_process=not args.no_engine_process, **server_option_kwargs(args))
    run_server(config, options, launch, startup)
    return 0


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="Answer one prompt and print the answer.")
    parser.add_argument("prompt", help="The prompt (a user message when the model has a chat template).")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy.")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--no-chat-template", action="store_true",
                        help="Send the prompt as raw text even when the tokenizer has a chat template.")
    add_engine_args(parser)
    parser.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from rtpllm.engine.llm import LLM
    from rtpllm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k)
    llm = LLM(model=args.model, **engine_kwargs_from_args(args))
    if not args.no_chat_template and getattr(llm.get_tokenizer(), "chat_template", None):
        output = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        output = llm.generate([args.prompt], params)[0]
    print(output.outputs[0].text)
    return 0


def _add_bench(subparsers) -> None:
    from rtpllm.benchmarks import latency, serve, throughput

    parser = subparsers.add_parser("bench", help="Benchmark a server (serve) or the engine (throughput, latency).")
    bench = parser.add_subparsers(dest="bench_command", required=True, metavar="{serve,throughput,latency}")
    serve_parser = bench.add_parser("serve", help="Load-test an OpenAI-compatible server over HTTP.")
    serve.add_cli_args(serve_parser)
    serve_parser.set_defaults(handler=serve.main)
    throughput_parser = bench.add_parser("throughput", help="Offline throughput: all prompts at once through LLM.")
    throughput.add_cli_args(throughput_parser)
    throughput_parser.set_defaults(handler=throughput.main)
    latency_parser = bench.add_parser("latency", help="Latency of one fixed batch, over repeated iterations.")
    latency.add_cli_args(latency_parser)
    latency_parser.set_defaults(handler=latency.main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpllm", description="rtp-llm: serve, run and benchmark LLMs.")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate,bench,router,kvstore}")
    _add_serve(subparsers)
    _add_generate(subparsers)
    _add_bench(subparsers)
    add_router_parser(subparsers)
    add_kvstore_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        # Bad options and missing files: one clear line (the traceback only at --log-level DEBUG).
        logging.getLogger("rtpllm.cli").debug("failed", exc_info=True)
        print(f"rtpllm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
