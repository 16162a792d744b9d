"""Timing shared by the benchmark scripts."""

import time

import numpy as np


def median_ms(fn, repeats):
    """Median of ``repeats`` runs of ``fn`` in milliseconds, after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3
