"""Prints the summary table of a bench/gpu/run_all.sh run: test counts from the JUnit XML and
one line per benchmark row, and writes it as markdown and as one JSON (card, date, commit).

    python bench/gpu/summarize.py WORK_DIR [--markdown summary.md] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import subprocess
import xml.etree.ElementTree as ET


def test_counts(work_dir: str) -> dict:
    """Totals over the JUnit reports (one per test file) that run_all.sh wrote."""
    paths = sorted(glob.glob(os.path.join(work_dir, "junit_*.xml")))
    if not paths:
        return {"error": "no test report (pytest did not run)"}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "per_file": {}}
    for path in paths:
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        file_counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        for key, value in file_counts.items():
            counts[key] += value
        counts["per_file"][os.path.basename(path)[len("junit_"):-len(".xml")]] = file_counts
        counts["failed"] += [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                             if case.find("failure") is not None or case.find("error") is not None]
    return counts


def format_row(r: dict) -> tuple[str, str, str, str]:
    """(name, result, ceiling, ratio) of a row in the bench_util format; other formats show their
    text fields as the name and their numeric fields as the result."""
    if "value" in r and "unit" in r:
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        return r.get("name", "?"), f"{r['value']:.3g} {r['unit']}", r.get("ceiling", ""), ratio
    name = " ".join(str(v) for v in r.values() if isinstance(v, str))
    numbers = ", ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return name, numbers, "", ""


def git_commit() -> str:
    if os.environ.get("RTPLLM_COMMIT"):
        return os.environ["RTPLLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()

    tests = test_counts(args.work_dir)
    benches = []
    for path in sorted(glob.glob(os.path.join(args.work_dir, "bench_*.json"))):
        with open(path) as f:
            benches.append(json.load(f))
    device = next((b.get("device") or b.get("card") for b in benches if b.get("device") or b.get("card")), "unknown")

    lines = [f"GPU run on {device}, {datetime.date.today()}, commit {git_commit()[:12]}", ""]
    if "error" in tests:
        lines.append(f"tests/gpu: {tests['error']}")
    else:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines.append(f"tests/gpu: {passed} passed, {tests['failures'] + tests['errors']} failed, "
                     f"{tests['skipped']} skipped")
        for name, c in tests["per_file"].items():
            lines.append(f"  {name}: {c['tests'] - c['failures'] - c['errors'] - c['skipped']} passed, "
                         f"{c['failures'] + c['errors']} failed, {c['skipped']} skipped")
        lines += [f"  FAILED {name}" for name in tests["failed"][:20]]
    lines += ["", "| benchmark | result | ceiling | ratio |", "| --- | --- | --- | --- |"]
    for bench in benches:
        bench_name = bench.get("bench") or bench.get("benchmark") or "?"
        for r in bench.get("rows", []):
            lines.append(f"| {bench_name}: {' | '.join(format_row(r))} |")
    missing = [os.path.basename(p)[:-4] for p in glob.glob(os.path.join(args.work_dir, "bench_*.log"))
               if not os.path.exists(p[:-4] + ".json")]
    lines += [f"| {name} | no JSON written (see its log) | | |" for name in sorted(missing)]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "date": str(datetime.date.today()), "commit": git_commit(), "tests": tests,
                       "benchmarks": benches}, f, indent=1)


if __name__ == "__main__":
    main()
