#!/usr/bin/env python3
"""Per-step losses of two runs (their metrics.jsonl), step by step.

usage: compare_losses.py RUN_A RUN_B STEPS [TOLERANCE=1e-6]
Fails unless both runs logged exactly STEPS lines, for the same steps, each with a finite loss,
and the largest |difference| is <= TOLERANCE (0 asks for equality)."""
import json
import math
import os
import sys


def losses(run):
    path = os.path.join(run, "metrics.jsonl")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            m = json.loads(line)
            loss = m.get("loss")
            if not isinstance(loss, (int, float)) or not math.isfinite(loss):
                sys.exit(f"{path}:{n}: loss {loss!r} is not a finite number")
            rows.append((m.get("step"), float(loss)))
    return rows


def main():
    a, b, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tol = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-6
    la, lb = losses(a), losses(b)
    name = lambda p: os.path.basename(os.path.normpath(p))
    if len(la) != steps or len(lb) != steps:
        sys.exit(f"{name(a)} vs {name(b)}: expected {steps} steps each, got {len(la)} and {len(lb)}")
    if [s for s, _ in la] != [s for s, _ in lb]:
        sys.exit(f"{name(a)} vs {name(b)}: the steps differ: {[s for s, _ in la]} vs {[s for s, _ in lb]}")
    diff = max(abs(x - y) for (_, x), (_, y) in zip(la, lb))
    print(f"{name(a)} vs {name(b)}: {steps} steps, max |loss difference| {diff:.3g} (tolerance {tol:g})")
    sys.exit(0 if diff <= tol else 1)


main()
