"""Prefill-decode disaggregation on one GPU, Llama-3.1-8B-shaped:

1. KV transfer bandwidth: a 4k-token prompt's KV (32 layers, 8 KV heads, head dim 128, bf16:
   512 MiB) written layer by layer from one process's paged pool into another's (block size 64
   into 16, as prefill and decode may differ), DIRECT (the transfer engine's copy kernel into the
   decode pool mapped over CUDA IPC; rows `..._direct`, --pd-direct-copy) and over UCX's CUDA IPC
   transport (RMA, the default), against a device-to-device copy measured in the same run (ratio = transfer bytes/s over copy bytes/s, one direction);
   into consecutive decode blocks (few large writes), into reversed ones (one write per block: what
   the old free list handed out after churn), and the block lists the real allocator hands out
   after churn (`_C.Scheduler` driven through many requests on both sides, prefix caching on:
   "after_churn" with room to spare in the decode pool, "after_churn_full_pool" with it running
   full).
2. Time to first token of a 4k-token prompt: `rtpllm serve` colocated, then through PD (prefill
   and decode instances on the same GPU, half its memory each; the router's hand-off driven here),
   both streamed, measured at the client from sending the request to the first content chunk,
   PD driven as the router drives it (decode's stream read while the prefill call runs), with its
   time split into decode's reservation and the rest up to decode's first token; once with the
   prefill sent after the reservation, once overlapped with it (the router's default).

    python bench/gpu/bench_pd.py --json /tmp/bench_pd.json
The checkpoint is bench_e2e_llama8b.py's random 8B-shaped one (cached in $RTPLLM_BENCH_DIR).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "py"))
from bench_util import device_name, measure_copy_tbps, parse_args, row, write_json  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 32, 8, 128
PROMPT_TOKENS = 4096
REPEATS = 5
DECODE_POOL_BLOCKS, PREFILL_POOL_BLOCKS = 8192, 1024  # 16 GiB and 8 GiB: room for the churn rows


# ---------------------------------------------------------------------- 1. transfer bandwidth
def _pool(num_blocks: int, block_size: int) -> list[torch.Tensor]:
    return [torch.randn(2, num_blocks, block_size, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
            for _ in range(LAYERS)]


def _engine(name: str, pool: list[torch.Tensor], data_path: str = "AUTO"):
    from rtpllm import _C
    from rtpllm.engine.kv_tiers import kv_layout

    # direct_access: the decode side exports its pool, the DIRECT sender maps it.
    engine = _C.UcxTransfer(_C.TransferOptions(name=name, identity="bench-pd", timeout_s=30.0,
                                               data_path=getattr(_C.DataPath, data_path)),
                            cuda_device=torch.cuda.current_device(), direct_access=data_path in ("AUTO", "DIRECT"))
    engine.register_kv(kv_layout(pool, pool[0].shape[2]))
    return engine


def receiver() -> None:
    """The decode side of part 1, in a process of its own: a pool of 16-token blocks."""
    pool = _pool(DECODE_POOL_BLOCKS, 16)
    engine = _engine("decode", pool)
    print(json.dumps({"port": engine.listen_port}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin


def _runs(blocks: list[int]) -> int:
    """Runs of consecutive block ids: each is one write per layer and plane at most."""
    return sum(1 for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1] + 1)


def _churn_spec(rng, request_id: int, prompt_tokens: int, max_new_tokens: int):
    from rtpllm import _C

    return _C.RequestSpec(request_id=request_id, prompt_token_ids=rng.integers(3, 30000, prompt_tokens, dtype="int32"),
                          max_new_tokens=max_new_tokens, stop_token_ids=[2], arrival_time=float(request_id))


def _churn_step(scheduler) -> None:
    import numpy as np

    batch = scheduler.schedule()
    scheduler.update(batch, np.full(batch.num_sampled, 7, dtype=np.int32))


def decode_reservation_after_churn(num_blocks: int, steps: int) -> list[int]:
    """The blocks a decode instance (16-token blocks, prefix caching on) reserves for a 4k-token
    prompt after `steps` steps of remote-prefill requests (prompts of 256..4096 tokens, 16..512
    output tokens, up to 32 at once), as tests/cpp/pd_block_runs_test.cc drives it."""
    import numpy as np
    from rtpllm import _C

    rng = np.random.default_rng(1)
    decode = _C.Scheduler(_C.SchedulerOptions(max_num_batched_tokens=8192, max_num_seqs=32, max_model_len=8192),
                          _C.CacheOptions(num_blocks=num_blocks, block_size=16, enable_prefix_caching=True))
    for request_id in range(1, steps + 1):
        if decode.num_running < 32:
            spec = _churn_spec(rng, request_id, int(rng.integers(256, 4097)), int(rng.integers(16, 513)))
            if decode.add_remote_prefill(spec):
                decode.complete_remote_prefill(request_id, 7)
        _churn_step(decode)
    target = _churn_spec(rng, steps + 1, PROMPT_TOKENS, 16)
    while not decode.add_remote_prefill(target):
        _churn_step(decode)
    return list(decode.get_request(steps + 1).block_table)


def prefill_blocks_after_churn(num_blocks: int) -> list[int]:
    """The blocks a prefill instance (64-token blocks, 2048-token chunks) computes a 4k-token
    prompt in after 400 steps of prompts of 256..4096 tokens."""
    import numpy as np
    from rtpllm import _C

    rng = np.random.default_rng(1)
    prefill = _C.Scheduler(_C.SchedulerOptions(max_num_batched_tokens=2048, max_num_seqs=16, max_model_len=8192),
                           _C.CacheOptions(num_blocks=num_blocks, block_size=64, enable_prefix_caching=True))
    request_id = 0
    for _ in range(400):
        if prefill.num_waiting < 4:
            request_id += 1
            prefill.add_request(_churn_spec(rng, request_id, int(rng.integers(256, 4097)), 1))
        _churn_step(prefill)
    while prefill.has_unfinished():
        _churn_step(prefill)
    target = request_id + 1
    prefill.add_request(_churn_spec(rng, target, PROMPT_TOKENS, 1))
    blocks: list[int] = []
    while prefill.has_unfinished():
        batch = prefill.schedule()
        request = prefill.get_request(target)
        if request is not None:
            blocks = list(request.block_table)  # the last chunk's schedule holds every block
        prefill.update(batch, np.full(batch.num_sampled, 7, dtype=np.int32))
    return blocks


def transfer_rows(copy_tbps: float) -> list[dict]:
    from rtpllm import _C

    child = subprocess.Popen([sys.executable, __file__, "receiver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        port = json.loads(child.stdout.readline())["port"]
        pool = _pool(PREFILL_POOL_BLOCKS, 64)
        src_consecutive = list(range(PROMPT_TOKENS // 64))
        nbytes = PROMPT_TOKENS * LAYERS * 2 * HEADS * HEAD_DIM * 2
        copy_one_way = copy_tbps / 2  # measure_copy_tbps counts bytes read plus written
        rows = []
        # Consecutive decode blocks (a fresh pool hands them out in order: few large writes),
        # reversed ones (the worst case: one write per 16-token block, layer and plane), and both
        # sides' blocks as the allocator hands them out after churn.
        prefill_churned = prefill_blocks_after_churn(PREFILL_POOL_BLOCKS)
        cases = (("consecutive", src_consecutive, list(range(PROMPT_TOKENS // 16))),
                 ("reversed", src_consecutive, list(range(PROMPT_TOKENS // 16))[::-1]),
                 ("after_churn", prefill_churned, decode_reservation_after_churn(DECODE_POOL_BLOCKS, 600)),
                 ("after_churn_full_pool", prefill_churned, decode_reservation_after_churn(DECODE_POOL_BLOCKS // 2, 1000)))
        # DIRECT: our copy kernel into the mapped decode pool; RMA: UCX's CUDA IPC transport.
        for data_path, order, src, dst in [(path, *case) for path in ("DIRECT", "RMA") for case in cases]:
            engine = _engine(f"prefill-{data_path}", pool, data_path)
            peer = engine.connect("127.0.0.1", port)
            used = engine.peers()[0].data_path.name
            times = []
            for repeat in range(REPEATS + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                handles = [engine.put(peer, _C.TransferRequest(request_id=repeat, local_blocks=src, remote_blocks=dst,
                                                               num_tokens=PROMPT_TOKENS, layer=layer))
                           for layer in range(LAYERS)]
                for handle in handles:
                    status = engine.wait(handle, 30.0)
                    assert status.state == _C.TransferState.DONE, status.error
                if repeat:  # the first connects the memory handles
                    times.append(time.perf_counter() - start)
            engine.disconnect(peer)
            seconds = statistics.median(times)
            achieved = nbytes / seconds / 1e12
            print(f"transfer {used} ({order} decode blocks, {_runs(src)} prefill / {_runs(dst)} decode runs): "
                  f"{nbytes / 2**20:.0f} MiB in {seconds * 1e3:.2f} ms = "
                  f"{achieved:.3f} TB/s (device copy {copy_one_way:.3f} TB/s one way)")
            suffix = "_direct" if data_path == "DIRECT" else ""
            rows.append(row(f"kv_transfer_4k_prompt_layer_by_layer_{order}{suffix}", achieved, "TB/s",
                            "device copy (one way, same run)", achieved / copy_one_way, ms=seconds * 1e3, bytes=nbytes,
                            prefill_runs=_runs(src), decode_runs=_runs(dst), data_path=used))
        return rows
    finally:
        child.stdin.close()
        child.wait(timeout=60)


# ---------------------------------------------------------------------- 2. TTFT through PD
def _ttft_colocated(instance, prompt: list[int]) -> float:
    import httpx

    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    with httpx.Client(timeout=300) as client:
        start = time.perf_counter()
        with client.stream("POST", instance.url + "/v1/completions", json=body) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    return time.perf_counter() - start
    raise RuntimeError("no token")


def _ttft_pd(prefill, decode, prompt: list[int], pd_request_id: str, overlap: bool) -> tuple[float, dict]:
    """As the router does it, the first token counted when decode emits it (not when prefill's
    answer arrives): decode's reservation, then the prefill call sent while decode's stream is
    read; or, overlapped (the router's default), the prefill call sent together with the decode
    request and the destination following it as soon as decode reserved."""
    import concurrent.futures

    import httpx

    body = {"pd_request_id": pd_request_id, "endpoint": "completions",
            "request": {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}}
    with httpx.Client(timeout=300) as client, httpx.Client(timeout=300) as prefill_client, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:

        def call_prefill(payload: dict):
            response = prefill_client.post(prefill.url + "/internal/pd/prefill", json=payload)
            return response, time.perf_counter()

        start = time.perf_counter()
        call = pool.submit(call_prefill, body) if overlap else None
        with client.stream("POST", decode.url + "/internal/pd/decode", json=body) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data: {"))
            destination = json.loads(next(lines)[len("data: "):])["pd_reserved"]
            reserved = time.perf_counter()
            if overlap:
                sent = client.post(prefill.url + "/internal/pd/prefill/destination",
                                   json={"pd_request_id": pd_request_id, "destination": destination})
                assert sent.status_code == 200, sent.text
            else:
                call = pool.submit(call_prefill, {**body, "destination": destination})
            next(lines)
            end = time.perf_counter()
            result, answered = call.result()
            assert result.status_code == 200, result.text
            # Where the time went, at the client: decode's reservation, then from the reservation to
            # decode's first token, and when prefill's own answer came (after every write).
            phases = {"reserve_s": reserved - start, "to_first_token_s": end - reserved, "prefill_answer_s": answered - reserved}
            return end - start, {**result.json(), **phases}


def ttft_rows(model: str) -> list[dict]:
    import random

    from pd_driver import Instance

    prompts = [[random.Random(seed).randrange(1000, 100000) for _ in range(PROMPT_TOKENS)] for seed in range(REPEATS + 1)]
    common = ("--device", "cuda", "--kv-host-cache-gib", "0", "--max-model-len", "8192")
    colocated = Instance(*common, "--gpu-memory-utilization", "0.9", model=model, tcp=False).wait_ready(600)
    try:
        colocated_s = statistics.median([_ttft_colocated(colocated, p) for p in prompts][1:])
    finally:
        colocated.stop()
    rows = [row("ttft_4k_colocated", colocated_s * 1e3, "ms", "-", None)]
    # UCX's CUDA IPC transport (the default), sent after and overlapped with the reservation; then
    # --pd-direct-copy (our copy kernel into the mapped decode pool), overlapped.
    for direct, overlaps in ((False, (False, True)), (True, (True,))):
        flags = ("--pd-direct-copy",) if direct else ()
        prefill = Instance(*common, *flags, "--role", "prefill", "--block-size", "64", "--gpu-memory-utilization",
                           "0.45", model=model, tcp=False).wait_ready(600)
        decode = Instance(*common, *flags, "--role", "decode", "--block-size", "16", "--gpu-memory-utilization",
                          "0.45", model=model, tcp=False).wait_ready(600)
        try:
            for overlap in overlaps:
                rows.append(_ttft_pd_row(prefill, decode, prompts, colocated_s, overlap, direct))
        finally:
            prefill.stop()
            decode.stop()
    return rows


def _ttft_pd_row(prefill, decode, prompts: list[list[int]], colocated_s: float, overlap: bool, direct: bool) -> dict:
    # A first token of its own per round: neither side finds another round's prompts in its cache.
    first = 1 + overlap + 2 * direct
    runs = [_ttft_pd(prefill, decode, [first] + p, f"bench-{first}-{i}", overlap) for i, p in enumerate(prompts)][1:]
    pd_s = statistics.median(t for t, _ in runs)
    phases = {key: statistics.median(r[key] for _, r in runs)
              for key in ("reserve_s", "to_first_token_s", "prefill_answer_s", "prefill_s", "transfer_s", "last_write_s")}
    name = "ttft_4k_pd" + ("_overlap" if overlap else "") + ("_direct" if direct else "")
    print(f"TTFT 4k prompt{' (reservation overlapped)' if overlap else ''}{' (direct copy)' if direct else ''}: "
          f"colocated {colocated_s * 1e3:.1f} ms, PD {pd_s * 1e3:.1f} ms; medians: decode reservation "
          f"{phases['reserve_s'] * 1e3:.1f} ms, then decode's first token {phases['to_first_token_s'] * 1e3:.1f} ms "
          f"later (prefill's engine: admission to last chunk launched {phases['prefill_s'] * 1e3:.1f} ms, to the last "
          f"layer's write (first token known) {phases['last_write_s'] * 1e3:.1f} ms, first write to last notice "
          f"{phases['transfer_s'] * 1e3:.1f} ms; its answer after {phases['prefill_answer_s'] * 1e3:.1f} ms)")
    return row(name, pd_s * 1e3, "ms", "colocated TTFT", colocated_s / pd_s,
               **{f"{key}_median": value for key, value in phases.items()})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "receiver":
        receiver()
        return
    args = parse_args(__doc__.splitlines()[0])
    from bench_e2e_llama8b import checkpoint_dir

    copy_tbps = measure_copy_tbps()
    rows = transfer_rows(copy_tbps)
    torch.cuda.empty_cache()
    rows += ttft_rows(str(checkpoint_dir()))
    print(f"device: {device_name()}")
    write_json(args.json, "bench_pd", rows, copy_tbps=copy_tbps)


if __name__ == "__main__":
    main()
