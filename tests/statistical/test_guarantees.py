"""Seeded repeated-experiment tests of the (α, δ) guarantee (algorithms.md §9, 11–13).

Each test draws R = 2000 independent calibration sets from a distribution whose true
risk curve is known in closed form, calibrates on each, and counts the runs V whose
chosen threshold violates the guarantee. Under the guarantee V ~ Bin(R, p) with
p <= δ, so the test asserts V <= binom.ppf(1 - 1e-6, R, δ): its false-failure
probability is at most 1e-6 (scipy's pattern: fixed seed + binomial slack, never a raw
rate compared with δ). Each test also runs a deliberately mis-calibrated rule (the
plain empirical risk, no confidence bound) through the same check and asserts that
it fails it, so the check has power.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from intercascade_core import calibrate, calibrate_cascade

pytestmark = pytest.mark.statistical

R = 2000
ALPHA, DELTA = 0.15, 0.1
GRID = np.linspace(0, 1, 201)
FALSE_FAILURE = 1e-6


def allowed_violations(delta: float = DELTA) -> int:
    # P(Bin(R, δ) > this) <= 1e-6  (= 267 for R = 2000, δ = 0.1)
    return int(stats.binom.ppf(1 - FALSE_FAILURE, R, delta))


def naive_threshold(conf: np.ndarray, correct: np.ndarray, alpha: float, min_n: int = 30) -> float:
    """The mis-calibrated rule: lowest λ whose *empirical* risk is <= α (no bound)."""
    for lam in GRID:
        acc = conf >= lam
        if acc.sum() >= min_n and (acc & ~correct).sum() / acc.sum() <= alpha:
            return float(lam)
    return math.inf


def true_risk_linear(lam: float) -> float:
    """conf ~ U(0, 1), P(wrong | c) = 0.1 + 0.5 (1 - c)  =>  R(λ) = 0.1 + 0.25 (1 - λ)."""
    return 0.1 + 0.25 * (1 - lam)


def draw_linear(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    conf = rng.uniform(size=n)
    wrong = rng.uniform(size=n) < 0.1 + 0.5 * (1 - conf)
    return conf, ~wrong


def test_selective_risk_guarantee_on_known_distribution():
    """Invariant 11: P(R(λ̂) > α) <= δ. Observed violations are far below the allowance
    (seed 11: 26 of 2000 runs); the naive rule violates in 1224 of them."""
    rng = np.random.default_rng(11)
    violations = naive_violations = 0
    for _ in range(R):
        conf, correct = draw_linear(rng, 400)
        lam = calibrate(conf, correct, alpha=ALPHA, delta=DELTA, grid=GRID).threshold
        violations += math.isfinite(lam) and true_risk_linear(lam) > ALPHA
        naive = naive_threshold(conf, correct, ALPHA)
        naive_violations += math.isfinite(naive) and true_risk_linear(naive) > ALPHA
    assert violations <= allowed_violations()
    assert naive_violations > allowed_violations()  # power: a rule without the bound fails


@pytest.mark.parametrize("p_wrong", [ALPHA, ALPHA + 0.02])
def test_no_threshold_is_certified_when_every_threshold_is_null(p_wrong):
    """Invariant 12: when the error rate is α or more at every threshold, any certified
    λ is a violation, so P(not abstaining) <= δ."""
    rng = np.random.default_rng(12)
    certified = naive_certified = 0
    for _ in range(R):
        conf = rng.uniform(size=400)
        correct = rng.uniform(size=400) >= p_wrong
        certified += not calibrate(conf, correct, alpha=ALPHA, delta=DELTA, grid=GRID).abstained
        naive_certified += math.isfinite(naive_threshold(conf, correct, ALPHA))
    assert certified <= allowed_violations()
    assert naive_certified > allowed_violations()


def cascade_true_risk(lam1: float, lam2: float) -> float:
    """Two independent uniform confidences; P(wrong_1 | c) = 0.1 + 0.6(1 - c),
    P(wrong_2 | c) = 0.02 + 0.3(1 - c). Selective risk of the whole cascade."""
    def level(lam: float, base: float, slope: float) -> tuple[float, float]:
        if not math.isfinite(lam):
            return 0.0, 0.0
        share = 1 - lam
        return share, base + slope * (1 - lam) / 2  # P(c >= λ), R(λ)

    p1, r1 = level(lam1, 0.1, 0.6)
    p2, r2 = level(lam2, 0.02, 0.3)
    covered = p1 + (1 - p1) * p2
    if covered == 0:
        return 0.0
    return (p1 * r1 + (1 - p1) * p2 * r2) / covered


def test_cascade_guarantee_with_split_delta():
    """Invariant 13: with δ/M per level, P(selective risk of the cascade > α) <= δ."""
    rng = np.random.default_rng(13)
    violations = naive_violations = 0
    for _ in range(R):
        n = 600
        c1, c2 = rng.uniform(size=n), rng.uniform(size=n)
        ok1 = rng.uniform(size=n) >= 0.1 + 0.6 * (1 - c1)
        ok2 = rng.uniform(size=n) >= 0.02 + 0.3 * (1 - c2)
        cal1, cal2 = calibrate_cascade([c1, c2], [ok1, ok2], alpha=ALPHA, delta=DELTA, grid=GRID)
        violations += cascade_true_risk(cal1.threshold, cal2.threshold) > ALPHA
        n1 = naive_threshold(c1, ok1, ALPHA)
        rest = c1 < n1
        n2 = naive_threshold(c2[rest], ok2[rest], ALPHA) if rest.sum() else math.inf
        naive_violations += cascade_true_risk(n1, n2) > ALPHA
    assert violations <= allowed_violations()
    assert naive_violations > allowed_violations()
