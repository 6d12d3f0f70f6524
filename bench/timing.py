"""Timing the benches share: forms of one computation measured in turns, so load drifts hit them alike."""
from __future__ import annotations

import time


def interleaved(steps: dict, rounds: int) -> dict:
    """{name: [seconds per round]}: after one warm-up call each, the steps take turns (A B C A B C ...)."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times
