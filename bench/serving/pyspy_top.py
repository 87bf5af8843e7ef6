"""The functions a py-spy profile spends its samples in (inclusive and self shares), from
`py-spy record -f raw` output: one line per distinct stack, "frame;frame;... count".

Usage: python3 bench/serving/pyspy_top.py PROFILE.txt [--top N]
"""

from __future__ import annotations

import argparse
import collections


def frame_name(frame: str) -> str:
    """"function (path/to/file.py:123)" -> "function file.py:123"."""
    function, _, where = frame.partition(" (")
    return f"{function} {where.rstrip(')').rsplit('/', 1)[-1]}" if where else function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frames = [frame_name(frame) for frame in stack.split(";")]
            n = int(count)
            total += n
            for name in set(frames):  # a recursive function counts once per sample
                inclusive[name] += n
            own[frames[-1]] += n
    print(f"{total} samples")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title}")
        for name, n in counter.most_common(args.top):
            print(f"{100 * n / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
