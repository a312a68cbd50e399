"""Seeded repeated-experiment tests of the online risk audit (audit.py).

Each test runs R = 2000 independent label streams through the vectorised audit
(``audit.first_alarm``, which tests/test_audit.py checks against folding ``observe``) and
counts events. Allowances are binomial quantiles at 1 − 1e-6 (the testing kit's
``binomial_allowance``), so each assertion fails by chance with probability at most 1e-6
(scipy's pattern: fixed seed + binomial slack).

Setting: α = 0.15, δ = 0.1, checkpoints every 10 labels, δ_j = δ·6/(π² j²).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from intercascade_core.core.audit import (
    AuditConfig,
    _critical_counts,
    checkpoint_delta,
    first_alarm,
)
from intercascade_core.testing import binomial_allowance

pytestmark = pytest.mark.statistical

R = 2000
ALPHA, DELTA = 0.15, 0.1


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("risk", [ALPHA, 0.08])
def test_false_alarms_at_most_delta_over_a_long_stream(window: int | None, risk: float) -> None:
    """Risk held at (the boundary α) or below α for 3000 labels (300 checkpoints): the
    audit alarms in at most δ of the runs. Allowance 267 of 2000 (expected <= 200).
    Seed 7, risk = α: 132 (all labels) / 136 (window 100) alarms; risk 0.08: 8 / 8.
    The union bound is conservative but not vacuous."""
    cfg = AuditConfig(alpha=ALPHA, delta=DELTA, window=window)
    rng = np.random.default_rng(7)
    labels = rng.uniform(size=(R, 3000)) >= risk
    alarms = int((first_alarm(labels, cfg) > 0).sum())
    assert alarms <= binomial_allowance(R, DELTA)


def test_naive_repeated_testing_inflates_false_alarms() -> None:
    """The procedure the audit avoids: testing at the full δ at every checkpoint. At the
    boundary risk α it alarms in far more than δ of the runs (seed 7: 1020 of 2000), more
    than Bin(R, δ) allows at 1 − 1e-6 — which is why δ_j must be spent."""
    rng = np.random.default_rng(7)
    labels = rng.uniform(size=(R, 3000)) >= ALPHA
    cps = np.arange(10, 3001, 10)
    wrong = np.cumsum(~labels, axis=1)[:, cps - 1]
    crit = _critical_counts(cps, ALPHA, np.full(cps.size, DELTA))
    naive_alarms = int((wrong >= crit).any(axis=1).sum())
    assert naive_alarms > binomial_allowance(R, DELTA)


def test_alarm_within_stated_delay_after_risk_rises() -> None:
    """Risk 0.05 for 300 labels, then pushed to 0.40 (> α). With a window of W = 100
    labels the audit alarms within D = 100 labels of the change with probability at least
    P = 0.960: at the checkpoint at label 400 the window holds the 100 post-change labels,
    and the exact binomial test there (level δ_40) rejects with probability
    P(Bin(100, 0.4) >= c_40) = P. So the runs with delay > D are at most Bin(R, 1 − P),
    allowance 124 of 2000 (seed 5: 66; median delay 80 labels). Alarms before the change
    are false alarms (allowance as for δ; seed 5: 4)."""
    m0, n, p1, w, every = 300, 900, 0.40, 100, 10
    cfg = AuditConfig(alpha=ALPHA, delta=DELTA, window=w, every=every)
    checkpoint = m0 + w  # a multiple of `every`
    j = checkpoint // every
    c = int(_critical_counts(np.array([w]), ALPHA, np.array([checkpoint_delta(DELTA, j)]))[0])
    p_detect = float(stats.binom.sf(c - 1, w, p1))
    assert p_detect > 0.95

    rng = np.random.default_rng(5)
    risk = np.r_[np.full(m0, 0.05), np.full(n - m0, p1)]
    labels = rng.uniform(size=(R, n)) >= risk
    first = first_alarm(labels, cfg)
    early = (first > 0) & (first <= m0)
    late = (first < 0) | (first > checkpoint)
    assert int(early.sum()) <= binomial_allowance(R, DELTA)
    assert int(late.sum()) <= binomial_allowance(R, 1 - p_detect)
    delays = first[first > m0] - m0
    assert np.median(delays) <= w
