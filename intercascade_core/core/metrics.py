"""The paper's Table 2 metrics from a run's outcomes (algorithms.md §6).

With N queries, N_u discarded, N_w weak (level 0) calls, N_s strong (last level) calls,
C_w / C_s correct-and-accepted answers of the weak / strong level and C_w^all the weak
level's correct answers whether accepted or not:

- Pipeline Accuracy      = (C_w + C_s + C_mid) / (N - N_u)  (1.0 when N_u = N, Jung's convention)
- Strong LLM Call Rate   = N_s / N
- Coverage               = (N - N_u) / N
- Weak Accuracy          = C_w^all / N_w
- Weak Correct Accepted  = C_w / N_w
- Token / Cost Reduction = (T_J - T_I) / T_J against a baseline run (the Jung cascade).

What is counted, by name:

- ``strong_tokens`` / ``strong_cost``: the strong (last) level's *answer* calls, prompt
  and completion. In single-call mode (the paper's, and the default) that one call also
  writes the strategy, so this is the paper's count; ``token_reduction`` /
  ``cost_reduction`` compare it with the baseline's (the paper's Table 5);
- ``teaching_tokens`` / ``teaching_cost``: the separate strategy calls of two-call mode
  (every level; 0 in single-call mode), which the paper's pipeline does not make;
- ``*_reduction_with_teaching``: strong answers plus teaching against the baseline's;
- ``total_tokens`` / ``total_cost`` and ``*_reduction_total``: every call of every level.

An outcome without a gold answer counts as not correct; accuracies are NaN when no
outcome of the relevant kind has a gold answer. A failed call still counts as a call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .cascade import Outcome, Usage

__all__ = ["Metrics", "compute_metrics", "reduction"]


@dataclass(frozen=True, slots=True)
class Metrics:
    n: int
    n_levels: int
    n_discarded: int
    n_failed: int
    n_unparseable: int
    n_strategies_stored: int
    n_strategies_rejected: int
    calls_per_level: tuple[int, ...]
    accepted_per_level: tuple[int, ...]
    correct_accepted_per_level: tuple[int, ...]
    pipeline_accuracy: float
    strong_call_rate: float
    coverage: float
    weak_accuracy: float
    weak_correct_accepted: float
    strong_tokens: int
    total_tokens: int
    strong_cost: float | None
    total_cost: float | None
    teaching_tokens: int = 0
    teaching_cost: float | None = 0.0
    token_reduction: float = math.nan
    cost_reduction: float = math.nan
    token_reduction_with_teaching: float = math.nan
    cost_reduction_with_teaching: float = math.nan
    token_reduction_total: float = math.nan
    cost_reduction_total: float = math.nan

    def as_dict(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def reduction(baseline: float | None, ours: float | None) -> float:
    """(baseline - ours) / baseline; NaN when either is unknown or the baseline is 0."""
    if baseline is None or ours is None or baseline == 0:
        return math.nan
    return (baseline - ours) / baseline


def _spend(
    outcomes: Sequence[Outcome], levels: range, *, answers: bool = True, teaching: bool = True
) -> Usage:
    total = Usage()
    for o in outcomes:
        for i in levels:
            if answers:
                total = total + o.usage[i]
            if teaching:
                total = total + o.teach_usage[i]
    return total


def _plus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def compute_metrics(
    outcomes: Sequence[Outcome], *, baseline: Sequence[Outcome] | None = None
) -> Metrics:
    """Table 2 from *outcomes*; reductions are against *baseline* (same stream) if given."""
    outs = tuple(outcomes)
    if not outs:
        raise InvalidArgumentError("outcomes", "no outcomes to summarise")
    n_levels = outs[0].n_levels
    if any(o.n_levels != n_levels for o in outs):
        raise InvalidArgumentError("outcomes", "outcomes mix cascades with different level counts")
    n = len(outs)
    calls = [0] * n_levels
    acc = [0] * n_levels
    corr_acc = [0] * n_levels
    n_disc = n_fail = n_unp = n_stored = n_rejected = 0
    weak_correct_all = 0
    weak_graded = 0
    for o in outs:
        for i in range(n_levels):
            if o.confidences[i] is not None or o.failures[i] is not None:
                calls[i] += 1
        if o.level_correct[0] is not None:
            weak_graded += 1
            weak_correct_all += bool(o.level_correct[0])
        if o.status == "discarded":
            n_disc += 1
        else:
            assert o.level is not None
            acc[o.level] += 1
            corr_acc[o.level] += bool(o.correct)
            n_unp += o.unparseable
        n_fail += o.failed
        n_stored += bool(o.stored_in)
        n_rejected += o.strategy_rejected is not None
    covered = n - n_disc
    n_w, n_s = calls[0], calls[-1]
    strong = _spend(outs, range(n_levels - 1, n_levels), teaching=False)
    teaching = _spend(outs, range(n_levels), answers=False)
    total = _spend(outs, range(n_levels))
    any_gold = any(o.level_correct[0] is not None or o.correct is not None for o in outs)
    nan = math.nan
    metrics = Metrics(
        n=n,
        n_levels=n_levels,
        n_discarded=n_disc,
        n_failed=n_fail,
        n_unparseable=n_unp,
        n_strategies_stored=n_stored,
        n_strategies_rejected=n_rejected,
        calls_per_level=tuple(calls),
        accepted_per_level=tuple(acc),
        correct_accepted_per_level=tuple(corr_acc),
        pipeline_accuracy=(sum(corr_acc) / covered if covered else 1.0) if any_gold else nan,
        strong_call_rate=n_s / n,
        coverage=covered / n,
        weak_accuracy=weak_correct_all / n_w if n_w and weak_graded else nan,
        weak_correct_accepted=corr_acc[0] / n_w if n_w and any_gold else nan,
        strong_tokens=strong.tokens,
        total_tokens=total.tokens,
        strong_cost=strong.cost,
        total_cost=total.cost,
        teaching_tokens=teaching.tokens,
        teaching_cost=teaching.cost,
    )
    if baseline is None:
        return metrics
    base = tuple(baseline)
    if len(base) != n:
        raise InvalidArgumentError(
            "baseline", f"baseline has {len(base)} outcomes, this run has {n}: not the same stream"
        )
    b = compute_metrics(base)
    return dataclasses.replace(
        metrics,
        token_reduction=reduction(b.strong_tokens, metrics.strong_tokens),
        cost_reduction=reduction(b.strong_cost, metrics.strong_cost),
        token_reduction_with_teaching=reduction(
            b.strong_tokens + b.teaching_tokens, metrics.strong_tokens + metrics.teaching_tokens
        ),
        cost_reduction_with_teaching=reduction(
            _plus(b.strong_cost, b.teaching_cost), _plus(metrics.strong_cost, metrics.teaching_cost)
        ),
        token_reduction_total=reduction(b.total_tokens, metrics.total_tokens),
        cost_reduction_total=reduction(b.total_cost, metrics.total_cost),
    )
