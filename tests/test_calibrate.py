"""Deterministic and property tests of calibration (algorithms.md §9, invariants 1–10, 13, 32–34)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import optimize, stats

from intercascade_core import (
    Calibration,
    InvalidArgumentError,
    calibrate,
    calibrate_cascade,
    certify,
    defer,
)
from intercascade_core.core.calibrate import (
    alpha_gain_normal_approx,
    alpha_gain_same_coverage_approx,
    normal_approx_upper_bound,
    risk_upper_bound,
)

unit_open = st.floats(min_value=1e-3, max_value=0.999, allow_nan=False)


@st.composite
def calibration_sets(draw: st.DrawFn, min_size: int = 1, max_size: int = 300):
    """Confidences with many ties (few distinct levels) or continuous, and labels."""
    n = draw(st.integers(min_size, max_size))
    levels = draw(st.sampled_from([5, 21, 101, 0]))  # 0 = continuous
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    conf = rng.beta(draw(st.floats(0.3, 5)), draw(st.floats(0.3, 5)), size=n)
    if levels:
        conf = np.round(conf * (levels - 1)) / (levels - 1)
    p_wrong = draw(st.floats(0, 1)) * (1 - conf) + draw(st.floats(0, 0.3))
    correct = rng.uniform(size=n) >= np.clip(p_wrong, 0, 1)
    return conf, correct


grids = st.sampled_from([None, 11, 101, "unique"])


def brute_force_fst(conf, correct, alpha, delta, grid, min_n):
    """Textbook FST, one Python loop per threshold: the independent oracle."""
    lam_hat = math.inf
    for lam in sorted(grid, reverse=True):
        accepted = [c >= lam for c in conf]
        n = sum(accepted)
        if n < min_n:
            continue
        k = sum(1 for a, ok in zip(accepted, correct, strict=False) if a and not ok)
        if k < n and stats.beta.ppf(1 - delta, k + 1, n - k) <= alpha:
            lam_hat = lam
        else:
            break
    return lam_hat


def explicit_grid(spec, conf):
    if spec is None:
        return np.linspace(0, 1, 5000)
    if spec == "unique":
        return np.unique(conf)
    return np.linspace(0, 1, spec)


# --------------------------------------------------------------------------- the bound (1–3)


@given(n=st.integers(1, 2000), data=st.data(), delta=unit_open)
def test_bound_matches_beta_quantile_and_brentq(n, data, delta):
    k = data.draw(st.integers(0, n - 1))
    u = risk_upper_bound(k, n, delta=delta)
    assert u == pytest.approx(stats.beta.ppf(1 - delta, k + 1, n - k), abs=1e-12)
    root = optimize.brentq(lambda r: stats.binom.cdf(k, n, r) - delta, 1e-15, 1 - 1e-15, xtol=1e-14)
    assert u == pytest.approx(root, abs=1e-9)
    if k == 0:
        assert u == pytest.approx(1 - delta ** (1 / n), abs=1e-12)


def test_bound_edge_conventions():
    assert risk_upper_bound(0, 0, delta=0.1) == 1.0
    assert risk_upper_bound(7, 7, delta=0.1) == 1.0


@given(n=st.integers(2, 2000), data=st.data(), delta=st.floats(1e-3, 0.5))
def test_bound_bounds_and_monotonicity(n, data, delta):
    # k/n <= u needs a confidence level 1 - δ of at least one half
    k = data.draw(st.integers(0, n - 2))
    u = risk_upper_bound(k, n, delta=delta)
    assert k / n <= u <= 1
    assert risk_upper_bound(k + 1, n, delta=delta) > u  # strictly increasing in k
    assert risk_upper_bound(k, n + 1, delta=delta) < u  # strictly decreasing in n
    assert risk_upper_bound(k, n, delta=min(delta * 1.5, 0.999)) <= u  # non-increasing in δ


@given(n=st.integers(0, 2000), data=st.data(), alpha=unit_open, delta=unit_open)
def test_bound_duality_with_binomial_test(n, data, alpha, delta):
    k = data.draw(st.integers(0, n))
    u = risk_upper_bound(k, n, delta=delta)
    pvalue = stats.binom.cdf(k, n, alpha) if n else 1.0
    assume(abs(u - alpha) > 1e-9 and abs(pvalue - delta) > 1e-9)  # float ties at the boundary
    assert (u <= alpha) == (pvalue <= delta)


# --------------------------------------------------------------------------- calibrate (4–10)


@given(data=calibration_sets(), alpha=st.floats(0.02, 0.6), delta=st.floats(0.01, 0.5),
       grid=grids, min_n=st.sampled_from([1, 15, 30]))
def test_calibrate_agrees_with_brute_force_fst(data, alpha, delta, grid, min_n):
    conf, correct = data
    assume(grid is not None or conf.size <= 60)  # the 5000-point loop is slow
    cal = calibrate(conf, correct, alpha=alpha, delta=delta, grid=grid, min_n=min_n)
    assert cal.threshold == brute_force_fst(conf, correct, alpha, delta, explicit_grid(grid, conf), min_n)


@given(data=calibration_sets(), alpha=st.floats(0.02, 0.6), delta=st.floats(0.01, 0.5),
       grid=grids, min_n=st.sampled_from([1, 30]))
def test_fst_structure(data, alpha, delta, grid, min_n):
    """Invariants 4 and 5: λ̂ is a grid member (or abstains); every tested λ ≥ λ̂ passes,
    the next tested one below fails; the empirical risk at λ̂ is ≤ α."""
    conf, correct = data
    cal = calibrate(conf, correct, alpha=alpha, delta=delta, grid=grid, min_n=min_n)
    g = explicit_grid(grid, conf)
    tested = [lam for lam in g[::-1] if (conf >= lam).sum() >= min_n]
    if cal.abstained:
        assert cal.threshold == math.inf and cal.guaranteed
        if tested:
            lam = tested[0]
            assert certify(conf, correct, lam, delta=delta) > alpha
        return
    assert cal.threshold in set(g.tolist())
    for lam in tested:
        if lam < cal.threshold:
            assert certify(conf, correct, lam, delta=delta) > alpha
            break
        assert certify(conf, correct, lam, delta=delta) <= alpha
    accepted = conf >= cal.threshold
    assert cal.n_accepted == accepted.sum() and cal.n_errors == (accepted & ~correct).sum()
    assert cal.empirical_risk <= alpha
    assert cal.risk_bound == pytest.approx(certify(conf, correct, cal.threshold, delta=delta))


@given(data=calibration_sets(min_size=20), a1=st.floats(0.02, 0.6), a2=st.floats(0.02, 0.6),
       d1=st.floats(0.01, 0.5), d2=st.floats(0.01, 0.5))
def test_monotone_in_alpha_and_delta(data, a1, a2, d1, d2):
    conf, correct = data
    a_lo, a_hi = sorted((a1, a2))
    d_lo, d_hi = sorted((d1, d2))
    kw = dict(grid=101)
    assert calibrate(conf, correct, alpha=a_hi, delta=d_lo, **kw).threshold <= \
        calibrate(conf, correct, alpha=a_lo, delta=d_lo, **kw).threshold
    assert calibrate(conf, correct, alpha=a_lo, delta=d_hi, **kw).threshold <= \
        calibrate(conf, correct, alpha=a_lo, delta=d_lo, **kw).threshold


@given(data=calibration_sets(min_size=30), alpha=st.floats(0.05, 0.5), delta=st.floats(0.01, 0.3),
       new_conf_frac=st.floats(0, 1), new_correct=st.booleans())
def test_data_monotonicity_below_top_testable(data, alpha, delta, new_conf_frac, new_correct):
    """Invariant 7 holds when the new item's confidence is ≤ λ_top, the highest testable λ."""
    conf, correct = data
    grid = np.linspace(0, 1, 101)
    testable = [lam for lam in grid if (conf >= lam).sum() >= 30]
    assume(testable)
    lam_top = max(testable)
    c_new = grid[int(new_conf_frac * np.searchsorted(grid, lam_top))]  # a grid point ≤ λ_top
    before = calibrate(conf, correct, alpha=alpha, delta=delta, grid=grid).threshold
    after = calibrate(np.append(conf, c_new), np.append(correct, new_correct),
                      alpha=alpha, delta=delta, grid=grid).threshold
    if new_correct:
        assert after <= before
    else:
        assert after >= before


def test_data_monotonicity_counterexample_above_top_testable():
    """Regression pin (invariant 7): an item *above* λ_top creates a new first test at
    n = min_n, which can fail, so adding a correct item turns λ̂ = 0 into ABSTAIN."""
    grid = np.linspace(0, 1, 101)
    conf = np.array([0.9] * 29 + [0.5] * 2 + [0.3] * 20)
    correct = np.array([False] * 5 + [True] * 24 + [True] * 22)
    before = calibrate(conf, correct, alpha=0.283, delta=0.1, grid=grid)
    assert before.threshold == 0.0
    after = calibrate(np.append(conf, 0.95), np.append(correct, True), alpha=0.283, delta=0.1, grid=grid)
    assert after.abstained and after.threshold == math.inf


@given(data=calibration_sets(), alpha=st.floats(0.05, 0.5), seed=st.integers(0, 2**16))
def test_permutation_and_monotone_transform_invariance(data, alpha, seed):
    conf, correct = data
    perm = np.random.default_rng(seed).permutation(conf.size)
    grid = np.linspace(0, 1, 51)
    base = calibrate(conf, correct, alpha=alpha, delta=0.1, grid=grid, min_n=10)
    assert calibrate(conf[perm], correct[perm], alpha=alpha, delta=0.1, grid=grid, min_n=10) == base
    f = np.sqrt  # strictly increasing on [0, 1], maps [0, 1] onto itself
    moved = calibrate(f(conf), correct, alpha=alpha, delta=0.1, grid=f(grid), min_n=10)
    assert moved.abstained == base.abstained
    if not base.abstained:
        assert moved.threshold == pytest.approx(f(base.threshold))
        assert (moved.n_accepted, moved.n_errors) == (base.n_accepted, base.n_errors)


@given(n=st.integers(30, 400), alpha=st.floats(0.1, 0.5), delta=st.floats(0.05, 0.3), seed=st.integers(0, 999))
def test_all_correct_and_all_wrong(n, alpha, delta, seed):
    conf = np.random.default_rng(seed).uniform(size=n)
    grid = np.linspace(0, 1, 201)
    assume(30 >= math.ceil(math.log(delta) / math.log(1 - alpha)))
    lowest_testable = min(lam for lam in grid if (conf >= lam).sum() >= 30)
    assert calibrate(conf, np.ones(n, bool), alpha=alpha, delta=delta, grid=grid).threshold == lowest_testable
    wrong = calibrate(conf, np.zeros(n, bool), alpha=alpha, delta=delta, grid=grid)
    assert wrong.abstained
    jung = calibrate(conf, np.zeros(n, bool), alpha=alpha, delta=delta, grid=grid, on_fail="jung")
    top_testable = max(lam for lam in grid if (conf >= lam).sum() >= 30)
    assert jung.threshold == top_testable and not jung.guaranteed and not jung.abstained


def test_jung_fallback_with_too_few_items_accepts_everything():
    cal = calibrate([0.2, 0.9], [True, False], alpha=0.1, delta=0.1, on_fail="jung")
    assert cal.threshold == 0.0 and not cal.guaranteed and "no (alpha, delta) guarantee" in cal.note
    assert calibrate([0.2, 0.9], [True, False], alpha=0.1, delta=0.1).abstained


def test_inputs_are_not_modified_and_results_are_frozen():
    conf = np.array([0.9] * 40 + [0.1] * 10)
    correct = np.array([True] * 45 + [False] * 5)
    conf_copy, correct_copy = conf.copy(), correct.copy()
    cal = calibrate(conf, correct, alpha=0.2, delta=0.1)
    calibrate_cascade([conf, conf], [correct, correct], alpha=0.2, delta=0.1)
    assert (conf == conf_copy).all() and (correct == correct_copy).all()
    with pytest.raises(AttributeError):
        cal.threshold = 0.0  # type: ignore[misc]


def test_grid_rules_are_recorded():
    conf = np.linspace(0, 1, 100)
    ok = np.ones(100, bool)
    assert calibrate(conf, ok, alpha=0.2, delta=0.1).grid_rule == "linspace(0, 1, 5000)"
    assert calibrate(conf, ok, alpha=0.2, delta=0.1, grid=7).grid_rule == "linspace(0, 1, 7)"
    assert "unique" in calibrate(conf, ok, alpha=0.2, delta=0.1, grid="unique").grid_rule
    assert calibrate(conf, ok, alpha=0.2, delta=0.1, grid=[0.1, 0.5]).threshold == 0.1


# --------------------------------------------------------------------------- defer


def test_defer_scalar_array_and_abstain():
    conf = np.array([0.8] * 50 + [0.6] * 30)
    correct = np.array([True] * 50 + [False] * 30)
    cal = calibrate(conf, correct, alpha=0.2, delta=0.1, grid=[0.5, 0.8])
    assert cal.threshold == 0.8
    assert defer(cal, 0.8) is False and defer(cal, 0.79) is True  # ties are accepted
    np.testing.assert_array_equal(defer(cal, [[0.1, 0.9]]), [[True, False]])
    abstain = calibrate(np.full(50, 0.8), np.zeros(50, bool), alpha=0.2, delta=0.1)
    assert defer(abstain, 1.0) is True


# --------------------------------------------------------------------------- cascade (13)


@given(data=calibration_sets(min_size=30), alpha=st.floats(0.05, 0.5), delta=st.floats(0.02, 0.3))
def test_one_level_cascade_equals_calibrate(data, alpha, delta):
    conf, correct = data
    (only,) = calibrate_cascade([conf], [correct], alpha=alpha, delta=delta, grid=101)
    assert only == calibrate(conf, correct, alpha=alpha, delta=delta, grid=101)


@given(d1=calibration_sets(min_size=60, max_size=200), seed=st.integers(0, 999),
       alpha=st.floats(0.1, 0.4), split=st.booleans())
def test_cascade_calibrates_each_level_on_items_not_yet_accepted(d1, seed, alpha, split):
    conf1, ok1 = d1
    rng = np.random.default_rng(seed)
    conf2 = rng.uniform(size=conf1.size)
    ok2 = rng.uniform(size=conf1.size) < 0.5 + 0.5 * conf2
    delta = 0.2
    cal1, cal2 = calibrate_cascade([conf1, conf2], [ok1, ok2], alpha=alpha, delta=delta,
                                   split_delta=split, grid=101)
    level_delta = delta / 2 if split else delta
    assert cal1 == calibrate(conf1, ok1, alpha=alpha, delta=level_delta, grid=101)
    rest = conf1 < cal1.threshold
    if rest.sum() == 0:
        assert cal2.abstained and cal2.n_calibration == 0
    else:
        assert cal2 == calibrate(conf2[rest], ok2[rest], alpha=alpha, delta=level_delta, grid=101)


def test_cascade_level_with_too_few_items():
    # level 1 accepts the 90 confident items; 10 are left, fewer than min_n = 30
    conf1 = np.array([0.9] * 90 + [0.1] * 10)
    ok1 = np.array([True] * 90 + [False] * 10)
    conf2 = np.full(100, 0.95)
    ok2 = np.ones(100, bool)
    cal1, cal2 = calibrate_cascade([conf1, conf2], [ok1, ok2], alpha=0.1, delta=0.1, grid=101)
    assert cal1.threshold == pytest.approx(0.11) and cal2.n_calibration == 10 and cal2.abstained
    _, inherited = calibrate_cascade([conf1, conf2], [ok1, ok2], alpha=0.1, delta=0.1, grid=101, on_fail="jung")
    assert inherited.threshold == cal1.threshold and not inherited.guaranteed


# --------------------------------------------------------------------------- theorems (32–34)


@given(n=st.integers(10, 3000), data=st.data(), delta=st.floats(0.01, 0.3))
def test_more_passing_items_with_no_more_errors_certify_smaller_alpha(n, data, delta):
    k = data.draw(st.integers(0, n - 1))
    n2 = data.draw(st.integers(n + 1, n + 500))
    k2 = data.draw(st.integers(0, k))
    assert risk_upper_bound(k2, n2, delta=delta) < risk_upper_bound(k, n, delta=delta)


@given(n=st.integers(1000, 20000), frac=st.floats(0.05, 0.5), delta=st.floats(0.05, 0.3))
def test_normal_approximation_is_close_for_large_n(n, frac, delta):
    k = int(frac * n)
    assert abs(normal_approx_upper_bound(k, n, delta=delta) - risk_upper_bound(k, n, delta=delta)) < 1e-3


def test_theorem_approximations_against_exact():
    # Theorem G.1 (b): n = 1000, k = 200, ε = 0.05, δ = 0.1 (algorithms.md §7)
    exact = risk_upper_bound(200, 1000, delta=0.1) - risk_upper_bound(190, 1000, delta=0.1)
    assert exact == pytest.approx(0.010296, abs=1e-6)
    assert alpha_gain_same_coverage_approx(1000, 200, 0.05, delta=0.1) == pytest.approx(exact, rel=1e-3)
    # Theorem 2.2 (b): more passes and fewer errors at the same threshold
    exact22 = risk_upper_bound(120, 1200, delta=0.1) - risk_upper_bound(110, 1500, delta=0.1)
    approx22 = alpha_gain_normal_approx(1200, 120, 1500, 110, delta=0.1)
    assert approx22 > 0 and approx22 == pytest.approx(exact22, abs=1e-3)


def test_certify_shows_theorem_2_2_effect():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.5, 1, size=2000)
    correct = rng.uniform(size=2000) < 0.9
    helped_conf = np.minimum(conf + 0.1, 1.0)  # strategies raise confidence: more items pass...
    helped_correct = correct | (rng.uniform(size=2000) < 0.5)  # ...and fewer are wrong
    assert certify(helped_conf, helped_correct, 0.8, delta=0.1) < certify(conf, correct, 0.8, delta=0.1)
    assert certify(conf, correct, 1.01, delta=0.1) == 1.0


# --------------------------------------------------------------------------- bad input (_iv)


GOOD = dict(confidences=[0.5] * 40, correct=[True] * 40, alpha=0.1, delta=0.1)


@pytest.mark.parametrize(
    ("override", "argument"),
    [
        ({"confidences": [0.5, float("nan")], "correct": [True, True]}, "confidences"),
        ({"confidences": [0.5, float("inf")], "correct": [True, True]}, "confidences"),
        ({"confidences": [0.5, 1.2], "correct": [True, True]}, "confidences"),
        ({"confidences": [-0.1, 0.5], "correct": [True, True]}, "confidences"),
        ({"confidences": [[0.5]], "correct": [True]}, "confidences"),
        ({"confidences": ["a", "b"], "correct": [True, True]}, "confidences"),
        ({"confidences": ["0.5", "0.6"], "correct": [True, True]}, "confidences"),  # no silent parsing
        ({"confidences": [], "correct": []}, "confidences"),
        ({"correct": [0.5] * 40}, "correct"),
        ({"correct": ["yes"] * 40}, "correct"),
        ({"correct": [2] * 40}, "correct"),
        ({"correct": [True] * 39}, "correct"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"delta": -0.1}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"min_n": 0}, "min_n"),
        ({"min_n": 2.5}, "min_n"),
        ({"grid": [0.5, 0.2]}, "grid"),
        ({"grid": [0.2, 0.2]}, "grid"),
        ({"grid": [0.5, 1.5]}, "grid"),
        ({"grid": [-0.5, 0.5]}, "grid"),
        ({"grid": []}, "grid"),
        ({"grid": 1}, "grid"),
        ({"grid": "everything"}, "grid"),
        ({"on_fail": "accept"}, "on_fail"),
    ],
)
def test_calibrate_iv(override, argument):
    kwargs = {**GOOD, **override}
    with pytest.raises(InvalidArgumentError) as info:
        calibrate(kwargs.pop("confidences"), kwargs.pop("correct"), **kwargs)
    assert info.value.argument == argument
    assert isinstance(info.value, ValueError)


def test_other_functions_iv():
    cal = calibrate(**{k: v for k, v in GOOD.items() if k not in ("confidences", "correct")},
                    confidences=GOOD["confidences"], correct=GOOD["correct"])
    with pytest.raises(InvalidArgumentError, match="confidences"):
        defer(cal, float("nan"))
    with pytest.raises(InvalidArgumentError, match="calibration"):
        defer(0.5, 0.5)  # type: ignore[arg-type]
    for bad in (["a"], {"x": 1}, "0.5", [object()]):
        with pytest.raises(InvalidArgumentError, match="confidences"):
            defer(cal, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="n_errors"):
        risk_upper_bound(5, 3, delta=0.1)
    with pytest.raises(InvalidArgumentError, match="n_errors"):
        risk_upper_bound(-1, 3, delta=0.1)
    with pytest.raises(InvalidArgumentError, match="threshold"):
        certify([0.5], [True], float("nan"), delta=0.1)
    with pytest.raises(InvalidArgumentError, match="correct_per_level"):
        calibrate_cascade([[0.5]], [], alpha=0.1, delta=0.1)
    with pytest.raises(InvalidArgumentError, match=r"confidences_per_level\[1\]"):
        calibrate_cascade([[0.5, 0.6], [0.5]], [[True, True], [True]], alpha=0.1, delta=0.1)
    with pytest.raises(InvalidArgumentError, match="confidences_per_level"):
        calibrate_cascade([], [], alpha=0.1, delta=0.1)
    with pytest.raises(InvalidArgumentError, match="epsilon"):
        alpha_gain_same_coverage_approx(100, 10, 2.0, delta=0.1)


def test_calibration_record_fields():
    cal = calibrate(np.full(60, 0.9), np.ones(60, bool), alpha=0.2, delta=0.1)
    assert isinstance(cal, Calibration)
    assert (cal.n_calibration, cal.n_accepted, cal.n_errors, cal.min_n) == (60, 60, 0, 30)
    assert cal.risk_bound == pytest.approx(1 - 0.1 ** (1 / 60))


def test_summary_is_json_ready_for_an_abstaining_calibration() -> None:
    import json

    cal = calibrate(np.array([0.9, 0.8, 0.7]), np.array([False, False, False]), alpha=0.1, delta=0.1)
    s = cal.summary()
    assert cal.abstained and s["threshold"] is None and s["empirical_risk"] is None
    assert s["n_accepted"] == 0 and s["n_calibration"] == 3
    json.dumps(s, allow_nan=False)  # no inf / NaN leaks into JSON
