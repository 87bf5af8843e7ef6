#!/usr/bin/env bash
# The server's overhead, measured two ways on one model (default: a tiny random Llama):
#   1. time to first token of a 1-token prompt with 1 output token: over HTTP (`bench serve`,
#      one request at a time) against the same request through LLM (`bench latency`);
#   2. output throughput of 500 concurrent streaming HTTP clients against `bench throughput`
#      (offline, the same 500 requests), then a check that no KV block is left held.
#
# Usage: bash bench/serving/server_vs_offline.sh [MODEL_DIR] [RESULTS_DIR]
# Env:   SERVER_CPUS / CLIENT_CPUS  taskset CPU lists for the engine side (server and offline runs)
#                                   and for the load generator (default: no pinning)
#        STREAM_INTERVALS           server --stream-interval values to try (default "1 8")
#        SERVER_ARGS                more `rtpllm serve` options, e.g. "--http h11 --loop asyncio"
#        NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN  the throughput workload (default 500, 32, 128)
#        TTFT_BLOCKS                blocks of the interleaved TTFT comparison (default 30)
#        SKIP_TTFT=1                leave section 1 out (e.g. a second run with other SERVER_ARGS)
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-}"
results="${2:-bench/results/tmp/serving-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$results"
if [ -z "$model" ]; then
  model="$results/tiny-llama"
  [ -d "$model" ] || python3 -m rtpllm.tools.random_checkpoint --shape llama-3.2-1b --tiny --out "$model" >/dev/null
fi
pin() { local cpus="$1"; shift; if [ -n "$cpus" ]; then taskset -c "$cpus" "$@"; else "$@"; fi; }
engine_side() { pin "${SERVER_CPUS:-}" "$@"; }
client_side() { pin "${CLIENT_CPUS:-}" "$@"; }
rtpllm=(python3 -m rtpllm.serving.cli --log-level WARNING)
n="${NUM_PROMPTS:-500}"; in_len="${INPUT_LEN:-32}"; out_len="${OUTPUT_LEN:-128}"
blocks=$(( n * ((in_len + out_len) / 16 + 2) + 64 ))
port=$(( 20000 + RANDOM % 20000 ))
server_pid=""

start_server() {  # start_server STREAM_INTERVAL EXTRA_ARGS...
  local interval="$1"; shift
  local pinned=()
  [ -z "${SERVER_CPUS:-}" ] || pinned=(taskset -c "$SERVER_CPUS")
  # Started directly (not through a shell function) so that $! is the server itself and
  # stop_server's SIGTERM reaches it: a server left running would take CPU from later runs.
  # shellcheck disable=SC2086  # SERVER_ARGS is a list of options
  "${pinned[@]}" "${rtpllm[@]}" serve --model "$model" --port "$port" --stream-interval "$interval" \
    --disable-uvicorn-access-log --uvicorn-log-level warning ${SERVER_ARGS:-} "$@" >"$results/server-$port.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || { cat "$results/server-$port.log"; return 1; }
    sleep 0.5
  done
  echo "server did not come up"; return 1
}
stop_server() { kill -TERM "$server_pid"; wait "$server_pid" || true; port=$((port + 1)); }
metric() { curl -s "http://127.0.0.1:$port/metrics" | awk -v m="rtpllm:$1" '$1 ~ "^"m"([{]|$)" {s += $2} END {print s + 0}'; }

if [ "${SKIP_TTFT:-0}" != "1" ]; then
echo "== 1. TTFT, 1-token prompt, 1 output token"
engine_side "${rtpllm[@]}" bench latency --model "$model" --num-blocks 256 --input-len 1 --output-len 1 \
  --batch-size 1 --num-iters-warmup 30 --num-iters 300 --output-json "$results/ttft_llm.json" | tail -8
start_server 1 --num-blocks 256
client_side "${rtpllm[@]}" bench serve --port "$port" --model "$model" --dataset-name random --random-input-len 1 \
  --random-output-len 1 --num-prompts 300 --num-warmups 30 --max-concurrency 1 --ignore-eos --disable-tqdm \
  --metric-percentiles 50,90,99 --output-json "$results/ttft_http.json" | grep -E "TTFT|Successful"
# The same comparison in alternating blocks (LLM, then HTTP, ...), immune to the machine's speed
# drifting between the two runs above; see ttft_interleaved.py. Not pinned: it runs both sides.
python3 bench/serving/ttft_interleaved.py "$model" "$port" "${TTFT_BLOCKS:-30}" "$results/ttft_interleaved.json"
stop_server
fi

echo "== 2. throughput, $n requests of $in_len prompt + $out_len output tokens"
engine_side "${rtpllm[@]}" bench throughput --model "$model" --num-blocks "$blocks" --max-num-seqs 512 \
  --dataset-name random --random-input-len "$in_len" --random-output-len "$out_len" --num-prompts "$n" \
  --disable-tqdm --output-json "$results/throughput_offline.json"
for interval in ${STREAM_INTERVALS:-1 8}; do
  start_server "$interval" --num-blocks "$blocks" --max-num-seqs 512
  client_side "${rtpllm[@]}" bench serve --port "$port" --model "$model" --dataset-name random \
    --random-input-len "$in_len" --random-output-len "$out_len" --num-prompts "$n" --max-concurrency "$n" \
    --ignore-eos --disable-tqdm --output-json "$results/throughput_server_interval$interval.json" \
    | grep -E "Successful|Failed|Output token throughput|Mean TTFT|Mean ITL"
  echo "after the run: running=$(metric num_requests_running) kv_blocks_used=$(metric kv_cache_blocks_used)"
  stop_server
done

python3 - "$results" <<'PY'
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
print("\n== summary")
if (results / "ttft_http.json").exists():
    llm = json.loads((results / "ttft_llm.json").read_text())
    http = json.loads((results / "ttft_http.json").read_text())
    llm_ms, http_ms = llm["percentiles"]["p50"] * 1000, http["ttft_ms"]["median"]
    print(f"TTFT median: LLM {llm_ms:.2f} ms, HTTP {http_ms:.2f} ms, overhead {http_ms - llm_ms:.2f} ms")
    inter = json.loads((results / "ttft_interleaved.json").read_text())
    print(f"TTFT median, interleaved blocks: LLM {inter['llm_ttft_median_ms']:.2f} ms, "
          f"HTTP {inter['http_ttft_median_ms']:.2f} ms, overhead {inter['overhead_ms']:.2f} ms "
          f"(median of per-block differences {inter['overhead_block_median_ms']:.2f} ms)")
offline = json.loads((results / "throughput_offline.json").read_text())["output_tokens_per_second"]
print(f"offline output throughput: {offline:.0f} tok/s")
for path in sorted(results.glob("throughput_server_interval*.json")):
    server = json.loads(path.read_text())
    print(f"{path.stem}: {server['output_throughput']:.0f} tok/s = {server['output_throughput'] / offline:.0%} "
          f"of offline, {server['failed']} failed")
PY
echo "results in $results"
