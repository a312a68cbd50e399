"""Calibrated deferral with a provable risk guarantee.

Jung, Brahman & Choi (ICLR 2025) calibrate a deferral threshold λ by *fixed-sequence
testing* (FST): for each candidate λ, from the most conservative (highest) down, test
the null hypothesis H0(λ): "the selective risk P(wrong | conf ≥ λ) exceeds α" with an
exact one-sided binomial (Clopper–Pearson) test at level δ, and stop at the first test
that fails to reject. The last rejected λ is returned. With probability ≥ 1 − δ over
the calibration draw, P(wrong | conf ≥ λ̂) ≤ α on exchangeable test data.

Choices this module makes explicit (see ``algorithms.md`` §1–§2, §10):

* Accept iff ``confidence >= threshold`` (ties are accepted), everywhere.
* Only λ with at least ``min_n`` accepted calibration items are tested (Jung's 30).
  That filter depends on the confidences only, never on the labels, so FST stays
  valid conditionally on them; the same argument covers ``grid="unique"``.
* When the first test already fails, the default (``on_fail="abstain"``) defers
  everything (``threshold = inf``), which keeps the guarantee. ``on_fail="jung"``
  reproduces the released code's fallback (the top tested λ, or 0.0 when nothing is
  testable) and marks the result ``guaranteed=False``. Jung's code also steps to
  ``λ - 1/len(grid)`` between tests; that quirk is not reproduced.
* Error counts are integers; the test is ``binom.cdf(k, n, α) <= δ``, which is
  equivalent to ``cp_upper(k, n, δ) <= α`` and has no edge case at k = n.
* A cascade uses δ/M per level by default (union bound over the M levels).

Everything here is pure: inputs are never modified, results are frozen records.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt
from scipy.special import betaincinv, ndtri

from ..errors import InvalidArgumentError

try:  # the kernel behind scipy.stats.binom.cdf, without importing scipy.stats (seconds)
    from scipy.special._ufuncs import _binom_cdf as _binom_cdf_kernel

    _binom_cdf: Any = _binom_cdf_kernel
except ImportError:  # pragma: no cover - older/newer SciPy layouts
    from scipy.stats import binom as _binom

    _binom_cdf = _binom.cdf

__all__ = [
    "CALIBRATION_FIELDS",
    "MAX_GRID_POINTS",
    "Calibration",
    "alpha_gain_normal_approx",
    "alpha_gain_same_coverage_approx",
    "calibrate",
    "calibrate_cascade",
    "certify",
    "defer",
    "normal_approx_upper_bound",
    "risk_upper_bound",
]

DEFAULT_GRID_SIZE = 5000
#: The most points an integer grid may have. Finer grids add nothing (N calibration items
#: give at most N + 1 distinct accepted sets; ``grid="unique"`` tests each once) and cost
#: 24 bytes a point.
MAX_GRID_POINTS = 1_000_000
OnFail = Literal["abstain", "jung"]
GridSpec = None | int | str | Sequence[float] | npt.NDArray[np.floating]


@dataclass(frozen=True, slots=True)
class Calibration:
    """The outcome of calibrating one deferral threshold.

    ``threshold`` is ``math.inf`` when the procedure abstains (defer everything).
    ``n_accepted``/``n_errors``/``risk_bound`` describe the calibration items at the
    threshold; ``risk_bound`` is the one-sided Clopper–Pearson upper bound at level δ
    (1.0 when nothing is accepted). ``guaranteed`` is False only for the ``"jung"``
    fallback, whose threshold carries no (α, δ) guarantee. ``n_tested`` is the
    number of hypotheses FST tested (passes plus the one failure, if any).
    """

    threshold: float
    alpha: float
    delta: float
    n_calibration: int
    n_accepted: int
    n_errors: int
    risk_bound: float
    grid_rule: str
    min_n: int
    abstained: bool
    guaranteed: bool
    on_fail: OnFail
    n_tested: int
    note: str = ""

    @property
    def empirical_risk(self) -> float:
        """Error rate of the accepted calibration items (NaN when none is accepted)."""
        return self.n_errors / self.n_accepted if self.n_accepted else math.nan

    def summary(self) -> dict[str, object]:
        """A JSON-ready record (an infinite threshold and a NaN risk become None), as the
        CLI and ``results.json`` print it."""
        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "threshold": finite(self.threshold),
            "abstained": self.abstained,
            "guaranteed": self.guaranteed,
            "alpha": self.alpha,
            "delta": self.delta,
            "n_calibration": self.n_calibration,
            "n_accepted": self.n_accepted,
            "n_errors": self.n_errors,
            "empirical_risk": finite(self.empirical_risk),
            "risk_bound": finite(self.risk_bound),
            "note": self.note,
        }

    def to_dict(self) -> dict[str, object]:
        """Every field as plain JSON data (an infinite threshold becomes None);
        :meth:`from_dict` gives back an equal record."""
        out: dict[str, object] = {name: getattr(self, name) for name in CALIBRATION_FIELDS}
        out["threshold"] = self.threshold if math.isfinite(self.threshold) else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Calibration:
        """The record :meth:`to_dict` wrote, checked field by field and for consistency
        (counts, abstention, the risk bound against its Clopper–Pearson value): a
        record read back from a file is refused rather than trusted when any of it is off.
        Raises :class:`InvalidArgumentError` naming the field."""
        return _calibration_from_dict(data)


#: The keys of :meth:`Calibration.to_dict`, in field order.
CALIBRATION_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Calibration))
_MAX_COUNT = 2**53  # exact in a float: larger counts come from no real calibration
_MAX_TEXT = 1000
# the bound is recomputed on load; it must agree to far below any decision that uses it
_RISK_BOUND_TOLERANCE = 1e-9


def _field_int(data: Mapping[str, object], name: str, low: int) -> int:
    v = data[name]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= _MAX_COUNT:
        raise InvalidArgumentError(name, f"must be an integer in [{low}, 2**53], got {v!r}")
    return v


def _field_real(data: Mapping[str, object], name: str, low: float, high: float, *, open_: bool) -> float:
    v = data[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidArgumentError(name, f"must be a finite number, got {v!r}")
    x = float(v)
    inside = low < x < high if open_ else low <= x <= high
    if not inside:
        interval = f"({low:g}, {high:g})" if open_ else f"[{low:g}, {high:g}]"
        raise InvalidArgumentError(name, f"must lie in {interval}, got {v!r}")
    return x


def _field_bool(data: Mapping[str, object], name: str) -> bool:
    v = data[name]
    if not isinstance(v, bool):
        raise InvalidArgumentError(name, f"must be true or false, got {v!r}")
    return v


def _field_text(data: Mapping[str, object], name: str) -> str:
    v = data[name]
    if not isinstance(v, str) or len(v) > _MAX_TEXT:
        raise InvalidArgumentError(name, f"must be a string of at most {_MAX_TEXT} characters")
    return v


def _calibration_from_dict(data: Mapping[str, object]) -> Calibration:
    if not isinstance(data, Mapping):
        raise InvalidArgumentError("calibration", f"must be a mapping, got {type(data).__name__}")
    missing = [k for k in CALIBRATION_FIELDS if k not in data]
    if missing:
        raise InvalidArgumentError(missing[0], "missing")
    unknown = sorted(str(k) for k in data if k not in CALIBRATION_FIELDS)
    if unknown:
        raise InvalidArgumentError(unknown[0][:80], "not a field of a Calibration")
    raw_thr = data["threshold"]
    threshold = math.inf if raw_thr is None else _field_real(data, "threshold", 0.0, 1.0, open_=False)
    alpha = _field_real(data, "alpha", 0.0, 1.0, open_=True)
    delta = _field_real(data, "delta", 0.0, 1.0, open_=True)
    n_cal = _field_int(data, "n_calibration", 0)
    n_acc = _field_int(data, "n_accepted", 0)
    n_err = _field_int(data, "n_errors", 0)
    risk = _field_real(data, "risk_bound", 0.0, 1.0, open_=False)
    min_n = _field_int(data, "min_n", 1)
    abstained = _field_bool(data, "abstained")
    guaranteed = _field_bool(data, "guaranteed")
    on_fail = data["on_fail"]
    if on_fail != "abstain" and on_fail != "jung":
        raise InvalidArgumentError("on_fail", f'must be "abstain" or "jung", got {on_fail!r}')
    n_tested = _field_int(data, "n_tested", 0)
    grid_rule, note = _field_text(data, "grid_rule"), _field_text(data, "note")
    if n_acc > n_cal:
        raise InvalidArgumentError("n_accepted", f"{n_acc} exceeds n_calibration={n_cal}")
    if n_err > n_acc:
        raise InvalidArgumentError("n_errors", f"{n_err} exceeds n_accepted={n_acc}")
    if abstained != (threshold == math.inf):
        raise InvalidArgumentError("abstained", f"is {abstained} but the threshold is {raw_thr!r}")
    if abstained and n_acc:
        raise InvalidArgumentError("n_accepted", f"an abstaining level accepts nothing, got {n_acc}")
    if on_fail == "abstain" and not guaranteed:
        raise InvalidArgumentError("guaranteed", 'only the "jung" fallback can be unguaranteed')
    expected = float(cp_upper(n_err, n_acc, delta))
    if abs(risk - expected) > _RISK_BOUND_TOLERANCE:
        raise InvalidArgumentError(
            "risk_bound", f"{risk!r} is not the Clopper-Pearson bound {expected!r} of "
            f"{n_err} errors in {n_acc} at delta={delta!r}"
        )
    return Calibration(
        threshold=threshold, alpha=alpha, delta=delta, n_calibration=n_cal, n_accepted=n_acc,
        n_errors=n_err, risk_bound=risk, grid_rule=grid_rule, min_n=min_n, abstained=abstained,
        guaranteed=guaranteed, on_fail=on_fail, n_tested=n_tested, note=note,
    )


# --------------------------------------------------------------------------- input checks


def _check_unit_interval_open(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(name, f"must be a real number in (0, 1), got {value!r}")
    x = float(value)
    if not (0.0 < x < 1.0):
        raise InvalidArgumentError(name, f"must lie in the open interval (0, 1), got {value!r}")
    return x


def _check_confidences(name: str, values: object) -> npt.NDArray[np.float64]:
    try:
        raw = np.asarray(values)
        if raw.dtype.kind not in "biuf":  # no silent parsing of strings or objects
            raise TypeError(f"got dtype {raw.dtype}")
        arr = raw.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(name, f"must be an array of real numbers ({exc})") from None
    if arr.ndim != 1:
        raise InvalidArgumentError(name, f"must be one-dimensional, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidArgumentError(name, f"must be finite; item {i} is {arr[i]!r}")
    out = (arr < 0.0) | (arr > 1.0)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise InvalidArgumentError(name, f"must lie in [0, 1]; item {i} is {arr[i]!r}")
    return arr


def _check_correct(name: str, values: object, n: int) -> npt.NDArray[np.bool_]:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InvalidArgumentError(name, f"must be one-dimensional, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise InvalidArgumentError(
            name, f"has {arr.shape[0]} items but the confidences have {n}; lengths must match"
        )
    if arr.dtype == np.bool_:
        return arr
    if arr.size and np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all():
        return arr.astype(np.bool_)
    if arr.size == 0 and np.issubdtype(arr.dtype, np.number):
        return arr.astype(np.bool_)
    raise InvalidArgumentError(
        name, f"must be boolean-like (bool, or integers 0/1), got dtype {arr.dtype}"
    )


def _check_min_n(min_n: object) -> int:
    if isinstance(min_n, bool) or not isinstance(min_n, numbers.Integral) or int(min_n) < 1:
        raise InvalidArgumentError("min_n", f"must be an integer >= 1, got {min_n!r}")
    return int(min_n)


def _make_grid(grid: GridSpec, confidences: npt.NDArray[np.float64]) -> tuple[np.ndarray, str]:
    """The candidate thresholds, ascending, and a description of the rule."""
    if grid is None:
        return np.linspace(0.0, 1.0, DEFAULT_GRID_SIZE), f"linspace(0, 1, {DEFAULT_GRID_SIZE})"
    if isinstance(grid, str):
        if grid != "unique":
            raise InvalidArgumentError("grid", f'must be None, an int, "unique" or an array, got {grid!r}')
        return np.unique(confidences), "unique calibration confidences"
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        if int(grid) < 2:
            raise InvalidArgumentError("grid", f"an integer grid needs at least 2 points, got {grid!r}")
        if int(grid) > MAX_GRID_POINTS:
            raise InvalidArgumentError(
                "grid", f"at most {MAX_GRID_POINTS} points, got {int(grid)} (\"unique\" tests every "
                "distinct calibration confidence)"
            )
        return np.linspace(0.0, 1.0, int(grid)), f"linspace(0, 1, {int(grid)})"
    arr = _check_confidences("grid", grid) if not isinstance(grid, bool) else None
    if arr is None or arr.size == 0:
        raise InvalidArgumentError("grid", "must not be empty")
    if arr.size > 1 and not (np.diff(arr) > 0).all():
        raise InvalidArgumentError("grid", "must be strictly increasing")
    return arr, f"explicit ({arr.size} points)"


# --------------------------------------------------------------------------- the bound


def cp_upper(k: np.ndarray | int, n: np.ndarray | int, delta: float) -> np.ndarray:
    """One-sided (1 − δ) Clopper–Pearson upper bound on a rate after k events in n
    trials, vectorised: ``beta.ppf(1 − δ, k + 1, n − k)``; 1 at n = 0 and at k = n."""
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    degenerate = (n_arr == 0) | (k_arr >= n_arr)
    safe_n = np.where(degenerate, k_arr + 1.0, n_arr)  # keeps beta.ppf's b = n - k > 0
    bound = betaincinv(k_arr + 1.0, safe_n - k_arr, 1.0 - delta)
    return np.where(degenerate, 1.0, bound)


def cp_lower(k: np.ndarray | int, n: np.ndarray | int, delta: float) -> np.ndarray:
    """One-sided (1 − δ) Clopper–Pearson lower bound, vectorised:
    ``beta.ppf(δ, k, n − k + 1)``; 0 at k = 0."""
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    none = k_arr <= 0
    bound = betaincinv(np.where(none, 1.0, k_arr), n_arr - k_arr + 1.0, delta)
    return np.where(none, 0.0, bound)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise InvalidArgumentError(name, f"must be a non-negative integer, got {value!r}")
    return int(value)


def risk_upper_bound(n_errors: int, n: int, *, delta: float) -> float:
    """Upper (1 − δ)-confidence bound on an error rate after ``n_errors`` in ``n`` trials.

    The one-sided Clopper–Pearson bound ``beta.ppf(1 − δ, k + 1, n − k)``, which equals
    ``sup{r : P(Bin(n, r) <= k) >= δ}``; 1.0 when ``n == 0`` or ``k == n``.
    """
    k = _check_count("n_errors", n_errors)
    total = _check_count("n", n)
    if k > total:
        raise InvalidArgumentError("n_errors", f"must not exceed n={total}, got {k}")
    d = _check_unit_interval_open("delta", delta)
    return float(cp_upper(k, total, d))


# --------------------------------------------------------------------------- calibration


def _counts_at(
    confidences: np.ndarray, wrong: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """n(λ) = #(conf >= λ) and k(λ) = #(conf >= λ and wrong), by sorting twice.

    Sorting the wrong items' confidences on their own is cheaper than an argsort
    of everything followed by cumulative sums.
    """
    all_sorted = np.sort(confidences)
    wrong_sorted = np.sort(confidences[wrong])
    n = all_sorted.size - np.searchsorted(all_sorted, thresholds, side="left")
    k = wrong_sorted.size - np.searchsorted(wrong_sorted, thresholds, side="left")
    return n.astype(np.int64), k.astype(np.int64)


def _calibrate_checked(
    conf: np.ndarray,
    correct: np.ndarray,
    *,
    alpha: float,
    delta: float,
    grid: np.ndarray,
    grid_rule: str,
    min_n: int,
    on_fail: OnFail,
) -> Calibration:
    n_all, k_all = _counts_at(conf, ~correct, grid)
    testable = n_all >= min_n
    # most conservative first: the testable thresholds from the highest down
    lambdas = grid[testable][::-1]
    n_seq, k_seq = n_all[testable][::-1], k_all[testable][::-1]
    rejected = _binom_cdf(k_seq.astype(np.float64), n_seq.astype(np.float64), alpha) <= delta
    n_pass = int(np.argmin(rejected)) if not rejected.all() else int(rejected.size)
    n_tested = n_pass + (1 if n_pass < rejected.size else 0)

    common = dict(
        alpha=alpha, delta=delta, n_calibration=int(conf.size), grid_rule=grid_rule,
        min_n=min_n, on_fail=on_fail, n_tested=n_tested,
    )
    if n_pass > 0:
        i = n_pass - 1
        n_acc, k_err = int(n_seq[i]), int(k_seq[i])
        return Calibration(
            threshold=float(lambdas[i]), n_accepted=n_acc, n_errors=k_err,
            risk_bound=float(cp_upper(k_err, n_acc, delta)), abstained=False, guaranteed=True,
            **common,  # type: ignore[arg-type]
        )
    if on_fail == "jung":
        if lambdas.size:
            n_acc, k_err = int(n_seq[0]), int(k_seq[0])
            threshold, note = float(lambdas[0]), "first test failed; Jung fallback to the top tested threshold"
        else:
            n_acc, k_err = int(conf.size), int((~correct).sum())
            threshold, note = 0.0, f"fewer than min_n={min_n} items; Jung fallback accepts everything"
        return Calibration(
            threshold=threshold, n_accepted=n_acc, n_errors=k_err,
            risk_bound=float(cp_upper(k_err, n_acc, delta)), abstained=False, guaranteed=False,
            note=note + " (no (alpha, delta) guarantee)", **common,  # type: ignore[arg-type]
        )
    note = (
        "first test failed; deferring everything" if lambdas.size
        else f"fewer than min_n={min_n} items can be tested; deferring everything"
    )
    return Calibration(
        threshold=math.inf, n_accepted=0, n_errors=0, risk_bound=1.0, abstained=True,
        guaranteed=True, note=note, **common,  # type: ignore[arg-type]
    )


def _check_on_fail(on_fail: object) -> OnFail:
    if on_fail == "abstain" or on_fail == "jung":
        return on_fail
    raise InvalidArgumentError("on_fail", f'must be "abstain" or "jung", got {on_fail!r}')


def calibrate(
    confidences: npt.ArrayLike,
    correct: npt.ArrayLike,
    *,
    alpha: float,
    delta: float,
    grid: GridSpec = None,
    min_n: int = 30,
    on_fail: OnFail = "abstain",
) -> Calibration:
    """Calibrate a deferral threshold by fixed-sequence testing.

    Args:
        confidences: calibration confidences in [0, 1], one per item.
        correct: whether each item's answer was right (bool or 0/1 integers).
        alpha: target risk, P(wrong | accepted) <= alpha.
        delta: the guarantee holds with probability >= 1 - delta over calibration data.
        grid: candidate thresholds: None (5000 evenly spaced in [0, 1]), an int (that
            many evenly spaced points), ``"unique"`` (the calibration confidences) or a
            strictly increasing array in [0, 1].
        min_n: only thresholds accepting at least this many calibration items are tested.
        on_fail: ``"abstain"`` (defer everything when the first test fails) or
            ``"jung"`` (the released code's fallback, without guarantee).

    Runs in O(N log N + |grid|): one sort, cumulative sums and binary searches.
    """
    a = _check_unit_interval_open("alpha", alpha)
    d = _check_unit_interval_open("delta", delta)
    m = _check_min_n(min_n)
    mode = _check_on_fail(on_fail)
    conf = _check_confidences("confidences", confidences)
    if conf.size == 0:
        raise InvalidArgumentError("confidences", "must not be empty")
    ok = _check_correct("correct", correct, conf.size)
    grid_arr, rule = _make_grid(grid, conf)
    return _calibrate_checked(conf, ok, alpha=a, delta=d, grid=grid_arr, grid_rule=rule, min_n=m, on_fail=mode)


def calibrate_cascade(
    confidences_per_level: Sequence[npt.ArrayLike],
    correct_per_level: Sequence[npt.ArrayLike],
    *,
    alpha: float,
    delta: float,
    split_delta: bool = True,
    grid: GridSpec = None,
    min_n: int = 30,
    on_fail: OnFail = "abstain",
) -> tuple[Calibration, ...]:
    """Calibrate an M-level cascade with Jung's sequential rule.

    Level i (weakest first) is calibrated only on the calibration items that no
    earlier level accepted. Each level is tested at δ/M (``split_delta=True``, the
    paper's Algorithm 2: a union bound makes the whole cascade's selective risk ≤ α
    with probability ≥ 1 − δ) or at the full δ (``split_delta=False``, the released
    code).

    A level left with fewer than ``min_n`` items (after earlier levels took theirs)
    has nothing testable: with ``on_fail="abstain"`` it abstains — it defers every
    query, which for the last level means discarding it — and stays guaranteed; with
    ``on_fail="jung"`` it inherits the previous level's threshold, as the released
    code does (no guarantee). Every level sees the same items, so the inputs are M
    arrays of equal length.
    """
    a = _check_unit_interval_open("alpha", alpha)
    d = _check_unit_interval_open("delta", delta)
    m = _check_min_n(min_n)
    mode = _check_on_fail(on_fail)
    levels = len(confidences_per_level)
    if levels == 0:
        raise InvalidArgumentError("confidences_per_level", "must hold at least one level")
    if len(correct_per_level) != levels:
        raise InvalidArgumentError(
            "correct_per_level", f"has {len(correct_per_level)} levels but confidences have {levels}"
        )
    confs = [_check_confidences(f"confidences_per_level[{i}]", c) for i, c in enumerate(confidences_per_level)]
    n = confs[0].size
    if n == 0:
        raise InvalidArgumentError("confidences_per_level[0]", "must not be empty")
    for i, c in enumerate(confs):
        if c.size != n:
            raise InvalidArgumentError(
                f"confidences_per_level[{i}]", f"has {c.size} items but level 0 has {n}; lengths must match"
            )
    oks = [_check_correct(f"correct_per_level[{i}]", c, n) for i, c in enumerate(correct_per_level)]
    level_delta = d / levels if split_delta else d

    remaining = np.ones(n, dtype=np.bool_)
    results: list[Calibration] = []
    for i in range(levels):
        conf_i, ok_i = confs[i][remaining], oks[i][remaining]
        grid_arr, rule = _make_grid(grid, conf_i)
        cal = _calibrate_checked(
            conf_i, ok_i, alpha=a, delta=level_delta, grid=grid_arr, grid_rule=rule,
            min_n=m, on_fail=mode,
        )
        if mode == "jung" and results and conf_i.size < m:
            prev = results[-1].threshold
            accepted = conf_i >= prev
            n_acc, k_err = int(accepted.sum()), int((accepted & ~ok_i).sum())
            cal = Calibration(
                threshold=prev, alpha=a, delta=level_delta, n_calibration=int(conf_i.size),
                n_accepted=n_acc, n_errors=k_err, risk_bound=float(cp_upper(k_err, n_acc, level_delta)),
                grid_rule=rule, min_n=m, abstained=False, guaranteed=False, on_fail=mode, n_tested=0,
                note=f"fewer than min_n={m} items left; inherits the previous level's threshold (Jung, no guarantee)",
            )
        results.append(cal)
        remaining &= ~(confs[i] >= cal.threshold)
    return tuple(results)


@overload
def defer(calibration: Calibration, confidences: float) -> bool: ...
@overload
def defer(calibration: Calibration, confidences: npt.ArrayLike) -> bool | npt.NDArray[np.bool_]: ...


def defer(calibration: Calibration, confidences: npt.ArrayLike) -> bool | npt.NDArray[np.bool_]:
    """True where a query must be deferred: ``confidence < threshold``.

    A scalar gives a bool, an array gives a bool array of the same shape. An
    abstaining calibration (threshold ``inf``) defers everything.
    """
    if not isinstance(calibration, Calibration):
        raise InvalidArgumentError("calibration", f"must be a Calibration, got {type(calibration).__name__}")
    arr = np.asarray(confidences)
    flat = _check_confidences("confidences", arr.reshape(-1))
    decision = flat < calibration.threshold
    if arr.ndim == 0:
        return bool(decision[0])
    return decision.reshape(arr.shape)


def certify(
    confidences: npt.ArrayLike, correct: npt.ArrayLike, threshold: float, *, delta: float
) -> float:
    """The risk level α that a fixed threshold certifies on fresh labelled data.

    Returns the (1 − δ) Clopper–Pearson upper bound on P(wrong | conf >= threshold)
    from the given items (a single test: the threshold must not have been chosen on
    these items). A better weak model — e.g. one helped by strategies — passes more
    items with fewer errors at the same threshold and so certifies a smaller α
    (Theorem 2.2). 1.0 when no item passes.
    """
    d = _check_unit_interval_open("delta", delta)
    conf = _check_confidences("confidences", confidences)
    ok = _check_correct("correct", correct, conf.size)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise InvalidArgumentError("threshold", f"must be a real number, got {threshold!r}")
    accepted = conf >= float(threshold)
    return float(cp_upper(int((accepted & ~ok).sum()), int(accepted.sum()), d))


# --------------------------------------------------------------------------- Theorems 2.2 and G.1


def _beta_moments(n: float, k: float) -> tuple[float, float]:
    mean = (k + 1.0) / (n + 1.0)
    sd = math.sqrt((k + 1.0) * (n - k) / ((n + 1.0) ** 2 * (n + 2.0)))
    return mean, sd


def _check_nk(n: object, k: object, n_name: str = "n", k_name: str = "n_errors") -> tuple[int, int]:
    n_i, k_i = _check_count(n_name, n), _check_count(k_name, k)
    if k_i >= n_i:
        raise InvalidArgumentError(k_name, f"must be smaller than {n_name}={n_i}, got {k_i}")
    return n_i, k_i


def normal_approx_upper_bound(n_errors: int, n: int, *, delta: float) -> float:
    """Normal approximation of the Clopper–Pearson bound: μ + z·σ of Beta(k+1, n−k).

    μ = (k+1)/(n+1), σ² = (k+1)(n−k)/((n+1)²(n+2)), z = Φ⁻¹(1−δ). The form the
    proofs of Theorems 2.2 and G.1 use; within 1e-3 of the exact bound for n >= 1000
    and 0.05 <= k/n <= 0.5.
    """
    n_i, k_i = _check_nk(n, n_errors)
    z = float(ndtri(1.0 - _check_unit_interval_open("delta", delta)))
    mean, sd = _beta_moments(n_i, k_i)
    return mean + z * sd


def alpha_gain_normal_approx(n: int, n_errors: int, n_new: int, n_errors_new: int, *, delta: float) -> float:
    """Theorem 2.2 (b): α − α′ ≈ [μ(n,k) − μ(n′,k′)] + z[σ(n,k) − σ(n′,k′)].

    The certified risk drops from α = u(n, k) to α′ = u(n′, k′) when strategies make
    more items pass the unchanged threshold (n′ > n) with no more errors (k′ <= k).
    """
    n_i, k_i = _check_nk(n, n_errors)
    n2, k2 = _check_nk(n_new, n_errors_new, "n_new", "n_errors_new")
    z = float(ndtri(1.0 - _check_unit_interval_open("delta", delta)))
    m1, s1 = _beta_moments(n_i, k_i)
    m2, s2 = _beta_moments(n2, k2)
    return (m1 - m2) + z * (s1 - s2)


def alpha_gain_same_coverage_approx(n: int, n_errors: int, epsilon: float, *, delta: float) -> float:
    """Theorem G.1 (b): the first-order drop in certified risk when errors fall by a
    fraction ε at the same coverage (k′ = (1 − ε)k):
    u(k) − u(k′) ≈ ε·k·[1/(n+1) + z·(n − 2k − 1) / (2(n+1)·√((n+2)(k+1)(n−k)))].
    """
    n_i, k_i = _check_nk(n, n_errors)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (0.0 <= float(epsilon) <= 1.0):
        raise InvalidArgumentError("epsilon", f"must lie in [0, 1], got {epsilon!r}")
    z = float(ndtri(1.0 - _check_unit_interval_open("delta", delta)))
    slope = 1.0 / (n_i + 1.0) + z * (n_i - 2.0 * k_i - 1.0) / (
        2.0 * (n_i + 1.0) * math.sqrt((n_i + 2.0) * (k_i + 1.0) * (n_i - k_i))
    )
    return float(epsilon) * k_i * slope
