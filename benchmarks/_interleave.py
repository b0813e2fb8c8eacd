"""Interleaved timing for the benchmarks: the arms being compared alternate rep by rep in one process, so load
from other jobs on a shared machine hits every arm alike; each rep gives one paired ratio, and a benchmark reports
the median ratio and its min-max over the reps (the spread says how much the machine's load moved it)."""
from __future__ import annotations

import statistics
import time


def interleave(arms: dict, reps: int) -> dict:
    """{name: [seconds per rep]}: every rep calls every arm once, in an order that alternates between reps."""
    if reps < 5:
        raise ValueError(f"reps={reps!r} is not allowed: at least 5 interleaved reps give a median and a spread")
    names, out = list(arms), {name: [] for name in arms}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            arms[name]()
            out[name].append(time.perf_counter() - t)
    return out


def ratio(slow: list, fast: list) -> tuple[float, float, float]:
    """(median, min, max) of the paired per-rep ratios slow_i / fast_i."""
    r = [s / f for s, f in zip(slow, fast)]
    return statistics.median(r), min(r), max(r)


def ratio_text(slow: list, fast: list) -> str:
    med, lo, hi = ratio(slow, fast)
    return f"{med:.2f}x (min-max {lo:.2f}-{hi:.2f}x over {len(slow)} reps)"
