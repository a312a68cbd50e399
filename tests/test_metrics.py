"""Table 2 metrics (algorithms.md §6) and invariants 26-30 as property tests."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.core.cascade import Outcome, Usage
from intercascade_core.core.metrics import compute_metrics, reduction
from intercascade_core.errors import InvalidArgumentError


@st.composite
def outcomes(draw: st.DrawFn, n_levels: int = 2) -> Outcome:
    """One plausible outcome: levels 0..j asked, j accepted or everything deferred."""
    accepted_at = draw(st.one_of(st.none(), st.integers(0, n_levels - 1)))
    asked = n_levels if accepted_at is None else accepted_at + 1
    conf = tuple(draw(st.floats(0, 1)) if i < asked else None for i in range(n_levels))
    corr = tuple(draw(st.booleans()) if i < asked else None for i in range(n_levels))
    answers = tuple("1" if i < asked else None for i in range(n_levels))

    def usage(i: int, teach: bool = False) -> Usage:
        if i >= asked or (teach and (i != accepted_at or i == 0)):  # only levels >= 1 teach
            return Usage()
        return Usage(
            1, draw(st.integers(0, 2000)), draw(st.integers(0, 500)), draw(st.floats(0, 1))
        )

    return Outcome(
        index=0,
        query_id="",
        status="discarded" if accepted_at is None else "accepted",
        level=accepted_at,
        answer=None if accepted_at is None else "1",
        correct=None if accepted_at is None else corr[accepted_at],
        unparseable=False,
        confidences=conf,
        level_answers=answers,
        level_correct=corr,
        strategies=((),) * n_levels,
        usage=tuple(usage(i) for i in range(n_levels)),
        teach_usage=tuple(usage(i, True) for i in range(n_levels)),
        failures=(None,) * n_levels,
    )


runs = st.lists(outcomes(), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(outs=runs)
def test_invariants_26_to_29(outs: list[Outcome]) -> None:
    m = compute_metrics(outs)
    n = len(outs)
    for f in (
        "pipeline_accuracy",
        "strong_call_rate",
        "coverage",
        "weak_accuracy",
        "weak_correct_accepted",
    ):
        assert 0.0 <= getattr(m, f) <= 1.0, f  # 26
    assert m.weak_correct_accepted <= m.weak_accuracy  # 27
    assert m.coverage == pytest.approx(1 - m.n_discarded / n)  # 28
    c_w, c_s = m.correct_accepted_per_level
    assert m.pipeline_accuracy * m.coverage * n == pytest.approx(c_w + c_s)  # 29
    assert m.calls_per_level[0] == n  # every query asks the weak model
    assert m.calls_per_level[1] == n - m.accepted_per_level[0]  # N_s = N - weak accepted
    assert m.strong_call_rate == m.calls_per_level[1] / n


@settings(max_examples=100, deadline=None)
@given(outs=runs, extra=outcomes())
def test_invariant_30_reductions(outs: list[Outcome], extra: Outcome) -> None:
    same = compute_metrics(outs, baseline=outs)
    for f in ("token_reduction", "cost_reduction", "token_reduction_total", "cost_reduction_total"):
        v = getattr(same, f)
        assert v == 0.0 or math.isnan(v)  # 0, or NaN when the baseline spent nothing
    # spending more than the baseline gives a negative reduction
    bigger = [o for o in outs]
    o = bigger[0]
    u = o.usage[1] + Usage(1, 1000, 1000, 1.0)
    bigger[0] = Outcome(
        **{**{f: getattr(o, f) for f in o.__dataclass_fields__}, "usage": (o.usage[0], u)}
    )
    m = compute_metrics(bigger, baseline=outs)
    b = compute_metrics(outs)
    for f, base in (
        ("token_reduction", b.strong_tokens),
        ("cost_reduction", b.strong_cost),
        ("token_reduction_total", b.total_tokens),
        ("cost_reduction_total", b.total_cost),
    ):
        v = getattr(m, f)
        assert v < 0 if base else math.isnan(v), f  # NaN only against a baseline that spent 0


def test_table2_by_hand() -> None:
    def o(level: int | None, weak_ok: bool, ok: bool | None, strong_tokens: int = 0) -> Outcome:
        asked = 2 if level != 0 else 1
        return Outcome(
            index=0,
            query_id="",
            status="discarded" if level is None else "accepted",
            level=level,
            answer=None,
            correct=ok,
            unparseable=False,
            confidences=(0.5, 0.5 if asked == 2 else None),
            level_answers=(None, None),
            level_correct=(weak_ok, None if asked == 1 else bool(ok)),
            strategies=((), ()),
            usage=(
                Usage(1, 10, 10, 0.1),
                Usage(1, strong_tokens, 0, strong_tokens / 100) if asked == 2 else Usage(),
            ),
            teach_usage=(Usage(), Usage()),
            failures=(None, None),
        )

    outs = [
        o(0, True, True),
        o(0, False, False),
        o(1, False, True, 100),
        o(1, True, False, 100),
        o(None, False, None, 100),
    ]
    m = compute_metrics(outs)
    assert m.pipeline_accuracy == pytest.approx(2 / 4)  # (C_w + C_s) / (N - N_u)
    assert m.coverage == pytest.approx(4 / 5)
    assert m.strong_call_rate == pytest.approx(3 / 5)
    assert m.weak_accuracy == pytest.approx(2 / 5)  # C_w^all / N_w
    assert m.weak_correct_accepted == pytest.approx(1 / 5)  # C_w / N_w
    assert m.strong_tokens == 300 and m.total_tokens == 400
    base = outs[:2] + [o(1, False, True, 200)] * 3
    r = compute_metrics(outs, baseline=base)
    assert r.token_reduction == pytest.approx((600 - 300) / 600)
    assert r.cost_reduction == pytest.approx((6 - 3) / 6)
    assert r.token_reduction_total == pytest.approx((700 - 400) / 700)


def test_conventions_and_validation() -> None:
    assert reduction(0, 5) != reduction(0, 5)  # NaN for a zero baseline
    assert reduction(None, 1) != reduction(None, 1)
    with pytest.raises(InvalidArgumentError, match="outcomes"):
        compute_metrics([])


def test_teaching_is_its_own_column_and_the_strong_figure_is_the_answers_only() -> None:
    """Table 5 counts the strong level's answer calls (the paper's figure); the separate
    strategy calls of two-call mode are teaching, and the totals add both."""

    def o(teach: Usage, rejected: str | None = None) -> Outcome:
        return Outcome(
            index=0, query_id="", status="accepted", level=1, answer="4", correct=True,
            unparseable=False, confidences=(0.1, 0.9), level_answers=("1", "4"),
            level_correct=(False, True), strategies=((), ()),
            usage=(Usage(1, 10, 10, 0.1), Usage(1, 100, 100, 2.0)),
            teach_usage=(Usage(), teach), failures=(None, None),
            stored_in=() if rejected else (0,), strategy_rejected=rejected,
        )

    two_call = [o(Usage(1, 150, 50, 1.0)), o(Usage(1, 150, 50, 1.0), "too short")]
    base = [o(Usage())] * 2
    m = compute_metrics(two_call, baseline=base)
    assert (m.strong_tokens, m.teaching_tokens, m.total_tokens) == (400, 400, 840)
    assert m.strong_cost == pytest.approx(4.0) and m.teaching_cost == pytest.approx(2.0)
    assert m.token_reduction == 0.0 and m.cost_reduction == 0.0
    assert m.token_reduction_with_teaching == pytest.approx((400 - 800) / 400)
    assert m.cost_reduction_with_teaching == pytest.approx((4.0 - 6.0) / 4.0)
    assert m.token_reduction_total == pytest.approx((440 - 840) / 440)
    assert (m.n_strategies_stored, m.n_strategies_rejected) == (1, 1)
    unknown = [o(Usage(1, 1, 1, None))] * 2
    assert math.isnan(compute_metrics(unknown, baseline=base).cost_reduction_with_teaching)
