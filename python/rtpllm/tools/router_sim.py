"""The router's policies on a model of a pool, on the CPU in seconds: where TTFT comes from.

The router side is the real one (RoutingPolicy, its lanes, the Backend tickets, KVView fed with
stored/removed events, polled load reports); the instances are a queueing model of the engine:

- a step runs every decoding sequence (one token each) plus prompt chunks, oldest request first,
  up to `token_budget` tokens (chunked prefill);
- a request's prompt is matched against the instance's prefix cache (an LRU of block hashes,
  the same chain the router hashes with) when its prefill starts; only the rest is computed, and
  its full blocks are stored when its prefill ends (then the router hears of them, `event_lag_s`
  later); its first token comes out at the end of that step;
- a step costs `step_cpu_s` of host time (scheduling, launches: instances overlap these) and then
  GPU time: `step_gpu_s + prefill_token_s * prompt tokens computed + decode_seq_s * sequences`.
  With `shared_gpu` the instances' GPU parts share one device equally while they overlap, as
  processes time-slicing one card do.

    python -m rtpllm.tools.router_sim --rates 10,40,60          # the GPU benchmark's trace
    python -m rtpllm.tools.router_sim --load 0.8                # the benchmark's operating point
    python -m rtpllm.tools.router_sim --rates 50 --policies cache_aware,round_robin --duration 30

The defaults model a Llama-3.2-1B-shaped checkpoint on an H100 (about 125k prompt tokens/s of
prefill for the whole card, a few ms of host time per step). They are estimates, not measurements:
use the simulator for where time goes and how policies compare, the GPU benchmark for numbers.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

from rtpllm.router.backend import Backend, BackendPool, Ticket
from rtpllm.router.config import RouterConfig
from rtpllm.router.kv_view import prefix_block_hashes
from rtpllm.router.policy import RoutingInput, RoutingPolicy
from rtpllm.tools.router_trace import GPU_TRACE, TraceRequest, TraceShape, build_trace


@dataclass(frozen=True)
class InstanceModel:
    step_cpu_s: float = 0.003
    step_gpu_s: float = 0.0008
    prefill_token_s: float = 8e-6
    decode_seq_s: float = 2e-5
    token_budget: int = 8192
    cache_blocks: int = 10346  # what a 0.1 share of an H100 gives the 1B shape (the benchmark's default)
    block_size: int = 16
    shared_gpu: bool = True
    overhead_s: float = 0.008  # HTTP, the router's hop, tokenizing: added to every TTFT
    event_lag_s: float = 0.01  # a stored block reaches the router's view this much later
    load_interval_s: float = 0.25  # the router's load polls (RouterConfig.load_interval_s)


@dataclass
class SimRequest:
    index: int
    trace: TraceRequest
    hashes: list[int]
    max_tokens: int
    ticket: Optional[Ticket] = None
    remaining: Optional[int] = None  # prompt tokens still to compute (None: prefill not started)
    hit_tokens: int = 0
    left: int = 0  # tokens still to decode
    arrived_s: float = 0.0
    ttft_s: Optional[float] = None


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._order), action))

    def run(self) -> None:
        while self._queue:
            self.now, _, action = heapq.heappop(self._queue)
            action()


class SharedGPU:
    """One device time-sliced between processes: the GPU parts of the steps in progress share it
    equally (processor sharing), so a long prefill slows the other instances' steps without
    stopping them."""

    def __init__(self, clock: _Clock):
        self.clock = clock
        self.jobs: dict[int, list] = {}  # id -> [work left in seconds, on_done]
        self._ids = itertools.count()
        self._last = 0.0
        self._epoch = 0

    def submit(self, work_s: float, on_done: Callable[[], None]) -> None:
        self._advance()
        self.jobs[next(self._ids)] = [work_s, on_done]
        self._schedule()

    def _advance(self) -> None:
        now = self.clock.now
        if self.jobs:
            share = (now - self._last) / len(self.jobs)
            for job in self.jobs.values():
                job[0] -= share
        self._last = now

    def _schedule(self) -> None:
        self._epoch += 1
        if self.jobs:
            epoch = self._epoch
            soonest = min(job[0] for job in self.jobs.values())
            self.clock.at(self.clock.now + max(0.0, soonest) * len(self.jobs), lambda: self._finish(epoch))

    def _finish(self, epoch: int) -> None:
        if epoch != self._epoch:
            return  # superseded by a later submit
        self._advance()
        done = [key for key, job in self.jobs.items() if job[0] <= 1e-12]
        callbacks = [self.jobs.pop(key)[1] for key in done]
        self._schedule()
        for callback in callbacks:
            callback()


class SimInstance:
    def __init__(self, sim: "Simulation", backend: Backend):
        self.sim = sim
        self.backend = backend
        self.model = sim.model
        self.waiting: deque[SimRequest] = deque()  # FCFS; the head may be partly prefilled
        self.decoding: list[SimRequest] = []
        self.cache: OrderedDict[int, None] = OrderedDict()  # LRU, oldest first
        self.busy = False
        self.cursor = 0
        self.query_tokens = 0
        self.hit_tokens = 0

    def submit(self, request: SimRequest) -> None:
        self.waiting.append(request)
        self._maybe_step()

    def load_report(self) -> dict:
        started = sum(1 for r in self.waiting if r.remaining is not None)
        return {"num_running": len(self.decoding) + started, "num_waiting": len(self.waiting) - started}

    def _match(self, request: SimRequest) -> None:
        blocks = 0
        for h in request.hashes:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            blocks += 1
        prompt = len(request.trace.tokens)
        request.hit_tokens = blocks * self.model.block_size
        request.remaining = prompt - request.hit_tokens
        self.query_tokens += prompt
        self.hit_tokens += request.hit_tokens

    def _maybe_step(self) -> None:
        if self.busy or not (self.waiting or self.decoding):
            return
        m = self.model
        decode = list(self.decoding)
        budget = m.token_budget - len(decode)
        chunks = []
        for request in self.waiting:
            if budget <= 0:
                break
            if request.remaining is None:
                self._match(request)
            take = min(request.remaining, budget)
            chunks.append((request, take))
            budget -= take
        gpu_s = m.step_gpu_s + m.prefill_token_s * sum(t for _, t in chunks) + m.decode_seq_s * len(decode)
        self.sim.gpu_busy_s += gpu_s
        self.busy = True
        end = lambda: self._end_step(decode, chunks)  # noqa: E731
        if m.shared_gpu:
            self.sim.clock.at(self.sim.clock.now + m.step_cpu_s, lambda: self.sim.gpu.submit(gpu_s, end))
        else:
            self.sim.clock.at(self.sim.clock.now + m.step_cpu_s + gpu_s, end)

    def _end_step(self, decode: list[SimRequest], chunks: list[tuple[SimRequest, int]]) -> None:
        now = self.sim.clock.now
        for request in decode:
            request.left -= 1
            if request.left == 0:
                self.decoding.remove(request)
                self.sim.finished(request)
        stored: list[int] = []
        for request, take in chunks:
            request.remaining -= take
            if request.remaining:
                continue
            self.waiting.remove(request)
            for h in request.hashes:
                if h in self.cache:
                    self.cache.move_to_end(h)
                else:
                    self.cache[h] = None
                    stored.append(h)
            request.ttft_s = now - request.arrived_s + self.model.overhead_s
            request.ticket.first_output()
            request.left = request.max_tokens - 1
            if request.left > 0:
                self.decoding.append(request)
            else:
                self.sim.finished(request)
        removed = []
        while len(self.cache) > self.model.cache_blocks:
            removed.append(self.cache.popitem(last=False)[0])
        if stored or removed:
            self.sim.clock.at(now + self.model.event_lag_s, lambda: self._publish(stored, removed))
        self.busy = False
        self._maybe_step()

    def _publish(self, stored: list[int], removed: list[int]) -> None:
        kinds = ["stored"] * len(stored) + ["removed"] * len(removed)
        self.cursor += len(kinds)
        self.backend.view.apply({"instance_id": "sim", "cursor": self.cursor, "block_size": self.model.block_size,
                                 "root_block_hash": 0, "extra_key": 0,
                                 "events": {"kinds": kinds, "tiers": ["device"] * len(kinds),
                                            "hashes": stored + removed}})


@dataclass
class SimReport:
    policy: str
    rate: float
    requests: list[SimRequest]
    hit_rate: float
    gpu_utilization: float
    per_instance: list[int] = field(default_factory=list)  # requests each instance served

    def ttft(self, q: float, kind: Optional[str] = None) -> float:
        values = sorted(r.ttft_s for r in self.requests if kind is None or r.trace.kind == kind)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Simulation:
    def __init__(self, config: RouterConfig, model: InstanceModel):
        self.config = config
        self.model = model
        self.clock = _Clock()
        self.gpu = SharedGPU(self.clock)
        self.gpu_busy_s = 0.0
        self.pool = BackendPool(config)
        self.policy = RoutingPolicy(config, self.pool)
        self.instances = {}
        for backend in self.pool.backends:
            backend.view.clock = self.clock
            backend.view.apply({"instance_id": "sim", "cursor": 0, "block_size": model.block_size,
                                "root_block_hash": 0, "extra_key": 0, "resync": "subscribe", "snapshot": {}})
            self.instances[backend.url] = SimInstance(self, backend)
        self.waiting_long: deque[SimRequest] = deque()
        self.unfinished = 0
        self._on_finished: Callable[[SimRequest], None] = lambda request: None

    def _requests(self, trace: Sequence[TraceRequest], max_tokens: int) -> list[SimRequest]:
        return [SimRequest(i, t, prefix_block_hashes(t.tokens, self.model.block_size, 0), max_tokens)
                for i, t in enumerate(trace)]

    def run(self, trace: Sequence[TraceRequest], max_tokens: int) -> list[SimRequest]:
        """Open loop: every request at its arrival time."""
        requests = self._requests(trace, max_tokens)
        for request in requests:
            self.clock.at(request.trace.at_s, lambda r=request: self._arrive(r))
        self.unfinished = len(requests)
        self.clock.at(0.0, self._poll_load)
        self.clock.run()
        return requests

    def run_closed(self, trace: Sequence[TraceRequest], max_tokens: int, concurrency: int, seconds: float) -> float:
        """Closed loop, as the benchmark's capacity probe: `concurrency` clients send the trace's
        requests in order (arrival times ignored) for `seconds`; requests finished per second
        after the first quarter."""
        pending = iter(self._requests(trace, max_tokens))
        done: list[float] = []

        def send_next() -> None:
            request = next(pending, None)
            if request is not None and self.clock.now < seconds:
                self.unfinished += 1
                self._arrive(request)

        def finished(request: SimRequest) -> None:
            done.append(self.clock.now)
            send_next()

        self._on_finished = finished
        for _ in range(concurrency):
            self.clock.at(0.0, send_next)
        self.clock.at(0.0, self._poll_load)
        self.clock.run()
        return sum(seconds / 4 <= t <= seconds for t in done) / (seconds * 3 / 4)

    def _poll_load(self) -> None:
        for backend in self.pool.backends:
            backend.take_load_report(self.instances[backend.url].load_report())
        if self.unfinished:
            self.clock.at(self.clock.now + self.model.load_interval_s, self._poll_load)

    def _arrive(self, request: SimRequest) -> None:
        request.arrived_s = self.clock.now
        self._route(request)

    def _route(self, request: SimRequest) -> None:
        routing = RoutingInput(request.trace.tokens, len(request.trace.tokens))
        candidates = self.policy.lanes.candidates(self.pool.healthy(), self.policy.lanes.is_long(routing))
        if not candidates:
            self.waiting_long.append(request)  # a long prompt without a slot waits in the router
            return
        choice = self.policy.choose(routing, candidates)
        request.ticket = self.policy.dispatch(choice, routing)
        self.instances[choice.backend.url].submit(request)

    def finished(self, request: SimRequest) -> None:
        request.ticket.close()
        self.unfinished -= 1
        waiting, self.waiting_long = self.waiting_long, deque()
        for r in waiting:
            self._route(r)
        self._on_finished(request)


def _simulation(policy: str, model: InstanceModel, instances: int, **config) -> Simulation:
    cfg = RouterConfig(backends=tuple(f"http://sim{i}:1" for i in range(instances)), policy=policy,
                       load_interval_s=model.load_interval_s, **config)
    return Simulation(cfg, model)


def capacity(policy: str, shape: TraceShape, model: InstanceModel = InstanceModel(), instances: int = 4,
             concurrency: Optional[int] = None, seconds: float = 20.0, seed: int = 0, **config) -> float:
    """Requests per second `policy` sustains on the trace's requests (the benchmark's probe)."""
    sim = _simulation(policy, model, instances, **config)
    trace = build_trace(shape.with_(rate=40.0, duration_s=8 * seconds), seed, salt=1000)  # as the benchmark's
    return sim.run_closed(trace, shape.max_tokens, concurrency or 16 * instances, seconds)


def simulate(policy: str, shape: TraceShape, model: InstanceModel = InstanceModel(), instances: int = 4,
             seed: int = 0, **config) -> SimReport:
    """Replays the trace of `shape` through the router's `policy` over `instances` modelled instances."""
    sim = _simulation(policy, model, instances, **config)
    requests = sim.run(build_trace(shape, seed), shape.max_tokens)
    queries = sum(i.query_tokens for i in sim.instances.values())
    hits = sum(i.hit_tokens for i in sim.instances.values())
    span = max(sim.clock.now, shape.duration_s)
    return SimReport(policy, shape.rate, requests, hits / queries if queries else 0.0, sim.gpu_busy_s / span,
                     [b.routed_total for b in sim.pool.backends])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="10,40,60", help="requests per second, comma-separated")
    parser.add_argument("--load", type=float, default=None,
                        help="instead of --rates: this share of what round_robin sustains (as the benchmark)")
    parser.add_argument("--policies", default="cache_aware,round_robin,least_loaded")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--long-prompt-threshold", type=int, default=4096)
    parser.add_argument("--separate-gpus", action="store_true", help="one GPU per instance (default: one shared)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = replace(InstanceModel(), shared_gpu=not args.separate_gpus)
    rates = [float(r) for r in args.rates.split(",")]
    if args.load is not None:
        sustained = capacity("round_robin", GPU_TRACE, model, args.instances, seed=args.seed,
                             long_prompt_threshold=args.long_prompt_threshold)
        rates = [args.load * sustained]
        print(f"round_robin sustains {sustained:.1f} req/s; running at {args.load:.2f}x that")
    for rate in rates:
        shape = GPU_TRACE.with_(rate=rate, duration_s=args.duration)
        reports = {p: simulate(p, shape, model, args.instances, args.seed,
                               long_prompt_threshold=args.long_prompt_threshold)
                   for p in args.policies.split(",")}
        for r in reports.values():
            print(f"rate {rate:5.1f}/s {r.policy:>13}: TTFT p50 {1e3 * r.ttft(0.5):7.1f} ms  "
                  f"p95 {1e3 * r.ttft(0.95):7.1f} ms  (short p95 {1e3 * r.ttft(0.95, 'turn'):7.1f})  "
                  f"hit rate {r.hit_rate:.3f}  GPU busy {r.gpu_utilization:.2f}  per instance {r.per_instance}")
        if "cache_aware" in reports and "round_robin" in reports:
            ca, rr = reports["cache_aware"], reports["round_robin"]
            print(f"rate {rate:5.1f}/s cache_aware / round_robin: TTFT p95 {ca.ttft(0.95) / rr.ttft(0.95):.2f}x, "
                  f"hit rate {ca.hit_rate / rr.hit_rate:.2f}x", flush=True)


if __name__ == "__main__":
    main()
