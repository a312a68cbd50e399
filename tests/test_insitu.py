"""In-situ calibration end to end: the real cascade over the copying simulator.

One small, seeded world (tests/statistical/test_insitu_guarantee.py has the repeated-run
statistics): the weak model copies wrong same-template examples (``CopyingSimBackend``,
copy rate 0.6), the strong model is right 85% of the time with wrong answers up to 0.95
confident, so some wrong strategies clear λ_s. On a fresh test stream the paper's static
λ_w lets the copied answers through (accepted risk above α) while the in-situ λ_w — from a
replay of the calibration split through the same cascade — keeps it below α. This is a
mechanical check on one seed, not a statistical claim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from intercascade_core.core.audit import AuditConfig
from intercascade_core.core.calibrate import calibrate_cascade, risk_upper_bound
from intercascade_core.core.cascade import (
    CascadeConfig,
    Level,
    StreamResult,
    calibrate_levels,
    run_stream,
)
from intercascade_core.core.insitu import (
    InSituCalibration,
    calibrate_replay,
    deploy_state,
    insitu_calibrate,
    replay_pairs,
    risk_summary,
    risk_table,
)
from intercascade_core.core.prompts import as_messages, weak_prompt
from intercascade_core.core.repository import Entry
from intercascade_core.core.tasks import Query
from intercascade_core.errors import InvalidArgumentError
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import templated_math_stream
from intercascade_core.models.sim_copying import CopyingSimBackend

ALPHA, DELTA = 0.2, 0.1
EMB = HashingEmbedder(dim=64)
CONFIG = CascadeConfig(k=1, backend="numpy")
CAL = templated_math_stream(200, n_templates=8, seed=100)
TEST = templated_math_stream(200, n_templates=8, seed=200)



@dataclass
class World:
    levels: list[Level]
    insitu: InSituCalibration
    static_run: StreamResult
    insitu_run: StreamResult


@pytest.fixture(scope="module")
def world(misleading_teacher: Any) -> Iterator[World]:
    with httpx.Client(transport=misleading_teacher().transport()) as client:
        levels = [Level(ChatModel("http://sim/v1", n, client=client, sleep=lambda s: None))
                  for n in ("sim-weak", "sim-strong")]
        ins = insitu_calibrate(CAL, levels, EMB, alpha=ALPHA, delta=DELTA, config=CONFIG)
        static_run = run_stream(TEST, levels, EMB, calibrations=ins.static, config=CONFIG, progress=False)
        insitu_run = run_stream(TEST, levels, EMB, calibrations=ins.calibrations, config=CONFIG, progress=False)
        yield World(levels, ins, static_run, insitu_run)


# ---------------------------------------------------------------------- the copying model
def test_copying_backend_raises_confidence_on_wrong_examples(misleading_teacher: Any) -> None:
    be = misleading_teacher()
    queries = templated_math_stream(60, n_templates=2, seed=7)
    with httpx.Client(transport=be.transport()) as client:
        weak = ChatModel("http://sim/v1", "sim-weak", client=client, sleep=lambda s: None)
        wrong_conf: dict[str, list[float]] = {"none": [], "right": [], "wrong": []}
        copied = 0
        for q, ex in zip(queries[1:], queries[:-1], strict=True):
            if q.template != ex.template:
                continue
            right = Entry(query=ex.text, answer=str(ex.gold), strategy="s" * 30)
            bad = Entry(query=ex.text, answer=str(float(ex.gold or 0) + 7), strategy="s" * 30)
            assert be.shows_wrong_example(weak_prompt(q, [bad]))
            assert not be.shows_wrong_example(weak_prompt(q, [right]))
            for key, entries in (("none", []), ("right", [right]), ("wrong", [bad])):
                g = weak.generate(as_messages(weak_prompt(q, entries)))
                answer = g.text.rsplit("Answer:", 1)[-1].strip()
                if answer != q.gold:
                    wrong_conf[key].append(g.confidence)
                    copied += key == "wrong"
        assert copied >= 5
        # a wrong example: the weak model's wrong answers are confident (>= 0.8)
        assert min(wrong_conf["wrong"]) >= 0.8
        assert np.mean(wrong_conf["wrong"]) > np.mean(wrong_conf["none"]) + 0.2


def test_copying_backend_ignores_other_templates_and_iv(misleading_teacher: Any) -> None:
    be = misleading_teacher()
    a = templated_math_stream(40, n_templates=2, seed=8)[0]
    qs = templated_math_stream(40, n_templates=2, seed=8)
    other = next(q for q in qs if q.template != a.template)
    bad = Entry(query=other.text, answer="-1", strategy="s" * 30)
    assert not be.shows_wrong_example(weak_prompt(a, [bad]))
    with pytest.raises(InvalidArgumentError, match="copy_rate"):
        CopyingSimBackend(copy_rate=2.0)
    with pytest.raises(InvalidArgumentError, match="copy_conf"):
        CopyingSimBackend(copy_conf=(0.9, 0.5, 1.0))


# ---------------------------------------------------------------------- end to end
def test_static_exceeds_alpha_insitu_does_not(world: World) -> None:
    ins = world.insitu
    s_static = risk_summary(world.static_run.outcomes, ins.static[0], alpha=ALPHA, delta=DELTA)
    s_insitu = risk_summary(world.insitu_run.outcomes, ins.calibrations[0], alpha=ALPHA, delta=DELTA)
    # seed 3: static accepts 156 weak answers with 41 wrong (0.263); in-situ 99 with 17 (0.172)
    assert s_static["exceeds_alpha"] and s_static["empirical_risk"] > ALPHA
    assert not s_insitu["exceeds_alpha"] and s_insitu["accepted"] >= 50
    assert ins.thresholds[0] > ins.static[0].threshold
    assert ins.converged


def test_replay_mechanics(world: World) -> None:
    ins = world.insitu
    cal_texts = {q.text for q in CAL}
    # strategies come only from the calibration split's own strong answers
    stored = ins.state.repositories[0].entries
    assert stored and all(e.query in cal_texts for e in stored)
    assert all(e.source_level == 1 for e in stored)
    assert len(stored) == sum(1 for o in ins.outcomes if o.stored_in)
    # every weak confidence is recorded, on the strategy-augmented prompt
    assert all(ins.asked[0]) and len(ins.confidences[0]) == len(CAL)
    assert [o.confidences[0] for o in ins.outcomes] == list(ins.confidences[0])
    assert sum(ins.with_strategies) > len(CAL) // 2 and not ins.with_strategies[0]
    # the strong level was asked exactly where the weak level deferred in the replay
    t_replay = ins.thresholds_per_round[-2]
    for j, o in enumerate(ins.outcomes):
        assert ins.asked[1][j] == (o.confidences[0] < t_replay[0])
    # the rounds start from the static thresholds and end at the deployed ones
    assert ins.thresholds_per_round[0] == tuple(c.threshold for c in ins.static)
    assert ins.thresholds_per_round[-1] == ins.thresholds
    assert ins.rounds == len(ins.thresholds_per_round) - 1


def test_replay_is_the_deployed_cascade(world: World) -> None:
    """The recorded replay is exactly run_stream over the calibration split with the
    thresholds of the last round."""
    ins = world.insitu
    from intercascade_core.core.calibrate import Calibration

    last = [Calibration(**{**{f: getattr(c, f) for f in c.__slots__}, "threshold": t})
            for c, t in zip(ins.calibrations, ins.thresholds_per_round[-2], strict=True)]
    again = run_stream(CAL, world.levels, EMB, calibrations=last, config=CONFIG, progress=False)
    assert [(o.status, o.level, o.confidences) for o in again.outcomes] == \
           [(o.status, o.level, o.confidences) for o in ins.outcomes]


def test_theorem_view_and_risk_summary(world: World) -> None:
    ins = world.insitu
    view = ins.theorem_view()
    # copying reverses Theorem 2.2: the static threshold certifies a larger α with strategies
    assert view["alpha_certified_with_strategies"] > view["alpha_certified_without_strategies"]
    assert view["n_with"] > view["n_without"]
    s = risk_summary(world.static_run.outcomes, ins.static[0], alpha=ALPHA, delta=DELTA,
                     strategy_free=(ins.static_confidences, ins.static_correct),
                     audit=AuditConfig(alpha=ALPHA, delta=DELTA))
    assert s["accepted"] == s["accepted_with_strategies"] + s["accepted_without_strategies"]
    assert s["errors"] == s["errors_with_strategies"] + s["errors_without_strategies"]
    assert s["risk_upper"] >= s["empirical_risk"]
    st = ins.static[0]  # its own bound is at δ/2 (split over the two levels); the summary's at δ
    assert s["alpha_certified_without_strategies"] == pytest.approx(
        risk_upper_bound(st.n_errors, st.n_accepted, delta=DELTA))
    assert s["alpha_certified_with_strategies"] > ALPHA
    # 41 wrong of 156 (0.26 vs α = 0.2) is too little evidence for an alarm at δ, but the
    # audit does not certify the static threshold either
    assert s["audit"]["verdict"] != "certified" and s["audit"]["n_labels"] == s["accepted"]
    ok = risk_summary(world.insitu_run.outcomes, ins.calibrations[0], alpha=ALPHA, delta=DELTA,
                      audit=AuditConfig(alpha=ALPHA, delta=DELTA))
    assert ok["audit"]["verdict"] != "alarm"


def test_deploy_state(world: World) -> None:
    ins = world.insitu
    cold = deploy_state(ins, EMB.dim)
    assert cold.thresholds == ins.thresholds and len(cold.repositories[0]) == 0
    warm = deploy_state(ins, EMB.dim, warm=True)
    assert len(warm.repositories[0]) == len(ins.state.repositories[0]) and warm.n_queries == 0


def test_pilot_thresholds_and_single_round(world: World) -> None:
    pilot = calibrate_levels(CAL[:120], world.levels, alpha=ALPHA, delta=DELTA)
    ins = insitu_calibrate(CAL[:120], world.levels, EMB, alpha=ALPHA, delta=DELTA, config=CONFIG,
                           pilot=pilot.calibrations, max_rounds=1)
    assert ins.rounds == 1 and ins.static == pilot.calibrations
    confs, corr, asked, _ = replay_pairs(ins.outcomes, 2)
    direct = calibrate_replay(
        [[c if a else 0.0 for c, a in zip(confs[i], asked[i], strict=True)] for i in range(2)],
        [[k if a else False for k, a in zip(corr[i], asked[i], strict=True)] for i in range(2)],
        alpha=ALPHA, delta=DELTA)
    assert tuple(c.threshold for c in direct) == ins.thresholds


def test_calibrate_replay_floor() -> None:
    rng = np.random.default_rng(0)
    conf = [rng.uniform(size=500), rng.uniform(size=500)]
    ok = [rng.uniform(size=500) < 0.3 + 0.7 * conf[0], rng.uniform(size=500) < 0.95]
    grid = np.linspace(0, 1, 101)
    base = calibrate_replay(conf, ok, alpha=ALPHA, delta=DELTA, grid=grid)
    assert base == calibrate_cascade(conf, ok, alpha=ALPHA, delta=DELTA, grid=grid)
    lam = base[0].threshold
    higher = float(grid[np.searchsorted(grid, lam) + 5])
    kept = calibrate_replay(conf, ok, alpha=ALPHA, delta=DELTA, grid=grid, floor=(higher, 0.0))
    assert kept[0].threshold == higher and kept[0].risk_bound <= ALPHA and "kept" in kept[0].note
    # the next level is calibrated on the items the kept threshold leaves
    assert kept[1].n_calibration == int((conf[0] < higher).sum())
    # a floor below λ̂ changes nothing; a floor off the grid is not certified, so λ̂ stays
    assert calibrate_replay(conf, ok, alpha=ALPHA, delta=DELTA, grid=grid, floor=(0.0, 0.0)) == base
    off = calibrate_replay(conf, ok, alpha=ALPHA, delta=DELTA, grid=grid, floor=(higher + 1e-3, 0.0))
    assert off[0].threshold == lam
    inf = calibrate_replay(conf, ok, alpha=ALPHA, delta=DELTA, grid=grid, floor=(math.inf, 0.0))
    assert math.isinf(inf[0].threshold) and inf[1].n_calibration == 500
    with pytest.raises(InvalidArgumentError, match="floor"):
        calibrate_replay(conf, ok, alpha=ALPHA, delta=DELTA, floor=(0.5,))


def test_insitu_iv(world: World) -> None:
    with pytest.raises(InvalidArgumentError, match="queries"):
        insitu_calibrate([], world.levels, EMB, alpha=ALPHA, delta=DELTA)
    with pytest.raises(InvalidArgumentError, match="gold"):
        insitu_calibrate([Query(text="no gold here")], world.levels, EMB, alpha=ALPHA, delta=DELTA)
    with pytest.raises(InvalidArgumentError, match="max_rounds"):
        insitu_calibrate(CAL[:5], world.levels, EMB, alpha=ALPHA, delta=DELTA, max_rounds=0)
    with pytest.raises(InvalidArgumentError, match="tol"):
        insitu_calibrate(CAL[:5], world.levels, EMB, alpha=ALPHA, delta=DELTA, tol=-1.0)
    with pytest.raises(InvalidArgumentError, match="config"):
        insitu_calibrate(CAL[:5], world.levels, EMB, alpha=ALPHA, delta=DELTA, config="retrieval")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="pilot"):
        insitu_calibrate(CAL[:5], world.levels, EMB, alpha=ALPHA, delta=DELTA, pilot=world.insitu.static[:1])
    with pytest.raises(InvalidArgumentError, match="calibration"):
        risk_summary([], 0.5, alpha=ALPHA, delta=DELTA)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="audit"):
        risk_summary([], world.insitu.static[0], alpha=ALPHA, delta=DELTA, audit="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="result"):
        deploy_state("x", 8)  # type: ignore[arg-type]


def test_risk_table(world: World) -> None:
    ins = world.insitu
    audit = AuditConfig(alpha=ALPHA, delta=DELTA)
    table = risk_table({
        "retrieval": risk_summary(world.static_run.outcomes, ins.static[0], alpha=ALPHA, delta=DELTA, audit=audit),
        "retrieval+insitu": risk_summary(world.insitu_run.outcomes, ins.calibrations[0], alpha=ALPHA, delta=DELTA,
                                         audit=audit),
    }, labels={"retrieval": "Inter-Cascade (static λ_w)"})
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| Inter-Cascade (static λ_w) |")
    assert "**yes**" in lines[2] and "| no |" in lines[3]
    assert "| 20.00 |" in lines[2]  # α in percent


def test_risk_summary_of_a_strategy_free_variant(world: World) -> None:
    ins = world.insitu
    jung = run_stream(TEST[:40], world.levels, EMB, calibrations=ins.static,
                      config=CascadeConfig(policy="jung"), progress=False)
    s = risk_summary(jung.outcomes, ins.static[0], alpha=ALPHA, delta=DELTA)
    assert s["accepted_with_strategies"] == 0 and s["alpha_certified_with_strategies"] is None
    assert s["accepted"] == sum(o.level == 0 for o in jung.outcomes)
    assert "| – |" in risk_table({"jung": s})


def test_copying_stream_dynamics() -> None:
    from intercascade_core.models.sim_copying import CopyingProcess

    proc = CopyingProcess()
    noise = proc.stream_noise(np.random.default_rng(0), 4, 300, n_templates=5)
    never_teach = proc.stream(noise, 0.0)  # the weak model accepts everything: nothing is taught
    assert (never_teach[2] == 0).all()
    always = proc.stream(noise, np.full(4, math.inf))  # everything deferred: strategies pile up
    assert (always[2][:, 50:] > 0).mean() > 0.9 and (always[2] == 2).any()
    again = proc.stream(noise, np.full(4, math.inf))  # same noise, same thresholds: a replay
    for x, y in zip(always, again, strict=True):
        np.testing.assert_array_equal(x, y)
    # correctness follows the strategy seen: copies are mostly wrong, taught answers right
    ok, seen = always[1], always[2]
    assert ok[seen == 2].mean() < 0.4
    assert ok[seen == 1].mean() > 0.8
