"""Seeded repeated-experiment tests of the (α, δ) guarantee (algorithms.md §9, 11–13),
run through the public testing kit (:mod:`intercascade_core.testing`), so the kit users
get is the one that proves the library's guarantees.

Each test draws R = 2000 independent calibration sets from a distribution whose true
risk curve is known in closed form (``KnownRiskModel``), calibrates on each, and counts
the runs V whose chosen threshold violates the guarantee. Under the guarantee
V ~ Bin(R, p) with p <= δ, so the check asserts V <= binom.ppf(1 - 1e-6, R, δ) = 267:
its false-failure probability is at most 1e-6 (scipy's pattern: fixed seed + binomial
slack, never a raw rate compared with δ). Each test also runs a deliberately
mis-calibrated rule (the plain empirical risk, no confidence bound:
``empirical_risk_threshold``) through the same check and asserts that it fails, so the
check has power.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import numpy.typing as npt
import pytest

from intercascade_core import calibrate, calibrate_cascade
from intercascade_core.testing import (
    KnownRiskModel,
    binomial_allowance,
    check_guarantee,
    empirical_risk_threshold,
)

pytestmark = pytest.mark.statistical

R = 2000
ALPHA, DELTA = 0.15, 0.1
GRID = np.linspace(0, 1, 201)
ALLOWED = binomial_allowance(R, DELTA)  # 267: P(Bin(2000, 0.1) > 267) <= 1e-6

calibrated = functools.partial(calibrate, grid=GRID)
naive = functools.partial(empirical_risk_threshold, grid=GRID)  # no bound: the broken rule


def test_selective_risk_guarantee_on_known_distribution() -> None:
    """Invariant 11: P(R(λ̂) > α) <= δ, on conf ~ U(0, 1) with P(wrong | c) = 0.1 +
    0.5 (1 − c), i.e. R(λ) = 0.1 + 0.25 (1 − λ). Seed 11: 29 of 2000 runs violate; the
    naive rule violates in 1203 of them."""
    world = KnownRiskModel(wrong_base=0.1, wrong_slope=0.5)
    valid = check_guarantee(world, n=400, alpha=ALPHA, delta=DELTA, trials=R, seed=11, calibrator=calibrated)
    broken = check_guarantee(world, n=400, alpha=ALPHA, delta=DELTA, trials=R, seed=11, calibrator=naive)
    assert valid.allowance == ALLOWED
    assert valid.passed, valid.summary()
    assert not broken.passed, broken.summary()  # power: a rule without the bound fails


def _every_certificate_counts(thresholds: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Treat any certified threshold as a violation (the risk is >= α everywhere)."""
    return np.ones_like(thresholds)


@pytest.mark.parametrize("p_wrong", [ALPHA, ALPHA + 0.02])
def test_no_threshold_is_certified_when_every_threshold_is_null(p_wrong: float) -> None:
    """Invariant 12: when the error rate is α or more at every threshold, every null is
    true, so P(not abstaining) <= δ: each certified λ counts as a violation. Seed 12:
    calibrate certifies in 92 (error rate α) / 57 (α + 0.02) runs, the naive rule in
    1778 / 1438."""
    world = KnownRiskModel(wrong_base=p_wrong, wrong_slope=0.0)
    kwargs = dict(n=400, alpha=ALPHA, delta=DELTA, trials=R, seed=12, true_risk=_every_certificate_counts)
    valid = check_guarantee(world, calibrator=calibrated, **kwargs)  # type: ignore[arg-type]
    broken = check_guarantee(world, calibrator=naive, **kwargs)  # type: ignore[arg-type]
    assert valid.violations == R - valid.abstentions
    assert valid.passed, valid.summary()
    assert not broken.passed, broken.summary()


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


def test_cascade_guarantee_with_split_delta() -> None:
    """Invariant 13: with δ/M per level, P(selective risk of the cascade > α) <= δ.
    Two thresholds per run, so the loop is written out; the allowance and the broken
    rule are the kit's."""
    rng = np.random.default_rng(13)
    violations = naive_violations = 0
    for _ in range(R):
        n = 600
        c1, c2 = rng.uniform(size=n), rng.uniform(size=n)
        ok1 = rng.uniform(size=n) >= 0.1 + 0.6 * (1 - c1)
        ok2 = rng.uniform(size=n) >= 0.02 + 0.3 * (1 - c2)
        cal1, cal2 = calibrate_cascade([c1, c2], [ok1, ok2], alpha=ALPHA, delta=DELTA, grid=GRID)
        violations += cascade_true_risk(cal1.threshold, cal2.threshold) > ALPHA
        n1 = naive(c1, ok1, alpha=ALPHA)
        rest = c1 < n1
        n2 = naive(c2[rest], ok2[rest], alpha=ALPHA) if rest.sum() else math.inf
        naive_violations += cascade_true_risk(n1, n2) > ALPHA
    assert violations <= ALLOWED
    assert naive_violations > ALLOWED
