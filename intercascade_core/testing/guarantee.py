"""Repeated-experiment checks of the (α, δ) guarantee of a threshold calibrator.

The guarantee — with probability at least 1 − δ over the calibration set, the chosen
threshold λ̂ has true selective risk ``P(wrong | confidence >= λ̂) <= α`` — is a
statement about the distribution of λ̂, so no single calibration can confirm or refute
it. :func:`check_guarantee` runs many independent calibrations and tests the count of
violations against a binomial allowance; :func:`binomial_allowance` and
:func:`detection_power` are the same arithmetic for checks of other shapes (a whole
cascade, an online audit).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import stats

from ..core.calibrate import (
    Calibration,
    GridSpec,
    _check_confidences,
    _check_correct,
    _check_min_n,
    _check_unit_interval_open,
    _counts_at,
    _make_grid,
    calibrate,
)
from ..errors import InvalidArgumentError
from .data import FinitePopulation

__all__ = [
    "Calibrator",
    "GuaranteeCheck",
    "RiskFunction",
    "Sampler",
    "binomial_allowance",
    "check_guarantee",
    "detection_power",
    "empirical_risk_threshold",
]

FloatArray = npt.NDArray[np.float64]
#: ``sampler(rng, n) -> (confidences, correct)``: ``n`` independent labelled items.
Sampler = Callable[[np.random.Generator, int], tuple[npt.ArrayLike, npt.ArrayLike]]
#: ``calibrator(confidences, correct, alpha=..., delta=...)`` -> a :class:`Calibration`,
#: a threshold, or ``None``/``inf`` to abstain (defer everything).
Calibrator = Callable[..., Calibration | float | None]
#: ``true_risk(thresholds) -> risks``: the true selective risk at each finite threshold.
RiskFunction = Callable[[FloatArray], npt.ArrayLike]


# --------------------------------------------------------------------------- arithmetic


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise InvalidArgumentError(name, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def binomial_allowance(trials: int, rate: float, *, false_failure: float = 1e-6) -> int:
    """The largest count a process with event rate at most ``rate`` may show in
    ``trials`` independent trials: ``binom.ppf(1 − false_failure, trials, rate)``.

    ``P(Bin(trials, rate) > allowance) <= false_failure``, and the same holds for any
    smaller rate, so "count > allowance" wrongly rejects a valid process with
    probability at most ``false_failure``.
    """
    r = _positive_int("trials", trials)
    p = _check_unit_interval_open("rate", rate)
    f = _check_unit_interval_open("false_failure", false_failure)
    return int(stats.binom.ppf(1.0 - f, r, p))


def _rate_up_to_one(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise InvalidArgumentError(name, f"must be a real number in (0, 1], got {value!r}")
    return float(value)


def detection_power(trials: int, allowance: int, alternative: float) -> float:
    """``P(Bin(trials, alternative) > allowance)``: the probability that a process whose
    event rate is ``alternative`` exceeds the allowance, i.e. fails the check."""
    r = _positive_int("trials", trials)
    k = _positive_int("allowance", allowance, minimum=0)
    return float(stats.binom.sf(k, r, _rate_up_to_one("alternative", alternative)))


# --------------------------------------------------------------------------- a broken rule


def empirical_risk_threshold(
    confidences: npt.ArrayLike,
    correct: npt.ArrayLike,
    *,
    alpha: float,
    delta: float | None = None,
    grid: GridSpec = None,
    min_n: int = 30,
) -> float:
    """A deliberately **invalid** calibrator, to show that a check has power: the lowest
    threshold whose *empirical* risk on the calibration set is at most α (among those
    accepting at least ``min_n`` items), with no confidence bound. ``delta`` is accepted
    and ignored — that is its flaw. Near the boundary its true risk exceeds α about
    half of the time. Returns ``inf`` when no threshold qualifies.
    """
    a = _check_unit_interval_open("alpha", alpha)
    m = _check_min_n(min_n)
    conf = _check_confidences("confidences", confidences)
    ok = _check_correct("correct", correct, conf.size)
    thresholds, _ = _make_grid(grid, conf)
    n, k = _counts_at(conf, ~ok, thresholds)
    good = (n >= m) & (k <= a * n)
    return float(thresholds[np.argmax(good)]) if good.any() else math.inf


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True, slots=True)
class GuaranteeCheck:
    """The outcome of :func:`check_guarantee`.

    ``violations`` of ``trials`` calibrations chose a threshold whose true risk exceeds
    ``alpha``; the check ``passed`` when that count is at most ``allowance`` (=
    ``binom.ppf(1 − false_failure, trials, delta)``). ``power`` is the probability
    that a calibrator violating in a share ``alternative`` (> delta) of the runs would
    fail. ``abstentions`` counts runs that chose no threshold (never a violation).
    ``risk_source`` says whether the true risks were exact or estimated on
    ``estimate_size`` fresh items. ``thresholds`` and ``true_risks`` hold every run's
    threshold (``inf`` when abstaining) and its true risk (NaN when abstaining).
    """

    passed: bool
    violations: int
    allowance: int
    trials: int
    abstentions: int
    alpha: float
    delta: float
    n: int
    seed: int
    false_failure: float
    alternative: float
    power: float
    risk_source: Literal["exact", "estimated"]
    estimate_size: int
    thresholds: tuple[float, ...] = field(repr=False)
    true_risks: tuple[float, ...] = field(repr=False, compare=False)  # NaN != NaN; follows thresholds

    @property
    def violation_rate(self) -> float:
        """Share of the runs that violated the guarantee."""
        return self.violations / self.trials

    def summary(self) -> str:
        """One paragraph for an assertion message."""
        verdict = "PASSED" if self.passed else "FAILED"
        risk = (
            "exact true risks" if self.risk_source == "exact"
            else f"true risks estimated on {self.estimate_size} fresh items"
        )
        return (
            f"{verdict}: {self.violations} of {self.trials} calibrations on n={self.n} items "
            f"({self.violation_rate:.2%}) chose a threshold whose true risk exceeds "
            f"alpha={self.alpha:g}; allowance {self.allowance} (a calibrator meeting "
            f"delta={self.delta:g} exceeds it with probability <= {self.false_failure:g}). "
            f"Power: one violating in {self.alternative:.0%} of runs fails with probability "
            f"{self.power:.4g}. Abstained in {self.abstentions} runs; {risk}; seed {self.seed}."
        )


def _threshold_of(result: object, trial: int) -> float:
    if isinstance(result, Calibration):
        return result.threshold
    if result is None:
        return math.inf
    if isinstance(result, numbers.Real) and not isinstance(result, bool):
        value = float(result)
        if not math.isnan(value):
            return value
    raise InvalidArgumentError(
        "calibrator",
        f"must return a Calibration, a threshold or None; trial {trial} returned {result!r}",
    )


def _checked_draw(sampler: Sampler, rng: np.random.Generator, n: int) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    drawn = sampler(rng, n)
    if not isinstance(drawn, tuple) or len(drawn) != 2:
        raise InvalidArgumentError(
            "sampler", f"must return a (confidences, correct) pair, got {type(drawn).__name__}"
        )
    try:
        conf = _check_confidences("confidences", drawn[0])
        ok = _check_correct("correct", drawn[1], conf.size)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError("sampler", f"returned bad data: {exc}") from None
    if conf.size != n:
        raise InvalidArgumentError("sampler", f"was asked for {n} items and returned {conf.size}")
    return conf, ok


def _risks(
    true_risk: RiskFunction, thresholds: FloatArray
) -> FloatArray:
    risks = np.asarray(true_risk(thresholds), dtype=np.float64)
    if risks.shape != thresholds.shape:
        raise InvalidArgumentError(
            "true_risk", f"returned shape {risks.shape} for {thresholds.shape[0]} thresholds"
        )
    if not ((risks >= 0.0) & (risks <= 1.0)).all():  # also rejects NaN
        raise InvalidArgumentError("true_risk", "must return risks in [0, 1] (no NaN)")
    return risks


def check_guarantee(
    sampler: Sampler,
    *,
    n: int,
    alpha: float,
    delta: float,
    seed: int,
    trials: int = 2000,
    calibrator: Calibrator = calibrate,
    true_risk: RiskFunction | None = None,
    false_failure: float = 1e-6,
    alternative: float | None = None,
    estimate_size: int = 1_000_000,
) -> GuaranteeCheck:
    """Check a calibrator's (α, δ) guarantee by ``trials`` independent calibrations.

    Each trial draws a calibration set of ``n`` items from ``sampler``, calls
    ``calibrator(confidences, correct, alpha=alpha, delta=delta)`` and measures the true
    selective risk of the threshold it chose; the trial *violates* when that risk
    exceeds ``alpha``. Abstaining (``None``, ``inf`` or an abstaining
    :class:`Calibration`) never violates.

    The true risk comes from ``true_risk(thresholds)`` when given, else from the
    sampler's own ``risk`` method (:class:`KnownRiskModel`, :class:`FinitePopulation`),
    else it is estimated on one fresh sample of ``estimate_size`` items (then a
    threshold whose risk lies within a few standard errors of ``alpha`` may be
    misjudged; prefer an exact risk).

    **Why a slack, and how large.** Under the guarantee each trial violates
    independently with probability ``p <= delta``, so the violation count ``V`` is
    ``Bin(trials, p)``, never larger in distribution than ``Bin(trials, delta)``. A
    valid calibrator is therefore expected to show up to ``delta·trials`` violations
    and, by chance, somewhat more: comparing the observed rate ``V/trials`` with
    ``delta`` would fail a calibrator at the boundary about half the time. As in
    SciPy's own tests of statistical code, the verdict is instead a one-sided binomial
    test at a stated level: the check fails when ``V > binom.ppf(1 − false_failure,
    trials, delta)``, which a valid calibrator does with probability at most
    ``false_failure`` (the false-failure probability). The seed makes the outcome
    reproducible; ``false_failure`` is the chance that a seed is unlucky. The other
    error is reported too: ``power`` is the probability that the check fails when the
    true violation rate is ``alternative`` (default ``min(2·delta, (1 + delta)/2)``).
    Raise ``trials`` until the power against the violation rate you care about is
    high; a check with little power proves little when it passes.

    Cost: ``trials`` sampler calls and calibrations, one vectorised risk evaluation;
    with :func:`~intercascade_core.calibrate` (5000-point grid) about 1 ms per trial.
    """
    a = _check_unit_interval_open("alpha", alpha)
    d = _check_unit_interval_open("delta", delta)
    f = _check_unit_interval_open("false_failure", false_failure)
    r = _positive_int("trials", trials)
    size = _positive_int("n", n)
    s = _positive_int("seed", seed, minimum=0)
    if not callable(sampler):
        raise InvalidArgumentError("sampler", f"must be callable as sampler(rng, n), got {sampler!r}")
    if not callable(calibrator):
        raise InvalidArgumentError("calibrator", f"must be callable, got {calibrator!r}")
    if true_risk is not None and not callable(true_risk):
        raise InvalidArgumentError("true_risk", f"must be callable or None, got {true_risk!r}")
    alt = min(2.0 * d, (1.0 + d) / 2.0) if alternative is None else _rate_up_to_one("alternative", alternative)
    if alt <= d:
        raise InvalidArgumentError("alternative", f"must exceed delta={d:g}, got {alternative!r}")
    est_n = _positive_int("estimate_size", estimate_size)

    trial_seq, estimate_seq = np.random.SeedSequence(s).spawn(2)
    rng = np.random.default_rng(trial_seq)
    thresholds = np.empty(r, dtype=np.float64)
    for t in range(r):
        conf, ok = _checked_draw(sampler, rng, size)
        thresholds[t] = _threshold_of(calibrator(conf, ok, alpha=a, delta=d), t)

    risk_fn = true_risk if true_risk is not None else getattr(sampler, "risk", None)
    source: Literal["exact", "estimated"] = "exact"
    if not callable(risk_fn):
        pool_conf, pool_ok = _checked_draw(sampler, np.random.default_rng(estimate_seq), est_n)
        risk_fn, source = FinitePopulation(pool_conf, pool_ok).risk, "estimated"
    chosen = thresholds < math.inf  # -inf accepts everything; only +inf abstains
    risks = np.full(r, math.nan)
    if chosen.any():
        risks[chosen] = _risks(risk_fn, thresholds[chosen])
    violations = int((risks[chosen] > a).sum())
    allowance = int(stats.binom.ppf(1.0 - f, r, d))
    return GuaranteeCheck(
        passed=violations <= allowance,
        violations=violations,
        allowance=allowance,
        trials=r,
        abstentions=int((~chosen).sum()),
        alpha=a,
        delta=d,
        n=size,
        seed=s,
        false_failure=f,
        alternative=alt,
        power=float(stats.binom.sf(allowance, r, alt)),
        risk_source=source,
        estimate_size=est_n if source == "estimated" else 0,
        thresholds=tuple(thresholds.tolist()),
        true_risks=tuple(risks.tolist()),
    )
