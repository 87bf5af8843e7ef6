"""How long each phase of start-up took, logged once as one INFO line per process.

    phases = StartupPhases("engine")
    with phases.phase("weights"):
        ...
    phases.log()   # engine start-up 9.8 s: imports 2.1 s, weights 4.2 s, kv cache 0.3 s, ...

`since_process_start()` measures from the moment the OS started the process, so the interpreter's
own start and the imports before any of our code ran are counted too.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator, Optional

logger = logging.getLogger("rtpllm.startup")


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
    def __init__(self, who: str):
        self.who = who
        self.phases: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.phases.append((name, seconds))

    def seconds(self, name: str) -> float:
        return sum(s for n, s in self.phases if n == name)

    def summary(self) -> str:
        total = since_process_start()
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.phases)
        head = f"{self.who} start-up" + (f" {total:.2f} s since process start" if total is not None else "")
        return f"{head}: {parts}"

    def log(self) -> None:
        logger.info("%s", self.summary())
