"""evaluate.py in-process: one calibration for all variants, Jung = k 0, plain-data output."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from intercascade_core.errors import EndpointError, InvalidArgumentError, MissingAPIKeyError
from intercascade_core.lab.config import DataConfig, ModelConfig
from intercascade_core.lab.datasets import gsm_symbolic_split, to_queries
from intercascade_core.lab.evaluate import (
    CachedEmbedder,
    evaluate,
    load_streams,
    make_levels,
    outcome_records,
    results_document,
    sim_client,
)
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import template_signature

DATA = Path(__file__).parent / "fixtures" / "data"
SIM_MODELS = (
    ModelConfig("weak", "sim:weak", "sim-weak", price_input=0.5, price_output=1.5),
    ModelConfig("strong", "sim:strong", "sim-strong", price_input=2.5, price_output=10.0),
)


@pytest.fixture(scope="module")
def small_eval():  # type: ignore[no-untyped-def]
    sp = gsm_symbolic_split(templates=4, variants=10, calibration_variants=80, seed=3)
    cal, test = to_queries(sp.calibration), to_queries(sp.test)
    levels = make_levels(SIM_MODELS, sim_client=sim_client((*cal, *test), seed=3))
    ev = evaluate(cal, test, levels, HashingEmbedder(384), alpha=0.2, delta=0.1, k=2, backend="numpy",
                  seed=3, progress=False)
    return ev, cal, test


def test_one_calibration_three_variants(small_eval) -> None:  # type: ignore[no-untyped-def]
    ev, _, test = small_eval
    assert list(ev.runs) == ["jung", "random", "retrieval"]
    assert ev.teach_calibration is not None  # single-call: the strong level's own prompt
    assert ev.calibration.prompts == ("strategy_free", "strategy_free")
    assert ev.teach_calibration.prompts == ("strategy_free", "answer_and_strategy")
    for v, run in ev.runs.items():
        cal_run = ev.calibration if v == "jung" else ev.teach_calibration
        assert run.state.calibrations == cal_run.calibrations  # thresholds never change
        assert [o.query_id for o in run.outcomes] == [q.id for q in test]
    assert len(ev.runs["jung"].state.repositories[0]) == 0
    # every query ends in exactly one state
    for run in ev.runs.values():
        assert {o.kind for o in run.outcomes} <= {"weak_accepted", "strong_accepted", "discarded"}


def test_results_document_and_records(small_eval) -> None:  # type: ignore[no-untyped-def]
    ev, cal, test = small_eval
    doc = results_document(ev, dataset={"name": "x", "n_test": len(test)}, settings={"embedder": "hash"})
    json.dumps(doc, allow_nan=False)  # strict JSON (no NaN/inf)
    assert set(doc["variants"]) == {"jung", "random", "retrieval"}
    for v, m in doc["variants"].items():
        for key in ("pipeline_accuracy", "strong_call_rate", "coverage", "weak_accuracy", "weak_correct_accepted"):
            assert 0.0 <= m[key] <= 1.0
        assert m["weak_correct_accepted"] <= m["weak_accuracy"]
        assert ("token_reduction" in m) == (v != "jung")
        assert m["strong_calls"] == round(m["strong_call_rate"] * len(test))
    assert doc["calibration"]["n_calibration"] == len(cal)
    assert doc["settings"]["embedder"] == "hash" and doc["settings"]["alpha"] == 0.2
    st = doc["settings"]
    assert (st["delta"], st["min_n"], st["strategy_mode"], st["store_rule"]) == (0.1, 30, "single_call", "paper")
    assert doc["teach_calibration"]["prompts"] == ["strategy_free", "answer_and_strategy"]
    for lv, corr in zip(doc["calibration"]["levels"], ev.calibration.correct, strict=True):
        assert lv["n_items"] == len(cal) and lv["calibration_accuracy"] == sum(corr) / len(cal)
    # each calibration block reports each level's accuracy on the prompt it was calibrated on:
    # the teach block's strong level is made right on exactly 3 items, unlike the strategy-free one
    teach = replace(ev.teach_calibration, correct=(ev.teach_calibration.correct[0],
                                                   tuple(j < 3 for j in range(len(cal)))))
    doc2 = results_document(replace(ev, teach_calibration=teach), dataset={"name": "x"})
    strong_free = doc2["calibration"]["levels"][1]["calibration_accuracy"]
    assert doc2["teach_calibration"]["levels"][1]["calibration_accuracy"] == 3 / len(cal) != strong_free
    assert doc2["teach_calibration"]["levels"][0]["n_items"] == len(cal)
    for v in ("random", "retrieval"):
        m = doc["variants"][v]
        assert m["teaching_tokens"] == 0 and m["strategies_rejected"] == 0  # single-call, paper's rule
        assert m["cost_reduction_with_teaching"] == m["cost_reduction"]
    recs = outcome_records(ev)
    assert len(recs) == 3 * len(test)
    json.dumps(recs, allow_nan=False)
    r0 = recs[0]
    assert r0["gold"] == test[0].gold and r0["weak_confidence"] is not None


def test_jung_equals_any_policy_with_k0(small_eval) -> None:  # type: ignore[no-untyped-def]
    ev, cal, test = small_eval
    levels = make_levels(SIM_MODELS, sim_client=sim_client((*cal, *test), seed=3))
    # two-call: the strong level then answers Jung's prompt (single-call asks the teaching one)
    ev0 = evaluate(cal, test, levels, HashingEmbedder(384), alpha=0.2, delta=0.1, k=0, backend="numpy",
                   seed=3, progress=False, strategy_mode="two_call")
    jung = [(o.kind, o.answer, o.confidences) for o in ev.runs["jung"].outcomes]
    for v in ("jung", "random", "retrieval"):
        assert [(o.kind, o.answer, o.confidences) for o in ev0.runs[v].outcomes] == jung


def test_teacher_effect_on_templated_stream(small_eval) -> None:  # type: ignore[no-untyped-def]
    ev, _, _ = small_eval
    m = ev.metrics
    assert m["retrieval"].strong_call_rate < m["jung"].strong_call_rate
    assert m["retrieval"].weak_accuracy > m["jung"].weak_accuracy


def test_evaluate_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="test"):
        evaluate([], [], [], HashingEmbedder(8), alpha=0.2, delta=0.1)
    q = to_queries(gsm_symbolic_split(templates=1, variants=1, calibration_variants=1).test)
    with pytest.raises(InvalidArgumentError, match="variants"):
        evaluate(q, q, [], HashingEmbedder(8), alpha=0.2, delta=0.1, variants=("random",))


def test_dead_endpoint_raises_endpoint_error() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "down"}})

    client = httpx.Client(transport=httpx.MockTransport(down))
    models = (ModelConfig("w", "http://x.invalid/v1", "m", max_retries=0),
              ModelConfig("s", "http://x.invalid/v1", "m2", max_retries=0))
    levels = make_levels(models, client=client)
    q = to_queries(gsm_symbolic_split(templates=1, variants=2, calibration_variants=2).test)
    with pytest.raises(EndpointError, match="every calibration call"):
        evaluate(q, q, levels, HashingEmbedder(8), alpha=0.2, delta=0.1, progress=False)


def test_make_levels_keys_and_prices() -> None:
    models = (ModelConfig("w", "https://api.example/v1", "m", api_key_env="IC_KEY", price_input=1.0, price_output=2.0),
              ModelConfig("s", "sim:strong", "sim-strong"))
    with pytest.raises(MissingAPIKeyError, match="IC_KEY"):
        make_levels(models, environ={})
    with pytest.raises(InvalidArgumentError, match="sim_client"):
        make_levels(models, environ={"IC_KEY": "k"})
    levels = make_levels(models, environ={"IC_KEY": "k"}, sim_client=httpx.Client())
    assert [lv.name for lv in levels] == ["w", "s"]
    assert levels[0].model.price.cost(1_000_000, 1_000_000) == pytest.approx(3.0)
    assert dict(levels[0].params)["max_tokens"] == 512


def test_cached_embedder_embeds_each_text_once() -> None:
    calls: list[list[str]] = []

    class Counting(HashingEmbedder):
        def embed(self, texts):  # type: ignore[no-untyped-def]
            calls.append(list(texts))
            return super().embed(texts)

    inner = Counting(16)
    cached = CachedEmbedder(inner, batch_size=2)
    cached.prime(["a", "b", "c", "a"])
    assert calls == [["a", "b"], ["c"]]
    out = cached.embed(["c", "a", "d"])
    assert calls[-1] == ["d"]
    np.testing.assert_array_equal(out, inner.embed(["c", "a", "d"]))
    assert cached.embed([]).shape == (0, 16)


def test_sim_client_recognises_templates_from_the_text_alone() -> None:
    from intercascade_core.core.prompts import weak_prompt
    from intercascade_core.core.tasks import grade

    split = gsm_symbolic_split(templates=2, variants=30, calibration_variants=0, seed=5, order="grouped")
    qs = to_queries(split.test)
    one, other = [q for q in qs if q.template == qs[0].template], [q for q in qs if q.template != qs[0].template]
    assert len({template_signature(q.text) for q in one}) > 1  # names/objects vary within a template

    class Item:  # a stored strategy written for the first variant
        query, answer = one[0].text, one[0].gold or ""
        strategy = "Work out the quantities in order, then combine them."

    def n_correct(client: httpx.Client, stream: list[Any], with_strategy: bool) -> int:
        weak = make_levels(SIM_MODELS, sim_client=client)[0].model
        gens = [weak.generate([{"role": "user", "content": weak_prompt(q, [Item()] if with_strategy else [])}])
                for q in stream]
        return sum(bool(grade(g.text, q.gold, "math").correct) for g, q in zip(gens, stream, strict=True))

    client = sim_client(qs)  # no template labels: only the questions' gold answers
    assert n_correct(client, one[1:], True) >= n_correct(client, one[1:], False) + 10  # taught
    assert n_correct(client, other, True) == n_correct(client, other, False)  # another template


def test_load_streams_file_dataset_and_limit() -> None:
    cfg = DataConfig(dataset="gsm_plus", path=str(DATA / "gsm_plus.jsonl"), n_calibration=1, order="as-is")
    cal, test, info = load_streams(cfg)
    assert len(cal) == 1 and len(test) == 3 and info["n_test"] == 3
    cfg2 = DataConfig(dataset="gsm8k", path=str(DATA / "gsm8k.jsonl"),
                      calibration_path=str(DATA / "gsm8k.jsonl"))
    cal2, test2, _ = load_streams(cfg2, limit=2)
    assert len(cal2) == 3 and len(test2) == 2
    cal3, test3, info3 = load_streams(DataConfig(templates=2, variants=3, calibration_variants=2))
    assert (len(cal3), len(test3)) == (4, 6) and info3["name"] == "gsm_symbolic"
