"""Exact agreement with an independent implementation: MAPIE 1.6.0's binomial
(Bentkus, binary=True) p-values with its fixed-sequence FWER control."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from intercascade_core import calibrate

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # MAPIE / scikit-learn import-time deprecation noise
    methods = pytest.importorskip("mapie.risk_control.methods")
    risk_control = pytest.importorskip("mapie.risk_control")

GRID = np.linspace(0, 0.99, 100)
ALPHA, DELTA, MIN_N = 0.2, 0.1, 30


def exact_rate(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """k/n nudged down by ulps until MAPIE's ``ceil(n * r_hat)`` gives back exactly k.

    Without this, e.g. 56/333*333 = 56.00000000000001 and MAPIE counts 57 errors.
    """
    r = k / n
    while (over := n * r > k).any():
        r = np.where(over, np.nextafter(r, 0), r)
    return r


def mapie_threshold(conf: np.ndarray, correct: np.ndarray) -> float:
    """λ̂ from MAPIE: p-values from the most conservative threshold down, FST by MAPIE."""
    lambdas = GRID[::-1]
    n = np.array([(conf >= lam).sum() for lam in lambdas])
    k = np.array([((conf >= lam) & ~correct).sum() for lam in lambdas])
    keep = n >= MIN_N
    lambdas, n, k = lambdas[keep], n[keep], k[keep]
    if lambdas.size == 0:
        return np.inf
    p_values = methods.compute_hoeffding_bentkus_p_value(exact_rate(k, n), n.astype(float), ALPHA, binary=True)[:, 0]
    rejected = risk_control.control_fwer(p_values, DELTA, fwer_method="fixed_sequence")
    return float(lambdas[np.max(rejected)]) if len(rejected) else np.inf


def test_matches_mapie_fixed_sequence_on_200_random_sets():
    rng = np.random.default_rng(20261127)
    agree, interior, abstained = 0, 0, 0
    for _ in range(200):
        n = int(rng.integers(100, 800))
        conf = rng.beta(rng.uniform(0.5, 4), rng.uniform(0.5, 4), size=n)
        p_wrong = rng.uniform(0, 0.15) + rng.uniform(0, 0.6) * (1 - conf)
        correct = rng.uniform(size=n) >= np.clip(p_wrong, 0, 1)
        ours = calibrate(conf, correct, alpha=ALPHA, delta=DELTA, grid=GRID, min_n=MIN_N).threshold
        theirs = mapie_threshold(conf, correct)
        assert ours == theirs, (n, ours, theirs)
        agree += 1
        interior += bool(0 < ours < 1)
        abstained += bool(np.isinf(ours))
    assert agree == 200
    # the sets exercise interior thresholds and abstentions, not one trivial case
    assert interior >= 30 and abstained >= 10
