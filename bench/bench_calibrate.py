"""Benchmark: ``calibrate`` at 10^3, 10^5 and 10^6 items with the default 5000-point grid.

Baseline (same run): the direct implementation that counts n(λ) and k(λ) with one
masked pass over the data per grid point — O(N·|grid|) instead of our
O(N log N + |grid|). It is too slow to run at 10^6 items, so it is timed at 10^3
and 10^5 only. Data is drawn once per size, outside the timed calls.

    python -m pytest bench/bench_calibrate.py --benchmark-min-rounds=5
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from intercascade_core import calibrate

ALPHA, DELTA = 0.15, 0.1
SIZES = [10**3, 10**5, 10**6]


def make_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    conf = rng.uniform(size=n)
    # P(wrong | c) = 0.6 (1 - c)^2, so R(λ) = 0.2 (1 - λ)^2: the top thresholds pass
    # easily and FST walks most of the grid down to λ̂ ≈ 0.13 (its worst case).
    correct = rng.uniform(size=n) >= 0.6 * (1 - conf) ** 2
    return conf, correct


DATA = {n: make_data(n) for n in SIZES}


def per_threshold_scan(conf: np.ndarray, correct: np.ndarray) -> float:
    grid = np.linspace(0, 1, 5000)
    wrong = ~correct
    lam_hat = np.inf
    for lam in grid[::-1]:
        accepted = conf >= lam
        n = int(accepted.sum())
        if n < 30:
            continue
        if stats.binom.cdf(int((accepted & wrong).sum()), n, ALPHA) <= DELTA:
            lam_hat = lam
        else:
            break
    return float(lam_hat)


@pytest.mark.parametrize("n", SIZES)
def test_calibrate(benchmark, n):
    conf, correct = DATA[n]
    benchmark.group = f"calibrate n={n:.0e}"
    benchmark.extra_info["implementation"] = "sort + searchsorted"
    result = benchmark(calibrate, conf, correct, alpha=ALPHA, delta=DELTA)
    if n <= 10**5:
        assert result.threshold == per_threshold_scan(conf, correct)


@pytest.mark.parametrize("n", SIZES[:2])
def test_per_threshold_scan_baseline(benchmark, n):
    conf, correct = DATA[n]
    benchmark.group = f"calibrate n={n:.0e}"
    benchmark.extra_info["implementation"] = "one pass per threshold (baseline)"
    benchmark.pedantic(per_threshold_scan, args=(conf, correct), rounds=3, iterations=1)
