"""In-situ calibration: calibrate λ_w on the prompts the deployed cascade will actually send.

Why
---
The paper calibrates λ_w once, on strategy-free prompts, and deploys it with strategies
in the prompt. Its Theorem 2.2 assumes strategies only help. They need not: a wrong
strategy (a wrong strong answer that cleared λ_s, which happens at rate up to α) is
copied with *high* confidence (local-models.md §5: mean confidence on wrong answers
0.90 → 0.97), so more wrong answers clear λ_w and ``P(wrong | accepted) <= α`` no longer
follows from the strategy-free calibration.

What :func:`insitu_calibrate` does
-----------------------------------
1. A **pilot** calibration gives the thresholds of the first replay: by default the
   paper's strategy-free calibration on the same split (``cascade.calibrate_levels``),
   or thresholds you pass (e.g. from a separate pilot split).
2. **Replay**: the cascade itself (``cascade.run_stream`` with the same models, embedder
   and :class:`~intercascade_core.core.cascade.CascadeConfig` as deployment) runs over the
   calibration split as a stream, in order, from empty repositories. Strategies therefore
   accumulate exactly as the deployed policy would retrieve them, and come only from the
   calibration split's own strong answers (those that cleared λ_s). Every weak
   confidence is recorded on its strategy-augmented prompt.
3. The cascade's thresholds are **recalibrated** on the replay's confidences with Jung's
   sequential rule (``calibrate.calibrate_cascade``: FST per level, δ/M per level).
4. Which queries taught depends on the thresholds of the replay, so steps 2–3 repeat with
   the new thresholds until they stop moving (by more than ``tol``; at most
   ``max_rounds`` replays). From the second round on, a level that sees strategies keeps
   its previous threshold when the new FST run certifies it (``monotone``; see
   :func:`calibrate_replay`), so the rounds cannot cycle. At the fixed point the replay
   ran with the thresholds it certifies (within ``tol``), and every level was asked on
   the items Jung's rule calibrates it on. Without convergence the last round's
   thresholds are returned with ``converged=False`` (items a level was not asked in the
   replay then fall back to their strategy-free values). Why the rounds matter: a single
   replay at the static thresholds, then a higher λ_w, deploys a cascade that defers —
   and so teaches and copies — more than the replay saw (tests/statistical:
   test_replay_with_stream_dynamics).

The assumption under which the guarantee holds
-----------------------------------------------
FST gives ``P(wrong | conf >= λ̂) <= α`` with probability ``>= 1 − δ`` when the calibration
pairs (confidence, correct) are **exchangeable with the deployment pairs**. In situ, that
means: the test stream is drawn like the calibration stream (same query distribution,
models, prompts, k, retrieval backend and strategy hygiene), it is processed the same way
(from repositories that grow from empty as in the replay, over a stream of comparable
length), and the thresholds are those the replay ran with. What breaks it:

* **Replay order.** The replay sees each calibration query with the repository built
  from the queries before it. A deployment stream ordered differently (e.g. grouped by
  template, or with the hardest problems first) sees strategies at different rates.
* **A repository that differs from the replay's.** Starting deployment with the
  calibration repository pre-loaded, running a stream much longer than the calibration
  split (the repository grows past anything the replay saw), sharing a repository across
  tenants, or editing it (hygiene drops, imports) all change how often a strategy — and
  a wrong one — is retrieved.
* **Drift.** New query families, a new model version, changed prompts or decoding.
* **Dependence.** Items of one stream share a repository, so they are not independent;
  the guarantee treats the replay's pairs as a sample from the deployment's distribution,
  which is approximate for short streams.
* **Label reuse.** The pilot thresholds (and the fixed-point rounds) are chosen from the
  same split's labels, and they decide which queries teach; for a strict guarantee pass
  ``pilot=`` thresholds from a separate split and ``max_rounds=1``.

Where these may fail, run the online audit (:mod:`intercascade_core.core.audit`): it checks the
guarantee on labelled deployment feedback with a valid sequential test and raises a
``RiskAlarm`` when the risk is above α.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError
from .audit import AuditConfig, AuditState, audit_outcomes
from .calibrate import Calibration, _make_grid, calibrate_cascade, certify, risk_upper_bound
from .cascade import (
    CalibrationRun,
    CascadeConfig,
    CascadeState,
    Level,
    Outcome,
    calibrate_levels,
    init_state,
    run_stream,
)
from .protocols import Embedder
from .tasks import Query

__all__ = [
    "InSituCalibration",
    "calibrate_replay",
    "deploy_state",
    "insitu_calibrate",
    "replay_pairs",
    "risk_summary",
    "risk_table",
]


@dataclass(frozen=True, slots=True, eq=False)
class InSituCalibration:
    """The result of :func:`insitu_calibrate`.

    ``calibrations``: the in-situ thresholds, one per level (deploy these).
    ``static``: the pilot thresholds (the paper's strategy-free calibration by default).
    ``confidences[i][j]``/``correct[i][j]``: level i on calibration item j in the last
    replay (a failed call counts as confidence 0 and wrong). ``asked[i][j]``: whether the
    replay asked level i on item j (otherwise the strategy-free value was used).
    ``with_strategies[j]``: the weak prompt of item j carried at least one strategy.
    ``outcomes``/``state``: the last replay's outcomes and final cascade state (its
    repositories hold the calibration split's strategies).
    ``thresholds_per_round``: the thresholds each replay ran with, then the final ones.
    ``static_confidences``/``static_correct``: the weak level's strategy-free pilot data
    (when the pilot was a ``CalibrationRun``); ``first_replay_*``: the weak level in the
    first replay, which ran with the pilot (static) thresholds — the paper's deployment,
    replayed on the calibration split.
    """
    calibrations: tuple[Calibration, ...]
    static: tuple[Calibration, ...]
    confidences: tuple[tuple[float, ...], ...]
    correct: tuple[tuple[bool, ...], ...]
    asked: tuple[tuple[bool, ...], ...]
    with_strategies: tuple[bool, ...]
    outcomes: tuple[Outcome, ...]
    state: CascadeState
    rounds: int
    converged: bool
    thresholds_per_round: tuple[tuple[float, ...], ...]
    static_confidences: tuple[float, ...] | None = None
    static_correct: tuple[bool, ...] | None = None
    first_replay_confidences: tuple[float, ...] = ()
    first_replay_correct: tuple[bool, ...] = ()

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(c.threshold for c in self.calibrations)

    def theorem_view(self, *, delta: float | None = None) -> dict[str, Any]:
        """Theorem 2.2's view at the *static* λ_w: the α it certifies on strategy-free
        calibration data (u(n, k)) and on the first replay, which deployed the static
        thresholds with strategies (u(n′, k′)); the theorem predicts the second is smaller,
        copying can make it larger."""
        d = self.static[0].delta if delta is None else delta
        lam = self.static[0].threshold
        conf0 = np.asarray(self.first_replay_confidences, dtype=np.float64)
        ok0 = np.asarray(self.first_replay_correct, dtype=np.bool_)
        acc = conf0 >= lam
        out: dict[str, Any] = {
            "static_threshold": None if not math.isfinite(lam) else lam,
            "alpha_certified_without_strategies": self.static[0].risk_bound,
            "n_without": self.static[0].n_accepted,
            "errors_without": self.static[0].n_errors,
            "alpha_certified_with_strategies": certify(conf0, ok0, lam, delta=d) if math.isfinite(lam) else 1.0,
            "n_with": int(acc.sum()),
            "errors_with": int((acc & ~ok0).sum()),
            "insitu_threshold": None if not math.isfinite(self.thresholds[0]) else self.thresholds[0],
        }
        return out


# ----------------------------------------------------------------------------- replay
def replay_pairs(
    outcomes: Sequence[Outcome], n_levels: int
) -> tuple[list[list[float]], list[list[bool]], list[list[bool]], list[bool]]:
    """Per-level (confidence, correct, asked) lists from a replay's outcomes, and whether
    each weak prompt carried strategies. Not asked: NaN / False / False."""
    confs = [[math.nan] * len(outcomes) for _ in range(n_levels)]
    corr = [[False] * len(outcomes) for _ in range(n_levels)]
    asked = [[False] * len(outcomes) for _ in range(n_levels)]
    with_s: list[bool] = []
    for j, o in enumerate(outcomes):
        # level i was asked iff it ran (confidence recorded) or failed
        for i in range(n_levels):
            c, f = o.confidences[i], o.failures[i]
            if c is None and f is None:
                continue
            asked[i][j] = True
            if c is None or not math.isfinite(c):  # a failed call: confidence 0, wrong
                confs[i][j], corr[i][j] = 0.0, False
            else:
                confs[i][j], corr[i][j] = float(c), bool(o.level_correct[i])
        with_s.append(bool(o.strategies[0]))
    return confs, corr, asked, with_s


def calibrate_replay(
    confidences: Sequence[npt.ArrayLike],
    correct: Sequence[npt.ArrayLike],
    *,
    alpha: float,
    delta: float,
    split_delta: bool = True,
    floor: Sequence[float | None] | None = None,
    **calibrate_kw: Any,
) -> tuple[Calibration, ...]:
    """Jung's sequential cascade calibration on replayed (strategy-augmented) pairs.

    ``floor`` (one value or None per level, or None): a level whose FST threshold λ̂ falls
    below its floor keeps the floor instead, *if* the floor is ``inf`` or a grid point
    with at least ``min_n`` accepted items. FST rejected every tested threshold from the
    top down to λ̂ under one family-wise (1 − δ) event, so such a floor is certified by
    the same run (no extra test); the record's bound and counts are the floor's. Later
    levels are calibrated on the items the kept thresholds leave. (In-situ calibration
    floors only the levels that see strategies, not the last one.)
    """
    confs = [np.asarray(c, dtype=np.float64) for c in confidences]
    oks = [np.asarray(c, dtype=np.bool_) for c in correct]
    if floor is None:
        return calibrate_cascade(confs, oks, alpha=alpha, delta=delta, split_delta=split_delta, **calibrate_kw)
    m = len(confs)
    if len(floor) != m:
        raise InvalidArgumentError("floor", f"needs one value per level ({m}), got {len(floor)}")
    d = delta / m if split_delta else delta
    min_n = int(calibrate_kw.get("min_n", 30))
    remaining = np.ones(confs[0].size, dtype=np.bool_)
    out: list[Calibration] = []
    for i in range(m):
        ci, oi = confs[i][remaining], oks[i][remaining]
        if ci.size == 0:
            base = calibrate_cascade([confs[i]], [oks[i]], alpha=alpha, delta=d, split_delta=False, **calibrate_kw)[0]
            cal = replace(base, threshold=math.inf, abstained=True, n_calibration=0, n_accepted=0, n_errors=0,
                          risk_bound=1.0, n_tested=0, note="no calibration items left; deferring everything")
        else:
            cal = calibrate_cascade([ci], [oi], alpha=alpha, delta=d, split_delta=False, **calibrate_kw)[0]
            f = math.nan if floor[i] is None else float(floor[i])  # type: ignore[arg-type]
            if cal.guaranteed and cal.threshold < f:
                grid, _ = _make_grid(calibrate_kw.get("grid"), ci)
                acc = ci >= f
                n_acc = int(acc.sum())
                if math.isinf(f) or (n_acc >= min_n and bool(np.any(grid == f))):
                    k = int((acc & ~oi).sum())
                    cal = replace(
                        cal, threshold=f, abstained=math.isinf(f), n_accepted=n_acc if math.isfinite(f) else 0,
                        n_errors=k if math.isfinite(f) else 0,
                        risk_bound=risk_upper_bound(k, n_acc, delta=d) if math.isfinite(f) else 1.0,
                        note=f"kept the previous round's threshold (FST rejected every tested threshold "
                             f"down to {cal.threshold:.6g})",
                    )
        out.append(cal)
        remaining &= ~(confs[i] >= cal.threshold)
    return tuple(out)


def insitu_calibrate(
    queries: Iterable[Query],
    levels: Sequence[Level],
    embedder: Embedder,
    *,
    alpha: float,
    delta: float,
    config: CascadeConfig | None = None,
    split_delta: bool = True,
    pilot: CalibrationRun | Sequence[Calibration] | None = None,
    max_rounds: int = 4,
    tol: float = 0.01,
    monotone: bool = True,
    progress: bool = False,
    **calibrate_kw: Any,
) -> InSituCalibration:
    """Calibrate the cascade on a replay of the calibration split (module docstring).

    ``config`` must be the deployment's (policy, k, backend, teach, strategy mode, seed,
    tenant); ``levels`` and ``embedder`` too (wrap the strong model in
    ``hygiene.HygienicTeacher`` here if you deploy it). ``pilot``: the first replay's
    thresholds — a ``CalibrationRun`` (its strategy-free confidences also fill items a
    level was not asked), bare calibrations, or None to run the paper's strategy-free
    calibration on ``queries``. ``calibrate_kw`` go to ``calibrate`` (grid, min_n, on_fail).
    The rounds stop when no threshold moves by more than ``tol`` (an abstaining level
    must stay abstaining) or after ``max_rounds`` replays. ``monotone`` (from the second
    round on) lets a weak level's threshold only rise, when the previous one is certified
    by the new round's FST (:func:`calibrate_replay`'s ``floor``): without it the rounds
    can cycle (a higher λ_w teaches more, the taught weak model earns a lower λ_w, which
    teaches less, ...); with it they stop at a conservative fixed point.
    """
    cfg = CascadeConfig() if config is None else config
    if not isinstance(cfg, CascadeConfig):
        raise InvalidArgumentError("config", f"expected a CascadeConfig, got {type(cfg).__name__}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise InvalidArgumentError("max_rounds", f"must be an int >= 1, got {max_rounds!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < 1.0:
        raise InvalidArgumentError("tol", f"must be a real in [0, 1), got {tol!r}")
    items = list(queries)
    if not items:
        raise InvalidArgumentError("queries", "the calibration split is empty")
    for q in items:
        if getattr(q, "gold", None) is None:
            raise InvalidArgumentError("queries", f"calibration query {q.id or q.text[:40]!r} has no gold answer")
    n_levels = len(levels)

    if pilot is None:
        pilot = calibrate_levels(items, levels, alpha=alpha, delta=delta, config=cfg,
                                 split_delta=split_delta, progress=progress, **calibrate_kw)
    if isinstance(pilot, CalibrationRun):
        static = tuple(pilot.calibrations)
        fill_conf = [list(c) for c in pilot.confidences]
        fill_ok = [list(c) for c in pilot.correct]
        if len(fill_conf) != n_levels or any(len(c) != len(items) for c in fill_conf):
            raise InvalidArgumentError("pilot", "the pilot calibration run does not match the levels and queries")
    else:
        static = tuple(pilot)
        fill_conf = [[0.0] * len(items) for _ in range(n_levels)]
        fill_ok = [[False] * len(items) for _ in range(n_levels)]
    if len(static) != n_levels or not all(isinstance(c, Calibration) for c in static):
        raise InvalidArgumentError("pilot", f"needs one Calibration per level ({n_levels})")

    current = static
    history: list[tuple[float, ...]] = []
    converged = False
    rounds = 0
    while True:
        rounds += 1
        history.append(tuple(c.threshold for c in current))
        run = run_stream(items, levels, embedder, calibrations=current, config=cfg,
                         progress=progress, desc=f"in-situ replay {rounds}")
        confs, corr, asked, with_s = replay_pairs(run.outcomes, n_levels)
        if rounds == 1:
            first = (tuple(confs[0]), tuple(corr[0]))
        for i in range(n_levels):
            for j in range(len(items)):
                if not asked[i][j]:
                    confs[i][j], corr[i][j] = fill_conf[i][j], fill_ok[i][j]
        floor: tuple[float | None, ...] | None = None
        if monotone and rounds > 1:  # only the levels that see strategies (not the last)
            floor = (*(c.threshold for c in current[:-1]), None)
        new = calibrate_replay(confs, corr, alpha=alpha, delta=delta, split_delta=split_delta, floor=floor,
                               **calibrate_kw)
        new_t = tuple(c.threshold for c in new)
        if _close(new_t, history[-1], tol):
            converged = True
        if converged or rounds >= max_rounds:
            break
        current = new
    history.append(new_t)
    return InSituCalibration(
        calibrations=tuple(new),
        static=static,
        confidences=tuple(tuple(c) for c in confs),
        correct=tuple(tuple(c) for c in corr),
        asked=tuple(tuple(a) for a in asked),
        with_strategies=tuple(with_s),
        outcomes=run.outcomes,
        state=run.state,
        rounds=rounds,
        converged=converged,
        thresholds_per_round=tuple(history),
        static_confidences=tuple(fill_conf[0]) if isinstance(pilot, CalibrationRun) else None,
        static_correct=tuple(fill_ok[0]) if isinstance(pilot, CalibrationRun) else None,
        first_replay_confidences=first[0],
        first_replay_correct=first[1],
    )


def _close(a: tuple[float, ...], b: tuple[float, ...], tol: float) -> bool:
    return all(
        (x == y) if not (math.isfinite(x) and math.isfinite(y)) else abs(x - y) <= tol
        for x, y in zip(a, b, strict=True)
    )


def deploy_state(result: InSituCalibration, dim: int, *, warm: bool = False) -> CascadeState:
    """The state to deploy with: the in-situ thresholds and empty repositories, as in the
    replay (the setting the guarantee assumes); ``warm=True`` keeps the calibration
    repositories instead, which raises the strategy rate above the replay's (audit it)."""
    if not isinstance(result, InSituCalibration):
        raise InvalidArgumentError("result", f"expected an InSituCalibration, got {type(result).__name__}")
    fresh = init_state(result.calibrations, dim)
    return replace(fresh, repositories=result.state.repositories) if warm else fresh


# ----------------------------------------------------------------------------- reporting
def _f(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def risk_summary(
    outcomes: Sequence[Outcome],
    calibration: Calibration,
    *,
    alpha: float,
    delta: float,
    strategy_free: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    audit: AuditConfig | AuditState | None = None,
    audit_rate: float = 1.0,
    level: int = 0,
) -> dict[str, Any]:
    """The risk view of one variant's stream, as plain data for the eval report.

    * ``accepted``/``errors``/``empirical_risk``: the answers accepted at ``level`` (the
      weak model) on the stream, and whether their empirical risk exceeds α
      (``exceeds_alpha``); ``risk_upper``: its (1 − δ) Clopper–Pearson upper bound.
      The same split by whether the weak prompt carried strategies.
    * Theorem 2.2's view at the threshold: ``alpha_certified_without_strategies`` =
      u(n, k) on strategy-free calibration data (``strategy_free`` = (confidences,
      correct), else the calibration record's own bound) and
      ``alpha_certified_with_strategies`` = u(n′, k′) on this stream's weak answers that
      carried strategies (a fresh sample for the threshold, so a single test; None when
      no weak prompt carried one). 1.0 when the threshold abstains.
    * ``audit``: the online audit's verdict over the stream (an ``AuditConfig`` replays
      the audit on this stream's labelled accepted answers at ``audit_rate``; an
      ``AuditState`` is reported as it is).
    """
    if not isinstance(calibration, Calibration):
        raise InvalidArgumentError("calibration", f"expected a Calibration, got {type(calibration).__name__}")
    lam = calibration.threshold
    acc = [o for o in outcomes if o.status == "accepted" and o.level == level and o.correct is not None]
    err = sum(not o.correct for o in acc)
    with_s = [o for o in acc if o.strategies and o.strategies[level]]
    err_s = sum(not o.correct for o in with_s)
    no_s = len(acc) - len(with_s)
    # weak answers given with strategies, accepted or not, for the certification view
    conf_s: list[float] = []
    ok_s: list[bool] = []
    for o in outcomes:
        c, k = o.confidences[level], o.level_correct[level]
        if o.strategies and o.strategies[level] and c is not None and k is not None and math.isfinite(c):
            conf_s.append(float(c))
            ok_s.append(bool(k))
    if strategy_free is not None:
        sf_conf, sf_ok = strategy_free
        cert_without = certify(sf_conf, sf_ok, lam, delta=delta) if math.isfinite(lam) else 1.0
    else:
        cert_without = calibration.risk_bound
    if not conf_s:  # no weak answer carried strategies (e.g. the Jung baseline): no view
        cert_with: float | None = None
    else:
        cert_with = certify(conf_s, ok_s, lam, delta=delta) if math.isfinite(lam) else 1.0
    out: dict[str, Any] = {
        "alpha": alpha,
        "delta": delta,
        "threshold": _f(lam),
        "accepted": len(acc),
        "errors": err,
        "empirical_risk": (err / len(acc)) if acc else None,
        "exceeds_alpha": bool(acc) and err / len(acc) > alpha,
        "risk_upper": risk_upper_bound(err, len(acc), delta=delta),
        "accepted_with_strategies": len(with_s),
        "errors_with_strategies": err_s,
        "empirical_risk_with_strategies": (err_s / len(with_s)) if with_s else None,
        "accepted_without_strategies": no_s,
        "errors_without_strategies": err - err_s,
        "empirical_risk_without_strategies": ((err - err_s) / no_s) if no_s else None,
        "alpha_certified_without_strategies": _f(cert_without),
        "alpha_certified_with_strategies": None if cert_with is None else _f(cert_with),
    }
    if isinstance(audit, AuditConfig):
        st, _ = audit_outcomes(outcomes, audit, rate=audit_rate, level=level)
        out["audit"] = st.summary()
    elif isinstance(audit, AuditState):
        out["audit"] = audit.summary()
    elif audit is not None:
        raise InvalidArgumentError("audit", f"expected an AuditConfig or AuditState, got {type(audit).__name__}")
    return out


def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100.0 * float(x):.2f}"


def risk_table(summaries: Mapping[str, Mapping[str, Any]], *, labels: Mapping[str, str] | None = None) -> str:
    """A Markdown table of :func:`risk_summary` results, one row per variant: the accepted
    weak answers' empirical risk against α, the α certified at λ_w without and with
    strategies (Theorem 2.2's view) and the audit's verdict. Percentages."""
    head = (
        "| Variant | λ_w | weak accepted | wrong | empirical risk (%) | α (%) | exceeds α | "
        "α certified, no strategies (%) | α certified, with strategies (%) | audit |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for v, s in summaries.items():
        name = (labels or {}).get(v, v)
        lam = s.get("threshold")
        audit = s.get("audit")
        verdict = "–" if not audit else str(audit.get("verdict"))
        if audit and audit.get("alarm_at_label") is not None:
            verdict += f" (label {audit['alarm_at_label']})"
        rows.append(
            f"| {name} | {'abstain' if lam is None else f'{float(lam):.4f}'} | {s.get('accepted')} | "
            f"{s.get('errors')} | {_pct(s.get('empirical_risk'))} | {_pct(s.get('alpha'))} | "
            f"{'**yes**' if s.get('exceeds_alpha') else 'no'} | {_pct(s.get('alpha_certified_without_strategies'))} | "
            f"{_pct(s.get('alpha_certified_with_strategies'))} | {verdict} |"
        )
    return "\n".join(rows) + "\n"
