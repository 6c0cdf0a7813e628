"""The benchmarks' one clock: a call's wall time in ms, after warm-up calls, as median and p95."""
from __future__ import annotations

import statistics
import time

import numpy as np


def timed(call, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, p95) of `call`'s wall time in ms after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), float(np.percentile(times, 95))
