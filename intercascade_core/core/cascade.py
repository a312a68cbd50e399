"""The Inter-Cascade pipeline (algorithms.md §3, the paper's Algorithms 2 and 3).

A :class:`CascadeState` is a value: the calibrated thresholds per level, the strategy
repositories (one per level but the last), the counter that seeds the random variant and
run counters. :func:`step` takes a state and one query, with the models and the embedder
injected, and returns ``(new_state, Outcome)``; the old state stays valid. The decisions
are made by the sans-I/O :class:`~.machine.QueryMachine`; :func:`step` only performs the
embedding and model calls it requests (:func:`drive`) and commits the result
(:func:`~.machine.apply`). :func:`run_stream` folds :func:`step` over a stream.

Per query, level i = 0..N-1 in order (0 = weakest):

1. levels but the last retrieve ``k`` strategies from their repository (policy
   ``retrieval``: top-k cosine; ``random``: k drawn uniformly, seeded; ``jung``: none)
   and prepend them to the strategy-free prompt (no strategies = the identical prompt);
2. the level answers; if its confidence clears its threshold (``conf >= λ_i``) the
   answer is output, and a level >= 1 *teaches*: it writes a strategy (in the same call as
   its answer by default, as the paper does; ``strategy_mode="two_call"`` asks for it in a
   second call) which is stored in every weaker level's repository (``teach="all_weaker"``) or the previous one's
   (``"previous"``); otherwise the query is deferred to level i+1;
3. past the last level the query is discarded (uncovered).

A model call that fails for good (typed :class:`~intercascade_core.errors.ModelError`) is
recorded with its reason and treated as a deferral, so no query is ever lost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, ModelError
from .calibrate import Calibration, calibrate_cascade
from .machine import Call, Done, Embed, QueryMachine, answer_prompt, apply, single_call
from .prompts import as_messages
from .protocols import Generation
from .state import (
    CascadeConfig,
    CascadeState,
    Counters,
    Level,
    Outcome,
    StrategyUse,
    Usage,
    init_state,
    initial_state,
)
from .tasks import Query, grade

if TYPE_CHECKING:  # pragma: no cover
    from .protocols import Embedder

log = logging.getLogger(__name__)

__all__ = [
    "CalibrationRun",
    "CascadeConfig",
    "CascadeState",
    "Counters",
    "Level",
    "Outcome",
    "StrategyUse",
    "StreamResult",
    "Usage",
    "calibrate_levels",
    "calibration_prompt",
    "drive",
    "init_state",
    "initial_state",
    "log_outcome",
    "perform",
    "run_stream",
    "step",
]

def check_levels(state: CascadeState, levels: Sequence[Level]) -> None:
    if not isinstance(state, CascadeState):
        raise InvalidArgumentError("state", f"expected a CascadeState, got {type(state).__name__}")
    if len(levels) != state.n_levels:
        raise InvalidArgumentError(
            "levels", f"state has {state.n_levels} calibrated levels, got {len(levels)} models"
        )
    for lv in levels:
        if not isinstance(lv, Level):
            raise InvalidArgumentError("levels", f"expected Level records, got {type(lv).__name__}")


def perform(
    request: Call, levels: Sequence[Level], embedder: Embedder
) -> np.ndarray | Generation | ModelError:
    """Carry out one request of a :class:`~.machine.QueryMachine`: the embedding row, or
    the level's reply (a model's typed failure is returned, to be fed, not raised)."""
    if isinstance(request, Embed):
        rows = np.asarray(embedder.embed([request.text]), dtype=np.float32)
        if rows.ndim != 2 or rows.shape[0] != 1:
            raise InvalidArgumentError(
                "embedder", f"embed([text]) must return one row, got shape {rows.shape}"
            )
        row: np.ndarray = rows[0]
        return row
    lv = levels[request.level]
    try:
        return lv.model.generate(request.messages, **lv.params)
    except ModelError as e:
        return e


def drive(machine: QueryMachine, levels: Sequence[Level], embedder: Embedder) -> Done:
    """Feed ``machine`` the results of its requests until it is done (the synchronous
    driver; an asynchronous one awaits the same requests in the same loop)."""
    while not isinstance(request := machine.next(), Done):
        machine.feed(perform(request, levels, embedder))
    return request


def log_outcome(outcome: Outcome) -> None:
    """Deferrals and failures at DEBUG, a strategy that was not stored at INFO (the texts
    are the outcome's own: model failures are redacted where they are raised)."""
    if log.isEnabledFor(logging.DEBUG):
        for i, (conf, failure) in enumerate(zip(outcome.confidences, outcome.failures, strict=True)):
            if failure is not None:
                log.debug("%s: %s", outcome.query_id, failure)
            elif conf is not None and i != outcome.level:
                log.debug("%s: deferred at level %d (confidence %.4g)", outcome.query_id, i, conf)
    if outcome.strategy_rejected is not None:
        log.info("%s: strategy not stored: %s", outcome.query_id, outcome.strategy_rejected)


def step(
    state: CascadeState,
    query: Query,
    levels: Sequence[Level],
    embedder: Embedder,
    config: CascadeConfig = CascadeConfig(),
    *,
    index: int | None = None,
) -> tuple[CascadeState, Outcome]:
    """Run one query through the cascade; return the new state and its :class:`Outcome`.

    ``state`` is not modified (repositories are persistent values). ``index`` labels the
    outcome (default: ``state.n_queries``). The decisions are those of
    :class:`~.machine.QueryMachine`; this driver performs its calls and times them.
    """
    import time

    check_levels(state, levels)
    t0 = time.perf_counter()
    machine = QueryMachine(state, query, [lv.name for lv in levels], config, index=index)
    done = drive(machine, levels, embedder)
    log_outcome(done.outcome)
    return apply(state, done), replace(done.outcome, latency_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- streams
@dataclass(frozen=True, slots=True, eq=False)
class StreamResult:
    """The outcomes of a stream, in order, and the state after the last query."""

    outcomes: tuple[Outcome, ...]
    state: CascadeState


def run_stream(
    queries: Iterable[Query],
    levels: Sequence[Level],
    embedder: Embedder,
    *,
    calibrations: Sequence[Calibration] | None = None,
    state: CascadeState | None = None,
    config: CascadeConfig = CascadeConfig(),
    progress: bool = True,
    desc: str | None = None,
    on_outcome: Callable[[Outcome], object] | None = None,
) -> StreamResult:
    """Fold :func:`step` over *queries*; return every :class:`Outcome` and the final state.

    Start from ``state`` (to resume) or from fresh repositories with the given
    ``calibrations`` (one per level, e.g. from :func:`calibrate_levels` on a separate
    strategy-free calibration split). Thresholds never change during a run.
    ``progress`` shows a tqdm bar on stderr; ``on_outcome`` is called with each outcome
    as it is decided (your own metrics, a live log).
    """
    from tqdm import tqdm

    if not isinstance(config, CascadeConfig):
        raise InvalidArgumentError("config", f"expected a CascadeConfig, got {type(config).__name__}")
    if on_outcome is not None and not callable(on_outcome):
        raise InvalidArgumentError("on_outcome", f"must be callable, got {type(on_outcome).__name__}")
    state = initial_state(state, calibrations, int(embedder.dim))
    items = list(queries)
    outcomes: list[Outcome] = []
    label = desc if desc is not None else f"inter-cascade[{config.policy}]"
    with tqdm(items, desc=label, disable=not progress, unit="q", leave=False) as bar:
        for q in bar:
            state, out = step(state, q, levels, embedder, config)
            outcomes.append(out)
            if on_outcome is not None:
                on_outcome(out)
    return StreamResult(tuple(outcomes), state)


@dataclass(frozen=True, slots=True, eq=False)
class CalibrationRun:
    """Thresholds and the calibration data they came from.

    ``confidences[i][j]``/``correct[i][j]``: level i on calibration item j (a failed call
    counts as confidence 0 and wrong, so it can never lower a threshold). ``prompts[i]``
    names the prompt level i was asked (``"strategy_free"`` or ``"answer_and_strategy"``).
    """

    calibrations: tuple[Calibration, ...]
    confidences: tuple[tuple[float, ...], ...]
    correct: tuple[tuple[bool, ...], ...]
    failures: tuple[tuple[str | None, ...], ...]
    usage: tuple[Usage, ...]
    prompts: tuple[str, ...] = ()


def calibration_prompt(query: Query, level: int, n_levels: int, config: CascadeConfig) -> str:
    """The prompt ``level`` is calibrated on: the one it answers with in deployment when no
    strategy is retrieved (:func:`~.machine.answer_prompt` itself, so the two cannot drift):
    the strategy-free prompt, or for the last level of a single-call teaching cascade the
    answer-and-strategy prompt, whose confidence distribution is the one its threshold
    is applied to."""
    return answer_prompt(query, level, n_levels, config, ())


def calibrate_levels(
    queries: Iterable[Query],
    levels: Sequence[Level],
    *,
    alpha: float,
    delta: float,
    config: CascadeConfig = CascadeConfig(),
    split_delta: bool = True,
    progress: bool = False,
    **calibrate_kw: Any,
) -> CalibrationRun:
    """Ask every level its calibration prompt (:func:`calibration_prompt` for ``config``:
    strategy-free, except the last level of a single-call cascade, which is asked the
    answer-and-strategy prompt it deploys with) on a calibration split (gold answers
    required) and calibrate the thresholds with Jung's sequential rule.

    Calibrate with the config the cascade runs with: the default config here matches the
    default of :func:`step`, and a Jung cascade needs ``CascadeConfig(policy="jung")``."""
    from tqdm import tqdm

    if not isinstance(config, CascadeConfig):
        raise InvalidArgumentError(
            "config", f"expected a CascadeConfig, got {type(config).__name__}"
        )
    items = list(queries)
    if not items:
        raise InvalidArgumentError("queries", "the calibration split is empty")
    for q in items:
        if q.gold is None:
            raise InvalidArgumentError(
                "queries", f"calibration query {q.id or q.text[:40]!r} has no gold answer"
            )
    confs: list[list[float]] = [[] for _ in levels]
    corr: list[list[bool]] = [[] for _ in levels]
    fails: list[list[str | None]] = [[] for _ in levels]
    usage = [Usage() for _ in levels]
    n = len(levels)
    for q in tqdm(items, desc="calibration", disable=not progress, unit="q", leave=False):
        for i, lv in enumerate(levels):
            try:
                gen = lv.model.generate(
                    as_messages(calibration_prompt(q, i, n, config)), **lv.params
                )
            except ModelError as e:
                confs[i].append(0.0)
                corr[i].append(False)
                fails[i].append(e.reason)
                continue
            usage[i] = usage[i].add(gen)
            g = grade(gen.text, q.gold, q.family)
            conf = gen.confidence if math.isfinite(gen.confidence) else 0.0
            confs[i].append(conf)
            corr[i].append(bool(g.correct))
            fails[i].append(None)
    cals = calibrate_cascade(
        [np.asarray(c, dtype=np.float64) for c in confs],
        [np.asarray(c, dtype=bool) for c in corr],
        alpha=alpha,
        delta=delta,
        split_delta=split_delta,
        **calibrate_kw,
    )
    return CalibrationRun(
        calibrations=tuple(cals),
        confidences=tuple(tuple(c) for c in confs),
        correct=tuple(tuple(c) for c in corr),
        failures=tuple(tuple(f) for f in fails),
        usage=tuple(usage),
        prompts=tuple(
            "answer_and_strategy" if single_call(i, n, config) else "strategy_free"
            for i in range(n)
        ),
    )
