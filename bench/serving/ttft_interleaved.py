"""TTFT of a 1-token prompt with 1 output token through LLM and through HTTP, measured in
alternating blocks so that both see the same machine.

Why: on a shared machine the speed of one engine step drifts by up to 2x within a minute (other
tenants), so `bench latency` followed by `bench serve` (server_vs_offline.sh, section 1) can
compare a fast minute with a slow one. Here each block runs BLOCK requests through an in-process
`LLM` (as `bench latency --input-len 1 --output-len 1 --batch-size 1` does), then BLOCK requests
over HTTP with the `bench serve` client (TTFT as it defines it), and so on; the first two requests
of each block warm up and are not counted. The two never run at the same time. Besides the medians
over all requests it reports the median over blocks of (HTTP block median - LLM block median),
which a slow minute shifts least.

Usage: python bench/serving/ttft_interleaved.py MODEL_DIR PORT [BLOCKS] [OUTPUT_JSON]
(a server on 127.0.0.1:PORT serving MODEL_DIR, as server_vs_offline.sh starts it)
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import aiohttp
import numpy as np

from rtpllm.benchmarks.request_client import RequestInput, send_request
from rtpllm.benchmarks.serve import run_event_loop
from rtpllm.engine.llm import LLM
from rtpllm.sampling_params import SamplingParams

BLOCK = 12
WARMUP_PER_BLOCK = 2


async def measure(model: str, port: int, blocks: int) -> dict:
    llm = LLM(model=model, num_blocks=256)
    tokenizer = llm.get_tokenizer()
    ordinary = np.setdiff1d(np.arange(len(tokenizer)), np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=1.0)
    base_url = f"http://127.0.0.1:{port}"
    llm_s: list[float] = []
    http_s: list[float] = []
    block_gaps: list[float] = []  # per block: median HTTP TTFT - median LLM TTFT
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(base_url + "/v1/models") as response:
            served = (await response.json())["data"][0]["id"]
        for block in range(blocks + 1):  # block 0 warms both paths up
            counted = len(llm_s), len(http_s)
            for i in range(BLOCK):
                prompt = [int(rng.choice(ordinary))]
                start = time.perf_counter()
                llm.generate([prompt], params, use_tqdm=False)
                if block and i >= WARMUP_PER_BLOCK:
                    llm_s.append(time.perf_counter() - start)
            for i in range(BLOCK):
                prompt = [int(rng.choice(ordinary))]
                result = await send_request(session, RequestInput(
                    api_url=base_url + "/v1/completions", model=served, prompt=prompt, prompt_len=1, output_len=1,
                    ignore_eos=True))
                if not result.success:
                    raise RuntimeError(f"HTTP request failed: {result.error}")
                if block and i >= WARMUP_PER_BLOCK:
                    http_s.append(result.ttft)
            if block:
                block_gaps.append(statistics.median(http_s[counted[1]:]) - statistics.median(llm_s[counted[0]:]))
    llm_ms, http_ms = statistics.median(llm_s) * 1e3, statistics.median(http_s) * 1e3
    return {"blocks": blocks, "requests_per_path": len(llm_s), "llm_ttft_median_ms": llm_ms,
            "http_ttft_median_ms": http_ms, "overhead_ms": http_ms - llm_ms,
            "overhead_block_median_ms": statistics.median(block_gaps) * 1e3}


def main() -> None:
    model, port = sys.argv[1], int(sys.argv[2])
    blocks = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    result = run_event_loop(measure(model, port, blocks))  # uvloop, as `bench serve` runs
    print(f"TTFT median, interleaved ({result['requests_per_path']} requests each): LLM "
          f"{result['llm_ttft_median_ms']:.2f} ms, HTTP {result['http_ttft_median_ms']:.2f} ms, "
          f"overhead {result['overhead_ms']:.2f} ms; median over blocks of the difference "
          f"{result['overhead_block_median_ms']:.2f} ms")
    if len(sys.argv) > 4:
        with open(sys.argv[4], "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
