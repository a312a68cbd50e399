"""The online risk audit: pure state threading, the sequential schedule, events and actions."""

from __future__ import annotations

import dataclasses
import itertools
import math

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from intercascade_core.core.audit import (
    AuditConfig,
    AuditState,
    RiskAlarm,
    apply_alarm,
    audit_outcomes,
    audited_stream,
    checkpoint_delta,
    first_alarm,
    init_audit,
    observe,
    observe_many,
    reset,
    should_label,
    strong_model_grader,
)
from intercascade_core.core.calibrate import Calibration, calibrate
from intercascade_core.core.cascade import CascadeConfig, CascadeState, Level, Outcome, init_state
from intercascade_core.errors import InvalidArgumentError, RiskAlarmError
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import DEFAULT_PROFILES, SimProfile, templated_math_stream
from intercascade_core.models.sim_copying import CopyingSimBackend

ALPHA, DELTA = 0.15, 0.1


def _fold_first(labels: np.ndarray, cfg: AuditConfig) -> int:
    state = init_audit(cfg)
    for x in labels:
        state, ev = observe(state, bool(x))
        if ev is not None:
            return ev.n_labels
    return -1


def test_audit_config_iv() -> None:
    with pytest.raises(InvalidArgumentError, match="alpha"):
        AuditConfig(alpha=1.5, delta=0.1)
    with pytest.raises(InvalidArgumentError, match="delta"):
        AuditConfig(alpha=0.1, delta=0.0)
    with pytest.raises(InvalidArgumentError, match="every"):
        AuditConfig(alpha=0.1, delta=0.1, every=0)
    with pytest.raises(InvalidArgumentError, match="ratio"):
        AuditConfig(alpha=0.1, delta=0.1, ratio=1.0)
    with pytest.raises(InvalidArgumentError, match="window"):
        AuditConfig(alpha=0.1, delta=0.1, window=0)
    with pytest.raises(InvalidArgumentError, match="action"):
        AuditConfig(alpha=0.1, delta=0.1, action="panic")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="correct"):
        observe(init_audit(AuditConfig(alpha=0.1, delta=0.1)), "yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="state"):
        observe("state", True)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="labels"):
        first_alarm(np.zeros(5), AuditConfig(alpha=0.1, delta=0.1))
    with pytest.raises(InvalidArgumentError, match="rate"):
        should_label("q", 1.5)


def test_delta_schedule_sums_to_delta() -> None:
    j = np.arange(1, 2_000_001)
    total = float(np.sum(checkpoint_delta(DELTA, j)))
    assert total <= DELTA
    assert total > DELTA * (1 - 1e-6)
    assert checkpoint_delta(DELTA, 1) == pytest.approx(DELTA * 6 / math.pi**2)


def test_checkpoint_schedules() -> None:
    lin = AuditConfig(alpha=ALPHA, delta=DELTA, every=7)
    assert lin.checkpoints_upto(30) == [7, 14, 21, 28]
    geo = AuditConfig(alpha=ALPHA, delta=DELTA, ratio=1.5, first=2)
    cps = geo.checkpoints_upto(20)
    assert cps == [2, 3, 5, 7, 11, 16]
    assert all(b > a for a, b in itertools.pairwise(cps))


def test_observe_is_pure_and_counts() -> None:
    cfg = AuditConfig(alpha=ALPHA, delta=DELTA, every=5, window=3)
    s0 = init_audit(cfg)
    s1, ev = observe(s0, False)
    assert ev is None
    assert (s0.n, s0.n_wrong, s0.recent) == (0, 0, ())
    assert (s1.n, s1.n_wrong, s1.recent) == (1, 1, (False,))
    s, _ = observe_many(s1, [True, True, True, False])
    assert s.recent == (True, True, False)  # the last 3 labels
    assert s.checkpoint_index == 1 and s.n == 5
    assert s.risk_lower <= s.empirical_risk <= s.risk_upper


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    p=st.floats(0.0, 0.8),
    window=st.one_of(st.none(), st.integers(1, 80)),
    every=st.integers(1, 25),
    geometric=st.booleans(),
)
def test_vectorised_audit_equals_folding_observe(
    seed: int, n: int, p: float, window: int | None, every: int, geometric: bool
) -> None:
    cfg = AuditConfig(alpha=ALPHA, delta=DELTA, every=every, window=window,
                      ratio=1.3 if geometric else None, first=every)
    labels = np.random.default_rng(seed).uniform(size=(3, n)) >= p
    fast = first_alarm(labels, cfg)
    assert [int(x) for x in fast] == [_fold_first(row, cfg) for row in labels]
    assert int(first_alarm(labels[0], cfg)) == int(fast[0])


def test_alarm_event_is_a_valid_rejection() -> None:
    cfg = AuditConfig(alpha=ALPHA, delta=DELTA, every=10, action="defer_all")
    state, events = observe_many(init_audit(cfg), [False] * 6 + [True] * 4)
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, RiskAlarm)
    assert (ev.n_labels, ev.checkpoint, ev.n_window, ev.n_wrong) == (10, 1, 10, 6)
    assert ev.delta_j == pytest.approx(DELTA * 6 / math.pi**2)
    assert ev.p_value == pytest.approx(stats.binom.sf(5, 10, ALPHA))
    assert ev.p_value <= ev.delta_j
    assert ev.lower_bound > ALPHA
    assert ev.action == "defer_all"
    assert state.verdict == "alarm" and state.alarm == ev
    # one alarm per epoch: more bad labels emit nothing new
    state2, more = observe_many(state, [False] * 30)
    assert more == () and state2.alarm == ev
    # a reset starts a new epoch that can alarm again
    fresh = reset(state2)
    assert fresh.n == 0 and fresh.alarm is None and fresh.epoch == 1 and fresh.n_total == 40
    _, again = observe_many(fresh, [False] * 10)
    assert len(again) == 1


def test_raise_on_alarm() -> None:
    cfg = AuditConfig(alpha=ALPHA, delta=DELTA, every=10, raise_on_alarm=True)
    with pytest.raises(RiskAlarmError) as info:
        observe_many(init_audit(cfg), [False] * 10)
    assert info.value.event.n_wrong == 10


def test_verdict_certified_when_upper_bound_below_alpha() -> None:
    cfg = AuditConfig(alpha=ALPHA, delta=DELTA, every=50)
    state, events = observe_many(init_audit(cfg), [True] * 100)
    assert events == ()
    assert state.verdict == "certified" and state.risk_upper <= ALPHA
    summary = state.summary()
    assert summary["verdict"] == "certified" and summary["n_labels"] == 100
    assert "union bound" in str(summary["procedure"])
    assert init_audit(cfg).verdict == "inconclusive"


def test_should_label_is_stable_and_answer_blind() -> None:
    keys = [f"q{i}" for i in range(4000)]
    picks = [should_label(k, 0.25, seed=3) for k in keys]
    assert picks == [should_label(k, 0.25, seed=3) for k in keys]
    assert abs(sum(picks) / len(picks) - 0.25) < 0.03
    assert not any(should_label(k, 0.0) for k in keys[:50])
    assert all(should_label(k, 1.0) for k in keys[:50])


def _outcome(i: int, level: int | None, correct: bool | None) -> Outcome:
    return Outcome(
        index=i, query_id=f"q{i}", status="accepted" if level is not None else "discarded", level=level,
        answer="1", correct=correct, unparseable=False, confidences=(0.9, 0.9),
        level_answers=("1", "1"), level_correct=(correct, correct), strategies=((), ()),
        usage=(), teach_usage=(), failures=(None, None),
    )


def test_audit_outcomes_uses_weak_accepted_only() -> None:
    outs = [_outcome(i, 0, i % 2 == 0) for i in range(20)] + [_outcome(20 + i, 1, False) for i in range(20)]
    outs.append(_outcome(99, None, None))
    cfg = AuditConfig(alpha=ALPHA, delta=DELTA)
    state, _ = audit_outcomes(outs, cfg)
    assert (state.n, state.n_wrong) == (20, 10)
    half, _ = audit_outcomes(outs, cfg, rate=0.5, seed=1)
    assert 0 < half.n < 20


def _state() -> CascadeState:
    conf = np.linspace(0.5, 1, 200)
    ok = np.ones(200, dtype=bool)
    cal = calibrate(conf, ok, alpha=ALPHA, delta=DELTA)
    return init_state([cal, cal], dim=8)


def test_apply_alarm_defers_everything_and_is_pure() -> None:
    st0 = _state()
    ev = RiskAlarm(n_labels=10, checkpoint=1, n_window=10, n_wrong=8, alpha=ALPHA, delta_j=0.06,
                   p_value=1e-5, lower_bound=0.4, upper_bound=0.95, action="defer_all")
    st1 = apply_alarm(st0, ev)
    assert math.isinf(st1.thresholds[0]) and st1.calibrations[0].abstained
    assert st1.thresholds[1] == st0.thresholds[1]
    assert math.isfinite(st0.thresholds[0])  # unchanged input
    none_ev = RiskAlarm(**{**{f: getattr(ev, f) for f in ev.__slots__}, "action": "recalibrate"})
    assert apply_alarm(st0, none_ev) is st0
    with pytest.raises(InvalidArgumentError, match="level"):
        apply_alarm(st0, ev, level=1)


def test_audit_state_is_frozen() -> None:
    s = init_audit(AuditConfig(alpha=ALPHA, delta=DELTA))
    assert isinstance(s, AuditState)
    with pytest.raises(AttributeError):
        s.n = 3  # type: ignore[misc]


# ---------------------------------------------------------------------- the audited stream
def _copying_world(client: httpx.Client) -> tuple[list[Level], tuple[Calibration, Calibration]]:
    levels = [Level(ChatModel("http://sim/v1", n, client=client, sleep=lambda s: None))
              for n in ("sim-weak", "sim-strong")]
    base = calibrate(np.linspace(0.5, 1, 200), np.ones(200, dtype=bool), alpha=ALPHA, delta=DELTA)
    # a weak threshold that is safe without strategies in the simulator (wrong answers
    # there are at most 0.80 confident) but not against copied wrong strategies
    cals = (dataclasses.replace(base, threshold=0.81), dataclasses.replace(base, threshold=0.3))
    return levels, cals


def test_audited_stream_defers_everything_after_an_alarm() -> None:
    profiles = dict(DEFAULT_PROFILES)
    profiles["sim-strong"] = SimProfile(0.6, 0.2, 0.9, wrong_conf=(0.5, 0.95, 1.0))
    backend = CopyingSimBackend(seed=3, profiles=profiles, copy_rate=0.95)
    stream = templated_math_stream(160, n_templates=4, seed=11)
    with httpx.Client(transport=backend.transport()) as client:
        levels, cals = _copying_world(client)
        cfg = AuditConfig(alpha=ALPHA, delta=DELTA, every=10, action="defer_all")
        run = audited_stream(stream, levels, HashingEmbedder(dim=32), audit=cfg, calibrations=cals,
                             config=CascadeConfig(k=2, backend="numpy"))
        assert len(run.events) == 1
        at, ev = run.events[0]
        assert ev.n_wrong / ev.n_window > ALPHA and run.audit.verdict == "alarm"
        assert all(o.level != 0 for o in run.outcomes[at + 1:])  # everything deferred after
        assert any(o.level == 0 for o in run.outcomes[: at + 1])
        assert math.isinf(run.state.thresholds[0])
        assert len(run.labelled) == run.audit.n

        # "recalibrate": the callback's state is used and a new audit epoch starts
        calls: list[int] = []

        def recal(state: CascadeState, event: RiskAlarm) -> CascadeState:
            calls.append(event.n_labels)
            return apply_alarm(state, dataclasses.replace(event, action="defer_all"))

        cfg2 = dataclasses.replace(cfg, action="recalibrate")
        with pytest.raises(InvalidArgumentError, match="recalibrate"):
            audited_stream(stream, levels, HashingEmbedder(dim=32), audit=cfg2, calibrations=cals)
        run2 = audited_stream(stream, levels, HashingEmbedder(dim=32), audit=cfg2, calibrations=cals,
                              config=CascadeConfig(k=2, backend="numpy"), recalibrate=recal)
        assert calls == [ev.n_labels] and run2.audit.epoch == 1 and run2.audit.alarm is None

        # labelling a sample through the strong model as the grader
        run3 = audited_stream(stream[:60], levels, HashingEmbedder(dim=32), audit=AuditConfig(alpha=ALPHA, delta=DELTA),
                              calibrations=cals, config=CascadeConfig(k=2, backend="numpy"),
                              grader=strong_model_grader(levels[1]), rate=0.5, seed=1)
        weak_acc = [i for i, o in enumerate(run3.outcomes) if o.level == 0]
        assert set(run3.labelled) <= set(weak_acc) and 0 < len(run3.labelled) < len(weak_acc)
