"""How long each phase of start-up took, logged once as one INFO line per process.

    phases = StartupPhases("engine")
    with phases.phase("weights"):
        ...
    phases.detail("weights", [("headers", 0.01), ("read", 0.8)])   # what the phase was made of
    phases.add_parallel("tokenizer", 1.2)                          # ran on a thread meanwhile
    phases.log()   # engine start-up 9.8 s since process start: imports 2.1 s, weights 4.2 s (headers ...), ...

`since_process_start()` measures from the moment the OS started the process, so the interpreter's
own start and the imports before any of our code ran are counted too.

A server that runs its engine in a process of its own receives the engine's phases
(`as_dict`, sent with the engine's "ready") and prints both in its one line (`add_process`).
With $RTPLLM_STARTUP_REPORT set to a file, `log()` also appends the phases there as one JSON
line per process (benchmarks read it: bench/gpu/bench_startup.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator, Optional

logger = logging.getLogger("rtpllm.startup")

REPORT_ENV = "RTPLLM_STARTUP_REPORT"

Parts = list[tuple[str, float]]


def since_process_start() -> Optional[float]:
    """Seconds since this process started (Linux: /proc), None where the OS does not tell."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (after the parenthesized command name, which may hold spaces): start time in ticks.
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class StartupPhases:
    def __init__(self, who: str, level: int = logging.INFO):
        self.who = who
        self.level = level  # an engine inside a server logs at DEBUG: the server's line carries it
        self.phases: list[tuple[str, float]] = []  # in order, back to back
        self.details: dict[str, Parts] = {}  # what a phase was made of, by phase name
        self.parallel: Parts = []  # work on other threads, overlapped with the phases
        self.parallel_details: dict[str, Parts] = {}  # what that work was made of, by name
        self.processes: list[dict] = []  # other processes' phases (`as_dict`), e.g. the engine's

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.phases.append((name, seconds))

    def detail(self, name: str, parts: Parts) -> None:
        """Records what phase `name` was made of (shown in brackets after it)."""
        if parts:
            self.details[name] = list(parts)

    def add_parallel(self, name: str, seconds: float, parts: Parts = ()) -> None:
        """Work on another thread, overlapped with the phases; `parts` what it was made of."""
        self.parallel.append((name, seconds))
        if parts:
            self.parallel_details[name] = list(parts)

    def absorb(self, name: str, other: Optional["StartupPhases"]) -> None:
        """Phase `name` was `other`'s phases (a load's breakdown): they become its details, and
        `other`'s work on threads is counted as this one's."""
        if other is not None:
            self.detail(name, other.phases)
            self.parallel.extend(other.parallel)
            self.parallel_details.update(other.parallel_details)

    def add_process(self, report: Optional[dict]) -> None:
        if report:
            self.processes.append(report)

    def seconds(self, name: str) -> float:
        return sum(s for n, s in self.phases if n == name)

    def as_dict(self) -> dict:
        return {"who": self.who, "since_process_start": since_process_start(),
                "phases": [{"name": n, "seconds": s, "parts": [{"name": pn, "seconds": ps}
                                                               for pn, ps in self.details.get(n, [])]}
                           for n, s in self.phases],
                "parallel": [{"name": n, "seconds": s, "parts": [{"name": pn, "seconds": ps}
                                                                 for pn, ps in self.parallel_details.get(n, [])]}
                             for n, s in self.parallel],
                "processes": list(self.processes)}

    def summary(self) -> str:
        return _summary(self.as_dict())

    def log(self) -> None:
        report = self.as_dict()
        logger.log(self.level, "%s", _summary(report))
        path = os.environ.get(REPORT_ENV)
        if path:
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(report) + "\n")
            except OSError as e:
                logger.warning("cannot append the start-up report to %s (%s)", path, e)


def _summary(report: dict) -> str:
    def parts(items: list[dict]) -> str:
        return ", ".join(f"{item['name']} {item['seconds']:.2f} s" for item in items)

    phases = []
    for phase in report["phases"]:
        text = f"{phase['name']} {phase['seconds']:.2f} s"
        if phase["parts"]:
            text += f" ({parts(phase['parts'])})"
        phases.append(text)
    total = report.get("since_process_start")
    head = f"{report['who']} start-up" + (f" {total:.2f} s since process start" if total is not None else "")
    line = f"{head}: {', '.join(phases)}"
    if report["parallel"]:
        line += "; on threads meanwhile: " + ", ".join(
            f"{item['name']} {item['seconds']:.2f} s" + (f" ({parts(item['parts'])})" if item.get("parts") else "")
            for item in report["parallel"])
    for process in report.get("processes", []):
        line += f" | {_summary(process)}"
    return line
