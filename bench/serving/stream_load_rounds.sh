#!/usr/bin/env bash
# The 500-client comparison of server_vs_offline.sh (section 2), in alternating runs: offline
# `bench throughput`, `rtpllm serve` with its engine in a process of its own, offline again, the
# server with the engine in a thread of its own process (--no-engine-process), offline again, ...
# all on the same 500 streaming requests. On a shared machine the engine's speed drifts by up to 2x
# within a minute, so each server run is compared with the mean of the two offline runs around it;
# the medians over rounds are printed last.
#
# Usage: bash bench/serving/stream_load_rounds.sh [ROUNDS] [MODEL_DIR]   (default 3, a tiny random Llama)
# Env:   NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN (default 500, 32, 128); RESULTS_DIR (default a temp dir)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-3}"
results="${RESULTS_DIR:-$(mktemp -d)}"
model="${2:-$results/tiny-llama}"
[ -d "$model" ] || python3 -m rtpllm.tools.random_checkpoint --shape llama-3.2-1b --tiny --out "$model" >/dev/null
n="${NUM_PROMPTS:-500}"; in_len="${INPUT_LEN:-32}"; out_len="${OUTPUT_LEN:-128}"
blocks=$(( n * ((in_len + out_len) / 16 + 2) + 64 ))
rtpllm=(python3 -m rtpllm.serving.cli --log-level WARNING)
engine=(--num-blocks "$blocks" --max-num-seqs 512)
workload=(--dataset-name random --random-input-len "$in_len" --random-output-len "$out_len" --num-prompts "$n")
port=$(( 20000 + RANDOM % 20000 ))

served() {  # served NAME EXTRA_SERVE_ARGS...: output tok/s of the 500 clients, into $results/NAME.json
  local name="$1"; shift
  port=$((port + 1))
  "${rtpllm[@]}" serve --model "$model" --port "$port" "${engine[@]}" --disable-uvicorn-access-log \
    --uvicorn-log-level warning "$@" >"$results/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
  "${rtpllm[@]}" bench serve --port "$port" --model "$model" "${workload[@]}" --max-concurrency "$n" --ignore-eos \
    --disable-tqdm --output-json "$results/$name.json" >/dev/null
  local leaked
  leaked=$(curl -s "http://127.0.0.1:$port/metrics" | awk '$1 ~ /^rtpllm:kv_cache_blocks_used/ {s += $2} END {print s + 0}')
  kill -TERM "$pid"; wait "$pid" || true
  [ "$leaked" = "0" ] || echo "KV blocks still held after the run: $leaked"
}

offline() {  # offline INDEX
  "${rtpllm[@]}" bench throughput --model "$model" "${engine[@]}" "${workload[@]}" --disable-tqdm \
    --output-json "$results/offline-$1.json" >/dev/null
}

report() {  # report ROUNDS_DONE [final]: the newest round's line; with "final", every round and the medians
  python3 - "$results" "$@" <<'PY'
import json, pathlib, statistics, sys
results, done, final = pathlib.Path(sys.argv[1]), int(sys.argv[2]), len(sys.argv) > 3
def tok_s(name, key):
    return json.loads((results / f"{name}.json").read_text())[key]
ratios = {"process": [], "thread": []}
for r in range(1, done + 1):
    line = f"round {r}:"
    for i, mode in enumerate(ratios):
        before, after = (tok_s(f"offline-{2 * r - 2 + k}", "output_tokens_per_second") for k in (i, i + 1))
        run = json.loads((results / f"{mode}-{r}.json").read_text())
        ratios[mode].append(run["output_throughput"] / ((before + after) / 2))
        line += (f" {mode} {run['output_throughput']:.0f} tok/s between offline {before:.0f} and {after:.0f} "
                 f"({ratios[mode][-1]:.0%}, {run['failed']} failed);")
    if final or r == done:
        print(line, flush=True)
if final:
    for mode, values in ratios.items():
        print(f"median share of offline, engine in a {mode}: {statistics.median(values):.0%}")
PY
}

offline 0
for round in $(seq "$rounds"); do
  served "process-$round"
  offline $((2 * round - 1))
  served "thread-$round" --no-engine-process
  offline $((2 * round))
  report "$round"
done
echo "== all rounds"
report "$rounds" final
