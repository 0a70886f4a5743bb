# -*- test-case-name: tests.test_bench -*-
"""
Summarise a py-spy profile in collapsed-stack form (C{py-spy record --format
raw}, as C{bench/run.py --profile DIR} writes): the functions with the most
samples on top of the stack (self) and anywhere on it (inclusive).

    python bench/profile.py DIR/mtlsproxy-handshakes.txt [TOP]
"""

from __future__ import annotations

import collections
import sys


def summarise(path: str, top: int = 25) -> str:
    """
    The self and inclusive shares of the C{top} busiest functions of a collapsed-stack profile.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            total += n
            frames = [frame.split(" (")[0] + " (" + frame.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                      if " (" in frame else frame for frame in stack.split(";")]
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    lines = [f"{path}: {total} samples", "", "self:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
