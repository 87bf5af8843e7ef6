"""The synchronous engine: schedule -> prepare inputs -> forward -> sample -> update.

`Engine.step()` runs one scheduler step and returns the outputs of the requests that moved.
`LLM` (offline) and `AsyncEngine` (server) both drive it.
"""

from __future__ import annotations

import dataclasses
import atexit
import itertools
import logging
import os
import time
import weakref
from typing import Optional, Union

import numpy as np
import torch

from rtpllm import _C
from rtpllm.config import EngineConfig
from rtpllm.engine.cache_identity import cache_identity
from rtpllm.engine.default_model import resolve_model_path
from rtpllm.engine.detokenizer import IncrementalDetokenizer, StopStringChecker
from rtpllm.engine.device import attention_backend_factory, resolve_device, resolve_dtype
from rtpllm.engine.executor import create_executor
from rtpllm.engine.instance_report import InstanceReporter
from rtpllm.engine.in_flight import InFlightStep, TokenReadback, pending_inputs
from rtpllm.engine.kv_tier_mirror import resolve_host_cache
from rtpllm.engine.kv_tiers import attach_kv_tiers, drain_kv_transfers
from rtpllm.engine.prompt_logprobs import PromptLogprobCollector
from rtpllm.engine.request_state import RequestGroup, SequenceState
from rtpllm.engine.sampling_inputs import build_sampling_batch, sampled_logprobs
from rtpllm.engine.startup_phases import StartupPhases
from rtpllm.engine.stats import EngineStats
from rtpllm.layers.sampling_batch import SamplingBatch, make_request_generator
from rtpllm.loader.lazy_tokenizer import LazyTokenizer
from rtpllm.loader.tokenizer_loader import special_token_id
from rtpllm.outputs import RequestMetrics, RequestOutput
from rtpllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int]]
_FINISH_REASONS = {
    _C.FinishReason.STOP: "stop", _C.FinishReason.LENGTH: "length",
    _C.FinishReason.ABORT: "abort", _C.FinishReason.ERROR: "error",
}


class Engine:
    def __init__(self, config: EngineConfig, startup: Optional[StartupPhases] = None,
                 tokenizer_on_demand: bool = False):
        """`startup` carries the phases timed before the engine (the engine process's imports);
        the engine adds its own and logs them all once it is ready. With `tokenizer_on_demand`
        (the engine process, whose server tokenizes and detokenizes) the tokenizer loads on a
        thread when a request first needs it (`needs_tokenizer`), not at start."""
        config = resolve_host_cache(config)  # tensor parallelism: one host tier size for every rank
        self.config = config
        self.startup = startup or StartupPhases("engine")
        self.model_path = resolve_model_path(config.model.model)
        self.device = resolve_device(config.device.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        torch.manual_seed(config.model.seed)
        self._tokenizer = LazyTokenizer(config.model.tokenizer or self.model_path)
        if not tokenizer_on_demand:
            self._tokenizer.start()  # beside the weights
        # Runs the model: in this process, or over tensor-parallel ranks in worker processes it starts.
        self.executor = create_executor(config, self.model_path, self.device, self.dtype)
        with self.startup.phase("model" if tokenizer_on_demand else "model and tokenizer"):
            loaded = self.executor.load_model()
            if not tokenizer_on_demand:
                with loaded.phases.phase("waiting for the tokenizer"):
                    self._tokenizer.get()
                loaded.phases.add_parallel("tokenizer", self._tokenizer.seconds)
        self.startup.absorb(self.startup.phases[-1][0], loaded.phases)
        self.arch = loaded.arch
        self.model_name = config.model.served_model_name or _basename(self.model_path)
        self.max_model_len = self._max_model_len(config.model.max_model_len)
        # The logits' width: the architecture's vocabulary, else (where it names none) the tokenizer's.
        self.vocab_size = getattr(self.arch, "vocab_size", None) or len(self.tokenizer)
        self.eos_token_ids = _eos_ids(loaded.generation_config, self._tokenizer_eos_id(), self.arch)
        self.spec = None  # speculative decoding (rtpllm/spec/), when configured
        if config.speculative_config is not None:
            from rtpllm.spec.factory import build_speculative_decoder
            self.spec = build_speculative_decoder(
                config.speculative_config, target_model=loaded.model, target_arch=self.arch, device=self.device,
                dtype=self.dtype, block_size=config.cache.block_size, max_model_len=self.max_model_len,
                attn_backend_factory=attention_backend_factory(self.device, self.dtype, config.cache.block_size),
                target_path=self.model_path)
        # Root of the block-hash chain: copies of KV outside the pool never mix models or layouts.
        # (Tensor-parallel ranks get it with their pool: their KV tiers key blocks by the same chain.)
        self.cache_root_hash = cache_identity(
            self.model_path, kv_dtype=self.dtype, block_size=config.cache.block_size,
            num_layers=self.arch.num_layers, num_kv_heads=self.arch.num_kv_heads, head_dim=self.arch.head_dim)
        with self.startup.phase("kv cache profile and allocation"):
            self.executor.init_runner(self.max_model_len,
                                      extra_kv_bytes_per_block=self.spec.kv_bytes_per_block if self.spec else 0,
                                      kv_root_hash=self.cache_root_hash)
        self.runner = self.executor.runner  # rank 0's: the model, its KV pool and CUDA graphs
        if self.runner.graphs is not None:  # captured inside the runner: report it apart
            capture = self.runner.graphs.capture_seconds
            self.startup.phases[-1] = (self.startup.phases[-1][0], self.startup.phases[-1][1] - capture)
            self.startup.add(f"cuda graphs ({len(self.runner.graphs.buckets)} batch sizes)", capture)
        self.startup.detail("kv cache profile and allocation",
                            [("profile forward", getattr(self.runner, "profile_seconds", 0.0))])
        if self.spec is not None:  # tensor parallelism: rank 0 alone would replay verify graphs
            self.spec.bind(self.runner, verify_graphs=config.parallel.tensor_parallel_size == 1)
        self.scheduler = _C.Scheduler(
            _C.SchedulerOptions(
                max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                max_num_seqs=config.scheduler.max_num_seqs,
                enable_chunked_prefill=config.scheduler.enable_chunked_prefill,
                max_model_len=self.max_model_len),
            _C.CacheOptions(num_blocks=self.executor.num_blocks, block_size=config.cache.block_size,
                            enable_prefix_caching=config.cache.enable_prefix_caching,
                            root_hash=self.cache_root_hash))
        # KV events and step time, for routers.
        self.reporter = InstanceReporter(self.scheduler, config.cache.block_size, self.cache_root_hash)
        # Rank 0's tiers; with tensor parallelism every other rank has its own, which repeat them.
        self.kv_tiers = attach_kv_tiers(self.scheduler, config.cache, self.runner.kv_caches, self.cache_root_hash,
                                        self.device, self.executor, config.parallel.tensor_parallel_size)
        self.pd = None  # prefill-decode disaggregation (rtpllm/pd/engine_side.py), for role prefill or decode
        if config.pd.enabled:
            from rtpllm.pd.engine_side import PDEngine
            self.pd = PDEngine(self)
        if self.kv_tiers is not None and "disk" in self.kv_tiers.tiers:
            # An offline run that ends with the interpreter still gets its last blocks onto disk.
            atexit.register(_close_at_exit, weakref.ref(self))
        self._groups: dict[str, RequestGroup] = {}
        self._seqs: dict[int, SequenceState] = {}
        self._seq_ids = itertools.count(1)
        # Unseeded requests draw from one engine-wide generator, so a run is reproducible as a whole.
        self._generator = torch.Generator(device=self.device).manual_seed(config.model.seed)
        self._pending: list[RequestGroup] = []  # requests owed to callers (aborts) at the next step
        self._pd_returned_early = False  # _step returned a PD arrival before its forward last time
        self._async = (config.scheduler.async_scheduling if config.scheduler.async_scheduling is not None
                       else self.device.type == "cuda")
        self._in_flight: Optional[InFlightStep] = None  # launched and committed, tokens not read back
        self._readback = TokenReadback(self.device, config.scheduler.max_num_seqs)
        self._last_sampling_batch: Optional[SamplingBatch] = None  # its row tensors may be reused
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self.startup.log()

    @property
    def tokenizer(self):
        """The model's tokenizer (`--tokenizer` where given); loads it first if it is not yet."""
        return self._tokenizer.get()

    @property
    def tokenizer_loaded(self) -> bool:
        """True once the tokenizer's load has ended (`tokenizer` then answers, or raises, at once)."""
        return self._tokenizer.loaded

    def needs_tokenizer(self, prompt: Prompt, detokenize: bool = True) -> bool:
        """Whether `add_request(prompt, ..., detokenize=...)` would wait for the tokenizer to load;
        if so, starts loading it on its thread."""
        if self._tokenizer.loaded or (not detokenize and isinstance(prompt, (list, tuple))):
            return False
        self._tokenizer.start()
        return True

    def _tokenizer_eos_id(self) -> Optional[int]:
        if self._tokenizer.loaded:
            return self.tokenizer.eos_token_id
        if not os.path.isdir(self._tokenizer.path):
            return None  # a GGUF file: its tokenizer's EOS is the metadata's, already in the architecture
        eos = special_token_id(self._tokenizer.path, "eos_token")
        # Where the files do not say it plainly, the tokenizer does (loaded now, once).
        return eos if eos is not None else self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams,
                    arrival_time: Optional[float] = None, stream: bool = True,
                    prompt_token_ids: Optional[list[int]] = None, detokenize: bool = True) -> None:
        """Queues a request. Raises ValueError naming the problem; the engine is unchanged then.

        With `stream`, `step()` reports the request every time it moves; without, only once it
        finishes (and its text is decoded once, at the end: much cheaper for offline batches).
        `prompt_token_ids` are a string prompt's ids where the caller already has them
        (`encode_prompts`); the string is then kept only for the output. With `detokenize=False`
        the outputs carry token ids and no text: the caller decodes them (the server does, so that
        its engine process spends no time on text); stop strings need the engine's text."""
        if request_id in self._groups:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if not detokenize and params.stop_strings:
            raise ValueError("stop: stop strings need the engine to decode the text (detokenize=False given)")
        if prompt_token_ids is not None and isinstance(prompt, str) and prompt:
            prompt_text, prompt_ids = prompt, list(prompt_token_ids)
        else:
            prompt_text, prompt_ids = self._tokenize(prompt)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens leave no room to generate within "
                             f"max_model_len={self.max_model_len}")
        room = self.max_model_len - len(prompt_ids)
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        stop_ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids += [t for t in self.eos_token_ids if t not in stop_ids]
        group = RequestGroup(request_id=request_id, prompt=prompt_text, prompt_ids=prompt_ids, params=params,
                             metrics=RequestMetrics(arrival_time=arrival_time or time.monotonic()), stream=stream)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        added: list[int] = []
        try:
            for index in range(params.n):
                seq = self._new_sequence(group, index, detokenize)
                spec = _C.RequestSpec(
                    request_id=seq.seq_id, prompt_token_ids=prompt_ids, max_new_tokens=max_new,
                    stop_token_ids=stop_ids, ignore_eos=params.ignore_eos, min_new_tokens=params.min_tokens,
                    priority=0, arrival_time=group.metrics.arrival_time,
                    # Prompt logprobs need every prompt position computed: a unique key opts out of cache hits.
                    extra_key=seq.seq_id if params.prompt_logprobs is not None else 0)
                if params.kv_transfer_params is None:
                    self.scheduler.add_request(spec)
                elif self.pd is None:
                    raise ValueError("kv_transfer_params: this instance has no prefill-decode role (--role)")
                else:
                    self.pd.add(seq, spec, params.kv_transfer_params)
                added.append(seq.seq_id)
                group.seqs.append(seq)
        except ValueError:
            for seq_id in added:
                self.scheduler.abort(seq_id, _C.FinishReason.ABORT)
            raise
        for seq in group.seqs:
            self._seqs[seq.seq_id] = seq
        self._groups[request_id] = group
        self._prompt_tokens_total += len(prompt_ids)

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """The ids `add_request` would give each string prompt, for many at once: the fast
        tokenizer encodes a batch on all cores (1000 prompts of 1K tokens one by one took ~1 s,
        time an offline batch spent before its first step)."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for seq in group.seqs:
            if not seq.finished:
                if self.pd is not None:
                    self.pd.before_abort(seq.seq_id)  # a peer may still write its blocks: hold them
                self.scheduler.abort(seq.seq_id, _C.FinishReason.ABORT)
                seq.finish("abort")
            self._seqs.pop(seq.seq_id, None)
        group.metrics.finished_time = time.monotonic()
        self._pending.append(group)

    def has_unfinished_requests(self) -> bool:
        # A step still in flight once every request has finished only computed past a stop: the
        # next step() resolves and drops it, so it does not keep the engine busy.
        return bool(self._groups) or bool(self._pending)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Runs one step. With asynchronous scheduling the step is launched, committed, and the
        previous step's tokens are read back while the device works on this one: outputs then
        arrive one step later, and a request that stops has run one extra step for nothing."""
        return [group.to_output() for group in self.step_groups()]

    def step_groups(self) -> list[RequestGroup]:
        """`step()` without building its outputs: the requests it would report, each once, as
        their live state (read it before the next step). The engine process encodes these into
        deltas directly (output_deltas.py), without a cumulative RequestOutput per request."""
        started = time.perf_counter()
        groups = self._step()
        if self.pd is not None:
            self.pd.after_step()  # a prefill's first token goes out with its last layer's KV
        self.reporter.step_timer.observe(time.perf_counter() - started)
        return list(dict.fromkeys(groups)) if len(groups) > 1 else groups  # resolve + apply may both move one

    def _step(self) -> list[RequestGroup]:
        outputs, self._pending = self._pending, []
        if self.pd is not None:
            arrived = self._poll_pd()
            outputs += arrived
            # A PD request whose KV just arrived has its first token (from prefill): it goes out now,
            # not after this step's forward. Once in a row, so arrivals can never starve the batch.
            self._pd_returned_early = bool(arrived) and not self._pd_returned_early
            if self._pd_returned_early:
                return outputs
        if self.spec is not None and self.spec.wants_lookahead(self.scheduler.num_running, self._seqs):
            if self._in_flight is not None:  # drafts follow the last tokens: they must be on the host
                previous, self._in_flight = self._in_flight, None
                outputs += self._resolve(previous)
            self.spec.request_lookahead(self.scheduler, self._seqs.values())
        # The other ranks' answers, before the scheduler polls its transfers (and the operations of
        # an earlier schedule() that launched no step; execute() ships those of a step before it).
        self.executor.pump_kv_tiers()
        batch = self.scheduler.schedule()
        if self.pd is not None:
            self.pd.before_forward(batch)
        if self.spec is not None:
            self.spec.step_started(batch.num_draft_tokens > 0, batch.num_tokens)
        previous = self._in_flight
        if batch.num_seqs == 0:
            if previous is None and self.kv_tiers is not None and self.scheduler.has_pending_kv_transfers():
                time.sleep(0.0005)  # only loads or saves under way: leave the cores to their copies
            if previous is not None:
                self._in_flight = None
                outputs += self._resolve(previous)
            return outputs
        now = time.monotonic()
        for seq_id in batch.request_ids.tolist():
            metrics = self._seqs[seq_id].group.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now

        sampled_seqs = [self._seqs[i] for i in batch.sampled_request_ids.tolist()]
        collector = PromptLogprobCollector(batch, self._seqs)
        overlap = (self._async and not collector.seq_indices
                   and not any(_reads_host_history(seq.params) for seq in sampled_seqs))
        if previous is not None and not overlap:
            # This step's sampling reads every earlier token on the host: finish the previous step first.
            self._in_flight = None
            outputs += self._resolve(previous)
        pending = pending_inputs(batch, previous)
        sampling_batch = (build_sampling_batch(sampled_seqs, self.eos_token_ids, self._generator, self.device,
                                               self.arch.vocab_size, previous=self._last_sampling_batch)
                          if sampled_seqs else None)
        self._last_sampling_batch = sampling_batch or self._last_sampling_batch
        if batch.num_draft_tokens > 0:  # speculative: applied synchronously (no step was in flight)
            spec = self.spec.run_step(self.executor, batch, sampled_seqs, sampling_batch, collector.seq_indices)
            collector.collect(spec.prompt_logprobs)
            return outputs + self._apply(self.scheduler.update(batch, spec.token_ids), spec.logprobs_by_seq)
        result = self.executor.execute(batch, sampling_batch, collector.seq_indices, pending)
        if self.pd is not None:
            self.pd.after_forward()
        collector.collect(result.prompt_logprobs)

        if overlap:
            self.scheduler.commit(batch)
            self._in_flight = InFlightStep(batch, result.sampled.token_ids if result.sampled is not None else None,
                                           self._readback)
            if previous is not None:
                outputs += self._resolve(previous)
            return outputs

        token_ids = np.zeros(0, dtype=np.int32)
        logprobs_by_seq = {}
        if result.sampled is not None:
            token_ids = result.sampled.token_ids.to(device="cpu", dtype=torch.int32).numpy()
            logprobs_by_seq = sampled_logprobs(sampled_seqs, result.sampled)
        return outputs + self._apply(self.scheduler.update(batch, token_ids), logprobs_by_seq)

    def _poll_pd(self) -> list[RequestGroup]:
        """PD requests whose KV arrived from the prefill peer (they run on) or failed to (error)."""
        idle = self._in_flight is None and self.scheduler.num_running == 0 and self.scheduler.num_waiting == 0
        polled = self.pd.poll(idle)
        outputs = self._apply(polled.completed, polled.logprobs) if polled.completed else []
        for seq_id in polled.failed:  # already aborted in the scheduler
            seq = self._seqs.pop(seq_id, None)
            if seq is None or seq.finished:
                continue
            seq.finish("error")
            if seq.group.finished:
                seq.group.metrics.finished_time = time.monotonic()
                self._groups.pop(seq.group.request_id, None)
            outputs.append(seq.group)
        return outputs

    def _resolve(self, step: "InFlightStep") -> list[RequestGroup]:
        return self._apply(self.scheduler.resolve(step.batch, step.host_tokens()), {})

    def _apply(self, step_outputs, logprobs_by_seq: dict) -> list[RequestGroup]:
        """Hands a step's scheduler outputs to the requests; returns those callers should see."""
        outputs: list[RequestGroup] = []
        moved: dict[str, RequestGroup] = {}
        now = time.monotonic()
        for out in step_outputs:
            seq = self._seqs.get(out.request_id)
            if seq is None:
                continue
            group = seq.group
            if out.new_token_ids:
                self._generation_tokens_total += len(out.new_token_ids)
                group.metrics.first_token_time = group.metrics.first_token_time or now
                group.metrics.last_token_time = now
                if _append_tokens(seq, list(out.new_token_ids), logprobs_by_seq.get(seq.seq_id)):
                    self.scheduler.abort(seq.seq_id, _C.FinishReason.STOP)  # a stop string matched
            if out.finished and not seq.finished:
                stop_token = out.stop_token_id if out.stop_token_id >= 0 else None
                user_stop = stop_token if stop_token in seq.params.stop_token_ids else None
                seq.finish(_FINISH_REASONS[out.finish_reason], user_stop)
            if seq.finished:
                self._seqs.pop(seq.seq_id, None)
            moved[group.request_id] = group
        for group in moved.values():
            if group.finished:
                group.metrics.finished_time = now
                self._groups.pop(group.request_id, None)
            elif not group.stream:
                continue
            outputs.append(group)
        return outputs

    # ------------------------------------------------------------------ introspection
    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_blocks_used=s.blocks_used,
            kv_blocks_total=s.blocks_total, prefix_cache_queries=s.prefix_queries,
            prefix_cache_hits=s.prefix_hits, num_preemptions=s.num_preempted_total,
            prompt_tokens_total=self._prompt_tokens_total, generation_tokens_total=self._generation_tokens_total,
            spec=dataclasses.replace(self.spec.counters) if self.spec is not None else None,
            num_waiting_for_kv=s.num_waiting_for_kv, kv_tier_hit_tokens=s.kv_tier_hit_blocks * self.runner.block_size,
            kv_tier_failed_loads=s.kv_tier_failed_loads,
            kv_tiers=self.kv_tiers.snapshot() if self.kv_tiers is not None else (),
            pd=self.pd.snapshot() if self.pd is not None else ())

    def tokens_in_flight(self) -> int:
        """Prompt and generated tokens of the unfinished sequences."""
        return sum(len(seq.group.prompt_ids) + len(seq.output_ids) for seq in self._seqs.values())

    def has_pending_kv_transfers(self) -> bool:
        """Loads or saves of the KV tiers under way: `step()` polls them, also with no request."""
        return self.scheduler.has_pending_kv_transfers() or (self.pd is not None and self.pd.has_pending())

    def close(self, timeout_s: float = 30.0) -> None:
        """Aborts what still runs, lets the KV tiers finish their transfers and background writes
        (so that a restarted engine finds every saved block on disk) and detaches them."""
        if self.kv_tiers is None:
            return
        for request_id in list(self._groups):
            self.abort_request(request_id)
        while self.has_unfinished_requests() or self._in_flight is not None:
            self.step()
        if not drain_kv_transfers(self.scheduler, timeout_s, self.executor.pump_kv_tiers):
            logger.warning("close: KV tier transfers still under way after %.0f s", timeout_s)
        self.kv_tiers.flush()
        self.scheduler.set_kv_connector(None)
        self.kv_tiers = None

    def check_kv_pool_free(self) -> bool:
        """True when no block is held by a request (cached free blocks count as free). Waits for
        the KV tiers' transfers first: they hold the blocks they copy."""
        drain_kv_transfers(self.scheduler, 30.0, self.executor.pump_kv_tiers)
        self.scheduler.check_invariants()
        return self.scheduler.num_free_blocks == self.executor.num_blocks

    def shutdown(self) -> None:
        """Stops the tensor-parallel worker processes, if any (idempotent; they also stop when
        this process exits, or when the executor is garbage-collected)."""
        self.executor.shutdown()

    # ------------------------------------------------------------------ helpers
    def _new_sequence(self, group: RequestGroup, index: int, detokenize: bool = True) -> SequenceState:
        params = group.params
        generator = None
        if params.seed is not None:
            # Sample i of a seeded request gets its own stream, so the n samples differ but replay exactly.
            generator = make_request_generator(params.seed + index, self.device)
        return SequenceState(
            seq_id=next(self._seq_ids), index=index, group=group, params=params,
            detokenizer=(IncrementalDetokenizer(self.tokenizer, group.prompt_ids, params.skip_special_tokens)
                         if detokenize else None),
            stop_checker=(StopStringChecker(params.stop_strings, params.include_stop_str_in_output)
                          if params.stop_strings else None),
            generator=generator, incremental=detokenize and (group.stream or bool(params.stop_strings)),
            detokenize=detokenize)

    def _tokenize(self, prompt: Prompt) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: empty")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not ids:
                raise ValueError("prompt: empty token list")
            vocab = self.arch.vocab_size
            # NOTE: the usual case, plain ints (the server sends those): checked in C, a 4k-token
            # prompt in ~0.1 ms instead of ~0.5 ms of the step loop's time.
            if set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab:
                return None, ids
            bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt: token ids must be integers in [0, {vocab}), got {bad[:5]}")
            return None, [int(t) for t in ids]
        raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")

    def _max_model_len(self, requested: Optional[int]) -> int:
        limit = self.arch.max_position_embeddings
        if requested is None:
            return limit
        if requested > limit:
            raise ValueError(f"max_model_len: {requested} exceeds the model's max_position_embeddings={limit}")
        return requested


def _append_tokens(seq: SequenceState, token_ids: list[int], logprobs) -> bool:
    """seq.append_tokens; several tokens (a speculative step) go one at a time when stop strings
    are watched, so that the tokens after a stop string are dropped as without speculation.
    A speculative step's logprobs cover every token it emitted; the scheduler may have kept fewer
    (a stop token, max_tokens)."""
    if logprobs is not None and len(logprobs) > len(token_ids):
        logprobs = logprobs[:len(token_ids)]
    if len(token_ids) == 1 or seq.stop_checker is None:
        return seq.append_tokens(token_ids, logprobs)
    for i, token in enumerate(token_ids):
        if seq.append_tokens([token], logprobs[i:i + 1] if logprobs is not None else None):
            return True
    return False


def _close_at_exit(engine_ref: "weakref.ref[Engine]") -> None:
    engine = engine_ref()
    if engine is not None and engine.kv_tiers is not None:
        try:
            engine.close(timeout_s=10.0)
        except Exception:  # noqa: BLE001 - exiting anyway; the disk tier drops what it could not write
            logger.exception("closing the KV tiers at exit failed")


def _reads_host_history(params: SamplingParams) -> bool:
    """Whether sampling this request needs all its tokens on the host (so no step may be in flight):
    penalties, min_tokens and logprobs do."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or params.min_tokens > 0 or params.logprobs is not None)


def _basename(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _eos_ids(generation_config: dict, tokenizer_eos_id: Optional[int], arch) -> list[int]:
    ids: list[int] = []
    configured = generation_config.get("eos_token_id") if generation_config else None
    for source in (configured, getattr(arch, "eos_token_ids", None), tokenizer_eos_id):
        if source is None:
            continue
        for t in ([source] if isinstance(source, int) else source):
            if t not in ids:
                ids.append(int(t))
    return ids
