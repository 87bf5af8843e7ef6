"""bench/serving/streaming_work.py runs and measures what a stream costs the engine per token."""

import pathlib
import subprocess
import sys

from checkpoints import checkpoint_path

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "serving" / "streaming_work.py"


def test_streaming_work_bench_reports_both_cases():
    result = subprocess.run([sys.executable, str(SCRIPT), checkpoint_path("llama3"), "--requests", "3",
                             "--tokens", "5", "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["no stop strings", "one stop string"]
    assert all("us per token" in line for line in lines)

