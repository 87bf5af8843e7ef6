#!/usr/bin/env bash
# On a machine with a CUDA GPU: builds rtpllm with the CUDA kernels, runs every GPU test
# (tests/gpu) and every GPU benchmark (bench/gpu/bench_*.py), and prints a summary table last.
#
# Usage: bash bench/gpu/run_all.sh [--quick]     (--quick: headline benchmark configurations only)
#        RTPLLM_SKIP_BUILD=1 skips the build when rtpllm._C with the kernels is already importable;
#        GPU_TESTS / GPU_BENCHES narrow the run (default: tests/gpu/test_*.py and bench/gpu/bench_*.py;
#        "none" runs none);
#        RTPLLM_COMMIT names the commit where the tree is a copy without .git (the device tool's);
#        GPU_DEADLINE_S (default 560) bounds the whole run: each test file or benchmark gets what is
#        left and the rest are skipped, so the summary is written before a caller's time limit.
# Results go to $OUT when it is set (the device tool's output folder), else to
# bench/results/tmp/gpu-<date>/: summary.md, results.json (one JSON of everything, with the card,
# date and commit) and logs.tar.gz (build, test and benchmark logs, per-benchmark JSON).
# A benchmark script takes `--json PATH` (format in bench/gpu/bench_util.py); its rows appear in
# the table. Exit status: nonzero when the build, a test or a benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
quick=""
[ "${1:-}" = "--quick" ] && quick="--quick"

out_dir="${OUT:-bench/results/tmp/gpu-$(date +%Y%m%d-%H%M%S)}"
work="$(mktemp -d)"
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1
# (GNU nproc honours OMP_NUM_THREADS, which benchmarks set to 1; the build should use every core)
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
status=0
run_start=$(date +%s)
deadline="${GPU_DEADLINE_S:-560}"
# Seconds left before the deadline (0 or less: none).
left() { echo $(( deadline - ($(date +%s) - run_start) )); }

bundle() { tar -czf "$out_dir/logs.tar.gz" -C "$work" . 2>/dev/null; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  echo "commit: ${RTPLLM_COMMIT:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
} > "$work/environment.txt" 2>&1
cat "$work/environment.txt"

echo "== build (RTPLLM_CUDA=1)"
start=$(date +%s)
if [ "${RTPLLM_SKIP_BUILD:-0}" = "1" ]; then
  echo "skipped (RTPLLM_SKIP_BUILD=1: rtpllm._C is already built with the CUDA kernels)"
elif RTPLLM_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . -q >"$work/build.log" 2>&1; then
  echo "built in $(( $(date +%s) - start )) s"
else
  tail -40 "$work/build.log"
  echo "BUILD FAILED (log: logs.tar.gz/build.log)"
  bundle
  exit 1
fi

# One pytest process per file: a kernel fault (illegal address) poisons only its own file's CUDA context.
for test_file in ${GPU_TESTS:-tests/gpu/test_*.py}; do
  [ "$test_file" = "none" ] && continue
  name="$(basename "$test_file" .py)"
  echo "== $name"
  if [ "$(left)" -le 5 ]; then echo "skipped: GPU_DEADLINE_S reached"; status=1; continue; fi
  timeout "$(left)" python3 -m pytest "$test_file" -q -p no:cacheprovider --junitxml="$work/junit_$name.xml" >"$work/$name.log" 2>&1 \
    || status=1
  tail -15 "$work/$name.log"
  bundle
done

for bench in ${GPU_BENCHES:-bench/gpu/bench_*.py}; do
  [ "$bench" = "none" ] && continue
  name="$(basename "$bench" .py)"
  [ "$name" = "bench_util" ] && continue  # the benchmarks' shared helpers, not a benchmark
  echo "== $name"
  if [ "$(left)" -le 5 ]; then echo "skipped: GPU_DEADLINE_S reached"; status=1; continue; fi
  if ! timeout "$(left)" python3 "$bench" --json "$work/$name.json" $quick 2>&1 | tee "$work/$name.log"; then
    status=1
    echo "$name FAILED" | tee -a "$work/$name.log"
  fi
  bundle
done

python3 bench/gpu/summarize.py "$work" --markdown "$out_dir/summary.md" --json "$out_dir/results.json" || status=1
bundle
rm -rf "$work"
exit $status
