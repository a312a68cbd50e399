"""Online risk audit of accepted weak answers, with a valid sequential test.

The calibrated threshold λ_w promises ``P(wrong | accepted) <= α`` with probability
``>= 1 − δ`` *if* deployment looks like calibration. The audit checks that promise on
labelled feedback: a sampled fraction of the accepted weak answers is graded (by the
strong model, a user-supplied grader, or gold labels when they exist) and fed, one label
at a time, to :func:`observe`, which threads a frozen :class:`AuditState`.

The sequential procedure (which one, and why it is valid)
----------------------------------------------------------
Looking at a running Clopper–Pearson bound after every label and stopping the first time
it crosses α inflates the error rate: each look is a new chance of a false alarm.
The audit therefore uses a **union bound over a fixed checkpoint schedule** (alpha
spending): labels are grouped, and checkpoint j = 1, 2, … falls at label count
``n_j`` (``every·j`` by default, or a geometric schedule ``ceil(first·ratio^(j−1))``).
Checkpoint j is tested at level

    δ_j = δ · 6 / (π² j²),      Σ_j δ_j = δ,

so, whatever the number of checkpoints and whenever the stream stops, the probability
of *any* false statement over the whole stream is at most δ. The schedule and the window
are fixed before any label is seen (they depend on label counts, never on label values),
which is what makes the union bound apply.

At checkpoint j, over the labels in the window (the last ``window`` labels, or all of
them since the start / the last :func:`reset` when ``window`` is None) with ``k`` wrong
out of ``m``:

* **alarm** (the typed :class:`RiskAlarm` event): the one-sided exact binomial test of
  ``H0: risk <= α`` rejects, ``P(Bin(m, α) >= k) <= δ_j`` — equivalently the
  Clopper–Pearson *lower* bound at level δ_j exceeds α. If the risk of every audited
  answer stays ``<= α`` (the labels are independent given the answers, each wrong with
  probability ``<= α``; the wrong counts are then stochastically dominated by
  ``Bin(m, α)``), the audit raises an alarm with probability at most δ over the whole,
  unbounded stream.
* **upper bound** (:attr:`AuditState.risk_upper`): the Clopper–Pearson *upper* bound at
  level δ_j, ``u(k, m, δ_j)``. With probability ``>= 1 − δ`` it holds at every checkpoint
  simultaneously. ``risk_upper <= α`` is the audit's positive verdict ("certified").

Why the alarm is the *lower* bound crossing α and not the running upper bound: the upper
bound of a small sample is near 1, so "upper bound > α" is true at the start of every
audit — as an alarm it would fire in almost every run where the risk is fine. The upper
bound exceeding α means "not (yet) certified", which the state reports as the verdict
``"inconclusive"``; evidence that the risk *is* above α is what the lower bound gives.

Assumptions the guarantee needs: which accepted answers get labelled must not depend on
whether they are right (sample by a hash of the query, :func:`should_label`, or by a
seeded coin); the grader must be right (a strong-model grader is a proxy, and its own
errors add to or mask the weak model's); labels are independent given the answers.

After an alarm the configured ``action`` tells the caller what to do: ``"defer_all"``
(:func:`apply_alarm` swaps the weak threshold for an abstaining one, so every query goes
to the strong model), ``"recalibrate"`` (re-run in-situ calibration,
:mod:`intercascade_core.core.insitu`), or ``"none"``. Each audit epoch (from the start or a
:func:`reset`) spends its own δ.

Everything here is pure: ``observe`` returns a new state and never mutates its input.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
from scipy import stats

from ..errors import InvalidArgumentError, ModelError, RiskAlarmError
from .calibrate import Calibration, cp_lower, cp_upper
from .cascade import CascadeConfig, CascadeState, Level, Outcome, initial_state, step
from .prompts import as_messages, strategy_free_prompt
from .protocols import Embedder
from .tasks import Query, answers_match, extract_answer

log = logging.getLogger(__name__)

__all__ = [
    "AuditConfig",
    "AuditState",
    "AuditedRun",
    "RiskAlarm",
    "apply_alarm",
    "audit_outcomes",
    "audited_stream",
    "checkpoint_delta",
    "first_alarm",
    "gold_grader",
    "init_audit",
    "observe",
    "observe_many",
    "reset",
    "should_label",
    "strong_model_grader",
]

Action = Literal["none", "defer_all", "recalibrate"]
Verdict = Literal["alarm", "certified", "inconclusive"]
_PI2_6 = math.pi**2 / 6.0


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True, slots=True)
class AuditConfig:
    """How the audit tests (see the module docstring).

    alpha, delta: the risk target and the total false-alarm budget of one audit epoch.
    every: checkpoint spacing in labels (linear schedule ``n_j = every·j``).
    ratio, first: when ``ratio`` is set, a geometric schedule ``n_j = ceil(first·ratio^(j−1))``
    (made strictly increasing) instead; fewer checkpoints keep each δ_j larger.
    window: test the last ``window`` labels at each checkpoint (bounded detection delay
    after a change), or all labels of the epoch when None (most power for a stationary risk).
    action: what an alarm asks for (``"none"``, ``"defer_all"``, ``"recalibrate"``).
    raise_on_alarm: :func:`observe` raises :class:`RiskAlarmError` instead of returning the event.
    """
    alpha: float
    delta: float
    every: int = 10
    ratio: float | None = None
    first: int = 20
    window: int | None = None
    action: Action = "none"
    raise_on_alarm: bool = False

    def __post_init__(self) -> None:
        for name in ("alpha", "delta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 < float(v) < 1.0:
                raise InvalidArgumentError(name, f"must lie in the open interval (0, 1), got {v!r}")
        for name in ("every", "first"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
                raise InvalidArgumentError(name, f"must be an integer >= 1, got {v!r}")
        if self.ratio is not None and (
            isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real)
            or not float(self.ratio) > 1.0 or not math.isfinite(float(self.ratio))
        ):
            raise InvalidArgumentError("ratio", f"must be a finite real > 1 (or None), got {self.ratio!r}")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, numbers.Integral)
            or int(self.window) < 1
        ):
            raise InvalidArgumentError("window", f"must be an integer >= 1 or None, got {self.window!r}")
        if self.action not in get_args(Action):
            raise InvalidArgumentError("action", f"expected one of {get_args(Action)}, got {self.action!r}")

    def checkpoint(self, j: int) -> int:
        """The label count of checkpoint ``j`` (1-based) in this epoch."""
        if self.ratio is None:
            return self.every * j
        n = 0
        for i in range(1, j + 1):
            n = max(n + 1, math.ceil(self.first * float(self.ratio) ** (i - 1)))
        return n

    def checkpoints_upto(self, n: int) -> list[int]:
        """All checkpoint label counts ``<= n``, in order."""
        out: list[int] = []
        j = 1
        while True:
            c = self.checkpoint(j)
            if c > n:
                return out
            out.append(c)
            j += 1


def checkpoint_delta(delta: float, j: int | npt.ArrayLike) -> float | np.ndarray:
    """δ_j = δ·6/(π² j²): the level of checkpoint j; the levels sum to δ over j >= 1."""
    jj = np.asarray(j, dtype=np.float64)
    out = delta / (_PI2_6 * jj * jj)
    return float(out) if out.ndim == 0 else out


# ----------------------------------------------------------------------------- state / event
@dataclass(frozen=True, slots=True)
class RiskAlarm:
    """The audit found, at level δ, that the accepted weak answers' risk exceeds α.

    ``n_labels`` is the label count (in this epoch) of the checkpoint that fired,
    ``n_window``/``n_wrong`` the labels tested there, ``lower_bound`` the Clopper–Pearson
    lower bound at ``delta_j`` (> α), ``p_value`` the exact binomial p-value (<= delta_j),
    ``action`` what the config asks the caller to do.
    """
    n_labels: int
    checkpoint: int
    n_window: int
    n_wrong: int
    alpha: float
    delta_j: float
    p_value: float
    lower_bound: float
    upper_bound: float
    action: Action

    @property
    def empirical_risk(self) -> float:
        return self.n_wrong / self.n_window


@dataclass(frozen=True, slots=True)
class AuditState:
    """The audit as a value. Counts are for the current epoch (since start or reset).

    ``recent`` holds the last ``window`` labels (True = correct) when a window is set.
    ``risk_upper``/``risk_lower`` are the bounds at the last checkpoint (1.0/0.0 before
    the first one). ``alarm`` is the first alarm of the epoch (None while quiet); once
    raised the audit keeps counting but emits no further events until :func:`reset`.
    ``n_total``/``n_total_wrong``/``epoch`` count across resets.
    """
    config: AuditConfig
    n: int = 0
    n_wrong: int = 0
    recent: tuple[bool, ...] = ()
    next_checkpoint: int = 0
    checkpoint_index: int = 0
    risk_upper: float = 1.0
    risk_lower: float = 0.0
    alarm: RiskAlarm | None = None
    epoch: int = 0
    n_total: int = 0
    n_total_wrong: int = 0

    @property
    def verdict(self) -> Verdict:
        if self.alarm is not None:
            return "alarm"
        if self.risk_upper <= self.config.alpha:
            return "certified"
        return "inconclusive"

    @property
    def empirical_risk(self) -> float:
        return self.n_wrong / self.n if self.n else math.nan

    def summary(self) -> dict[str, object]:
        """Plain-data verdict (for reports): counts, bounds, alarm, the procedure used."""
        c = self.config
        schedule = (
            f"every {c.every} labels" if c.ratio is None else f"geometric from {c.first}, ratio {c.ratio}"
        )
        return {
            "verdict": self.verdict,
            "alpha": c.alpha,
            "delta": c.delta,
            "n_labels": self.n,
            "n_wrong": self.n_wrong,
            "empirical_risk": None if not self.n else self.empirical_risk,
            "risk_upper": self.risk_upper,
            "risk_lower": self.risk_lower,
            "checkpoints": self.checkpoint_index,
            "alarm_at_label": None if self.alarm is None else self.alarm.n_labels,
            "action": c.action,
            "procedure": (
                "exact binomial test per checkpoint, union bound with delta_j = delta*6/(pi^2 j^2); "
                f"checkpoints {schedule}; window "
                + ("all labels" if c.window is None else f"last {c.window} labels")
            ),
        }


def init_audit(config: AuditConfig) -> AuditState:
    """A fresh audit epoch."""
    if not isinstance(config, AuditConfig):
        raise InvalidArgumentError("config", f"expected an AuditConfig, got {type(config).__name__}")
    return AuditState(config=config, next_checkpoint=config.checkpoint(1))


def reset(state: AuditState) -> AuditState:
    """A new epoch (e.g. after recalibration): counts restart and a fresh δ is spent."""
    fresh = init_audit(state.config)
    return replace(fresh, epoch=state.epoch + 1, n_total=state.n_total, n_total_wrong=state.n_total_wrong)


# ----------------------------------------------------------------------------- bounds




def _p_value(k: int, m: int, alpha: float) -> float:
    """P(Bin(m, α) >= k): the exact one-sided p-value of H0: risk <= α."""
    return 1.0 if k <= 0 else float(stats.binom.sf(k - 1, m, alpha))


# ----------------------------------------------------------------------------- observe
def _check_label(correct: object) -> bool:
    if isinstance(correct, (bool, np.bool_)):
        return bool(correct)
    if isinstance(correct, numbers.Integral) and int(correct) in (0, 1):
        return bool(correct)
    raise InvalidArgumentError("correct", f"must be a bool (True = the answer was right), got {correct!r}")


def observe(state: AuditState, correct: bool) -> tuple[AuditState, RiskAlarm | None]:
    """Feed one label (``correct`` = the audited accepted answer was right).

    Returns the new state and the :class:`RiskAlarm` if this label completed a checkpoint
    whose test rejected ``risk <= α`` (only the first alarm of an epoch is emitted). With
    ``config.raise_on_alarm`` the alarm is raised as :class:`RiskAlarmError` instead.
    """
    if not isinstance(state, AuditState):
        raise InvalidArgumentError("state", f"expected an AuditState, got {type(state).__name__}")
    ok = _check_label(correct)
    c = state.config
    n = state.n + 1
    n_wrong = state.n_wrong + (not ok)
    recent = state.recent
    if c.window is not None:
        recent = (*recent, ok)[-int(c.window):]
    new = replace(state, n=n, n_wrong=n_wrong, recent=recent,
                  n_total=state.n_total + 1, n_total_wrong=state.n_total_wrong + (not ok))
    if n < state.next_checkpoint:
        return new, None
    j = state.checkpoint_index + 1
    d_j = float(checkpoint_delta(c.delta, j))
    if c.window is None:
        m, k = n, n_wrong
    else:
        m, k = len(recent), sum(not x for x in recent)
    p = _p_value(k, m, c.alpha)
    lower, upper = float(cp_lower(k, m, d_j)), float(cp_upper(k, m, d_j))
    new = replace(new, checkpoint_index=j, next_checkpoint=c.checkpoint(j + 1),
                  risk_upper=upper, risk_lower=lower)
    if p > d_j or state.alarm is not None:
        return new, None
    event = RiskAlarm(n_labels=n, checkpoint=j, n_window=m, n_wrong=k, alpha=c.alpha, delta_j=d_j,
                      p_value=p, lower_bound=lower, upper_bound=upper, action=c.action)
    new = replace(new, alarm=event)
    message = (
        f"risk alarm: {event.n_wrong}/{event.n_window} audited weak answers wrong "
        f"(lower bound {event.lower_bound:.4f} > alpha={event.alpha}) at label {event.n_labels}"
    )
    log.warning("%s; action: %s", message, event.action)
    if c.raise_on_alarm:
        raise RiskAlarmError(message, event)
    return new, event


def observe_many(state: AuditState, labels: Iterable[bool]) -> tuple[AuditState, tuple[RiskAlarm, ...]]:
    """Fold :func:`observe` over ``labels``; return the final state and the events."""
    events: list[RiskAlarm] = []
    for ok in labels:
        state, ev = observe(state, ok)
        if ev is not None:
            events.append(ev)
    return state, tuple(events)


# ----------------------------------------------------------------------------- vectorised
def _critical_counts(sizes: np.ndarray, alpha: float, deltas: np.ndarray) -> np.ndarray:
    """Smallest k with P(Bin(m, α) >= k) <= δ_j, per (m, δ_j); m + 1 when none exists."""
    c = np.asarray(stats.binom.ppf(1.0 - deltas, sizes, alpha)).astype(np.int64) + 1
    # guard the float edges of ppf: step until sf(c-1) <= δ < sf(c-2)
    for _ in range(3):
        too_high = (c > 1) & (stats.binom.sf(c - 2, sizes, alpha) <= deltas)
        c = np.where(too_high, c - 1, c)
        too_low = (c <= sizes) & (stats.binom.sf(c - 1, sizes, alpha) > deltas)
        c = np.where(too_low, c + 1, c)
    out: np.ndarray = np.minimum(c, sizes + 1)
    return out


def first_alarm(labels: npt.ArrayLike, config: AuditConfig) -> npt.NDArray[np.int64] | int:
    """Vectorised audit of many independent label streams at once.

    ``labels``: bool array ``(runs, n)`` (True = correct) or ``(n,)``. Returns, per run,
    the 1-based label count at which :func:`observe` would first raise its alarm, or
    ``-1`` if it never does within the ``n`` labels (an int for a single 1-D stream) (identical to folding
    :func:`observe`; used by the statistical tests and for offline audits).
    """
    if not isinstance(config, AuditConfig):
        raise InvalidArgumentError("config", f"expected an AuditConfig, got {type(config).__name__}")
    arr = np.asarray(labels)
    if arr.dtype != np.bool_:
        raise InvalidArgumentError("labels", f"must be a bool array, got dtype {arr.dtype}")
    squeeze = arr.ndim == 1
    arr2 = arr[None, :] if squeeze else arr
    if arr2.ndim != 2:
        raise InvalidArgumentError("labels", f"must be 1-D or 2-D, got shape {arr.shape}")
    runs, n = arr2.shape
    result = np.full(runs, -1, dtype=np.int64)
    cps = np.asarray(config.checkpoints_upto(n), dtype=np.int64)
    if cps.size:
        wrong_cum = np.concatenate([np.zeros((runs, 1), np.int64), np.cumsum(~arr2, axis=1)], axis=1)
        if config.window is None:
            sizes = cps
            k = wrong_cum[:, cps]
        else:
            start = np.maximum(cps - int(config.window), 0)
            sizes = cps - start
            k = wrong_cum[:, cps] - wrong_cum[:, start]
        deltas = np.asarray(checkpoint_delta(config.delta, np.arange(1, cps.size + 1)))
        crit = _critical_counts(sizes, config.alpha, deltas)
        fire = k >= crit[None, :]
        any_fire = fire.any(axis=1)
        first = np.argmax(fire, axis=1)
        result = np.where(any_fire, cps[first], -1)
    return int(result[0]) if squeeze else result


# ----------------------------------------------------------------------------- helpers
def should_label(key: str, rate: float, *, seed: int = 0) -> bool:
    """Whether to send an accepted answer for labelling: a stable hash of ``key`` (e.g. the
    query id or text) and ``seed`` against ``rate``. It never looks at the answer, so the
    labelled sample is representative of the accepted answers (the audit's assumption)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= float(rate) <= 1.0:
        raise InvalidArgumentError("rate", f"must lie in [0, 1], got {rate!r}")
    h = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < float(rate)


def audit_outcomes(
    outcomes: Sequence[Outcome],
    config: AuditConfig,
    *,
    rate: float = 1.0,
    seed: int = 0,
    level: int = 0,
) -> tuple[AuditState, tuple[RiskAlarm, ...]]:
    """Audit a finished stream offline: the outcomes accepted at ``level`` (default: the
    weak model) whose correctness is known, sampled at ``rate`` by :func:`should_label`
    on the query id (or index), fed in stream order."""
    labels = [
        bool(o.correct) for o in outcomes
        if o.status == "accepted" and o.level == level and o.correct is not None
        and should_label(o.query_id or str(o.index), rate, seed=seed)
    ]
    return observe_many(init_audit(config), labels)


def apply_alarm(state: CascadeState, event: RiskAlarm, *, level: int = 0) -> CascadeState:
    """The ``"defer_all"`` action: a cascade state whose ``level`` threshold abstains
    (``inf``), so every query skips that level's answer and goes on to the next level.
    Other actions leave the state as it is (``"recalibrate"`` is the caller's job)."""
    if not isinstance(state, CascadeState):
        raise InvalidArgumentError("state", f"expected a CascadeState, got {type(state).__name__}")
    if not isinstance(event, RiskAlarm):
        raise InvalidArgumentError("event", f"expected a RiskAlarm, got {type(event).__name__}")
    if not 0 <= level < state.n_levels - 1:
        raise InvalidArgumentError("level", f"must be a non-final level in 0..{state.n_levels - 2}, got {level}")
    if event.action != "defer_all":
        return state
    cal = state.calibrations[level]
    abstain = replace(cal, threshold=math.inf, abstained=True, n_accepted=0, n_errors=0, risk_bound=1.0,
                      note=f"risk audit alarm at label {event.n_labels}: deferring everything")
    cals = tuple(abstain if i == level else c for i, c in enumerate(state.calibrations))
    return replace(state, calibrations=cals)


# ----------------------------------------------------------------------------- audited stream
Grader = Callable[["Query", "Outcome"], "bool | None"]


def gold_grader(query: Query, outcome: Outcome) -> bool | None:
    """Grade with the query's gold answer (evaluation streams); None when there is none."""
    return outcome.correct


def strong_model_grader(level: Level) -> Grader:
    """A grader that asks ``level``'s model the strategy-free prompt and calls the audited
    answer right iff the two answers match. A proxy: the strong model's own errors
    blur the audit (they count as the weak model's). A failed call gives no label."""
    def grade(query: Query, outcome: Outcome) -> bool | None:
        if outcome.answer is None:
            return None
        try:
            gen = level.model.generate(as_messages(strategy_free_prompt(query)), **level.params)
        except ModelError:
            return None
        reference = extract_answer(gen.text, query.family)
        if reference is None:
            return None
        return answers_match(outcome.answer, reference, query.family)

    return grade


@dataclass(frozen=True, slots=True, eq=False)
class AuditedRun:
    """A stream run under the audit: outcomes, the final cascade and audit states, the
    alarms with the stream index they fired at, and the indices that were labelled."""
    outcomes: tuple[Outcome, ...]
    state: CascadeState
    audit: AuditState
    events: tuple[tuple[int, RiskAlarm], ...]
    labelled: tuple[int, ...]


def audited_stream(
    queries: Iterable[Query],
    levels: Sequence[Level],
    embedder: Embedder,
    *,
    audit: AuditConfig | AuditState,
    calibrations: Sequence[Calibration] | None = None,
    state: CascadeState | None = None,
    config: CascadeConfig | None = None,
    grader: Grader = gold_grader,
    rate: float = 1.0,
    seed: int = 0,
    recalibrate: Callable[[CascadeState, RiskAlarm], CascadeState] | None = None,
    level: int = 0,
) -> AuditedRun:
    """Fold ``cascade.step`` over ``queries`` with the audit watching ``level``'s accepted answers.

    Accepted answers are sent to ``grader`` at ``rate`` (:func:`should_label` on the query
    id or text, never on the answer). On an alarm the config's action is applied before
    the next query: ``"defer_all"`` → :func:`apply_alarm`; ``"recalibrate"`` → the state
    ``recalibrate(state, event)`` returns (e.g. in-situ calibration on fresh labelled data),
    then a new audit epoch (:func:`reset`); ``"none"`` → only recorded. With
    ``raise_on_alarm`` the :class:`RiskAlarmError` propagates.
    """
    cfg = CascadeConfig() if config is None else config
    cstate = initial_state(state, calibrations, int(embedder.dim))
    astate = init_audit(audit) if isinstance(audit, AuditConfig) else audit
    if not isinstance(astate, AuditState):
        raise InvalidArgumentError("audit", f"expected an AuditConfig or AuditState, got {type(audit).__name__}")
    if astate.config.action == "recalibrate" and recalibrate is None:
        raise InvalidArgumentError("recalibrate", 'the audit action "recalibrate" needs a recalibrate= callback')
    outcomes: list[Outcome] = []
    events: list[tuple[int, RiskAlarm]] = []
    labelled: list[int] = []
    for i, q in enumerate(queries):
        cstate, out = step(cstate, q, levels, embedder, cfg, index=i)
        outcomes.append(out)
        if out.status != "accepted" or out.level != level or not should_label(q.id or q.text, rate, seed=seed):
            continue
        verdict = grader(q, out)
        if verdict is None:
            continue
        labelled.append(i)
        astate, ev = observe(astate, bool(verdict))
        if ev is None:
            continue
        events.append((i, ev))
        if ev.action == "defer_all":
            cstate = apply_alarm(cstate, ev, level=level)
        elif ev.action == "recalibrate":
            assert recalibrate is not None
            cstate = recalibrate(cstate, ev)
            astate = reset(astate)
    return AuditedRun(tuple(outcomes), cstate, astate, tuple(events), tuple(labelled))
