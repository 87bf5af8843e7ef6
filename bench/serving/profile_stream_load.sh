#!/usr/bin/env bash
# Where the 500-client run's CPU goes: one `rtpllm serve` run under the load of
# stream_load_rounds.sh, with py-spy sampling the engine process and the server process, and the
# CPU seconds each of them (and the load generator) used. Prints the top frames of each profile
# (bench/serving/pyspy_top.py); the raw profiles stay in RESULTS_DIR.
#
# Usage: bash bench/serving/profile_stream_load.sh [MODEL_DIR]   (default: a tiny random Llama)
# Env:   NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN (default 500, 32, 128); RESULTS_DIR (default a temp dir);
#        SERVE_ARGS (more `rtpllm serve` options, e.g. --no-engine-process); TOP (frames shown, 30)
# Needs py-spy on PATH (`pip install py-spy`; on a machine without a network, carry its wheel).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v py-spy >/dev/null || { echo "py-spy is not installed"; exit 1; }
results="${RESULTS_DIR:-$(mktemp -d)}"
mkdir -p "$results"
model="${1:-$results/tiny-llama}"
[ -d "$model" ] || python3 -m rtpllm.tools.random_checkpoint --shape llama-3.2-1b --tiny --out "$model" >/dev/null
n="${NUM_PROMPTS:-500}"; in_len="${INPUT_LEN:-32}"; out_len="${OUTPUT_LEN:-128}"
blocks=$(( n * ((in_len + out_len) / 16 + 2) + 64 ))
rtpllm=(python3 -m rtpllm.serving.cli --log-level WARNING)
port=$(( 20000 + RANDOM % 20000 ))
cpu_s() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }

# shellcheck disable=SC2086  # SERVE_ARGS is a list of options
"${rtpllm[@]}" serve --model "$model" --port "$port" --num-blocks "$blocks" --max-num-seqs 512 \
  --disable-uvicorn-access-log --uvicorn-log-level warning ${SERVE_ARGS:-} >"$results/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
engine=$(pgrep -P "$server" -f rtpllm.engine.link.engine_core || true)  # none with --no-engine-process

samplers=()
for pid in $server $engine; do
  name=$([ "$pid" = "$server" ] && echo server || echo engine)
  py-spy record -p "$pid" -r 200 -f raw -o "$results/$name.txt" --nonblocking >/dev/null 2>&1 &
  samplers+=($!)
done
sleep 1
server_before=$(cpu_s "$server"); engine_before=$([ -n "$engine" ] && cpu_s "$engine" || echo 0)
/usr/bin/time -f "%U %S" -o "$results/client.time" "${rtpllm[@]}" bench serve --port "$port" --model "$model" \
  --dataset-name random --random-input-len "$in_len" --random-output-len "$out_len" --num-prompts "$n" \
  --max-concurrency "$n" --ignore-eos --disable-tqdm --output-json "$results/serve.json" >/dev/null
server_after=$(cpu_s "$server"); engine_after=$([ -n "$engine" ] && cpu_s "$engine" || echo 0)
kill -INT "${samplers[@]}" 2>/dev/null || true
wait "${samplers[@]}" 2>/dev/null || true

python3 - "$results" "$server_before" "$server_after" "$engine_before" "$engine_after" <<'PY'
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
server_s, engine_s = (float(sys.argv[3]) - float(sys.argv[2])), (float(sys.argv[5]) - float(sys.argv[4]))
client_s = sum(map(float, (results / "client.time").read_text().split()))
run = json.loads((results / "serve.json").read_text())
print(f"{run['output_throughput']:.0f} output tok/s over {run['duration_s']:.2f} s, {run['failed']} failed; "
      f"CPU seconds during the run: server {server_s:.2f}, engine process {engine_s:.2f}, "
      f"load generator {client_s:.2f} (its start-up included)")
PY
for name in engine server; do
  [ -s "$results/$name.txt" ] || continue
  echo "== $name process (py-spy, inclusive share of samples)"
  python3 bench/serving/pyspy_top.py "$results/$name.txt" --top "${TOP:-30}"
done
echo "profiles: $results/{engine,server}.txt (py-spy raw format)"
