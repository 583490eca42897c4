"""The one latency timer: wall-clock milliseconds per call, warm-up discarded, reported as percentiles.

The benchmark worker times one artifact per process with `time_calls`; the quantization report times its
variants side by side with `time_interleaved`. Both report the same percentile figures.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def percentiles(times_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min in milliseconds (median_ms is p50, kept for the quantization report's readers)."""
    ms = np.asarray(times_s) * 1000
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "median_ms": p50, "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "runs": len(times_s)}


def time_calls(fn: Callable[[int], Any], runs: int, warmup: int) -> dict[str, float]:
    """Percentiles of `fn(i)` over `runs` timed calls after `warmup` untimed ones (i counts the calls, so
    a caller can cycle through its inputs and no single input stays cached)."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def time_batch1(runner: Any, images: np.ndarray, runs: int, warmup: int) -> dict[str, float]:
    """A runner's latency at batch 1, cycling through the images."""
    n = images.shape[0]
    return time_calls(lambda i: runner.run(images[i % n:i % n + 1]), runs, warmup)


def time_interleaved(fns: dict[str, Callable[[], Any]], runs: int = 30, warmup: int = 3) -> dict[str, dict]:
    """Percentiles per function. The functions take turns within each round, so CPU contention from
    other processes spreads over all of them instead of penalising whichever ran last."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    return {k: percentiles(v) for k, v in samples.items()}
