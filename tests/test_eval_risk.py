"""The risk view in the evaluation harness: ``evaluate(..., insitu=True)`` and the
``"risk"``/``"insitu"`` blocks of ``results.json`` and their tables in ``report.md``.

The world is tests/test_insitu.py's: a weak model that copies wrong same-template
strategies with high confidence (``CopyingSimBackend``), so the paper's static λ_w lets
copied wrong answers through and the in-situ λ_w does not (one seed, a mechanical check).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from intercascade_core.core.cascade import Level
from intercascade_core.errors import InvalidArgumentError
from intercascade_core.lab.evaluate import (
    INSITU_VARIANT,
    Evaluation,
    evaluate,
    outcome_records,
    results_document,
    risk_document,
)
from intercascade_core.lab.report import (
    LABELS,
    PLOTS,
    render_insitu,
    render_markdown,
    render_risk,
    write_report,
)
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import templated_math_stream

ALPHA, DELTA = 0.2, 0.1
CAL = templated_math_stream(200, n_templates=8, seed=100)
TEST = templated_math_stream(200, n_templates=8, seed=200)



@pytest.fixture(scope="module")
def ev(misleading_teacher: Any) -> Iterator[Evaluation]:
    with httpx.Client(transport=misleading_teacher().transport()) as client:
        levels = [Level(ChatModel("http://sim/v1", n, client=client, sleep=lambda s: None), name=name)
                  for n, name in (("sim-weak", "weak"), ("sim-strong", "strong"))]
        yield evaluate(CAL, TEST, levels, HashingEmbedder(dim=64), alpha=ALPHA, delta=DELTA, k=1,
                       backend="numpy", seed=0, variants=("jung", "retrieval"), insitu=True, progress=False)


@pytest.fixture(scope="module")
def doc(ev: Evaluation) -> dict[str, Any]:
    return results_document(ev, dataset={"name": "copying", "n_test": len(TEST)}, settings={"embedder": "hash"})


def test_insitu_variant_runs_with_the_insitu_thresholds(ev: Evaluation) -> None:
    assert list(ev.runs) == ["jung", "retrieval", INSITU_VARIANT]
    assert ev.insitu is not None
    assert ev.runs[INSITU_VARIANT].state.calibrations == ev.insitu.calibrations
    assert ev.runs["retrieval"].state.calibrations == ev.calibration.calibrations
    assert ev.insitu.static == ev.calibration.calibrations  # piloted by the shared calibration
    assert [o.query_id for o in ev.runs[INSITU_VARIANT].outcomes] == [q.id for q in TEST]
    assert INSITU_VARIANT in ev.metrics and ev.metrics[INSITU_VARIANT].n == len(TEST)
    recs = outcome_records(ev)
    assert sum(r["variant"] == INSITU_VARIANT for r in recs) == len(TEST)


def test_results_document_risk_blocks(doc: dict[str, Any], ev: Evaluation) -> None:
    json.dumps(doc, allow_nan=False)  # strict JSON
    assert list(doc["variants"]) == ["jung", "retrieval", INSITU_VARIANT]
    assert doc["settings"]["insitu"] is True
    v = doc["variants"]
    for name, s in v.items():
        r = s["risk"]
        assert r["alpha"] == ALPHA and r["accepted"] == s["accepted_per_level"][0]
        assert r["empirical_risk"] == s["weak_accepted_risk"]
        assert r["accepted"] == r["accepted_with_strategies"] + r["accepted_without_strategies"]
        assert r["audit"]["n_labels"] == r["accepted"] and r["audit"]["delta"] == DELTA
        # both certified α's at the weak level's δ (δ/2 here): the calibration's own bound
        assert r["delta"] == pytest.approx(DELTA / 2)
        if name != INSITU_VARIANT:
            assert r["threshold"] == doc["calibration"]["levels"][0]["threshold"]
            assert r["alpha_certified_without_strategies"] == pytest.approx(
                doc["calibration"]["levels"][0]["risk_bound"])
    assert v["jung"]["risk"]["alpha_certified_with_strategies"] is None
    # copying: the static λ_w lets wrong copied answers through, the in-situ λ_w does not
    assert v["retrieval"]["risk"]["exceeds_alpha"] and v["retrieval"]["risk"]["empirical_risk"] > ALPHA
    assert v["retrieval"]["risk"]["alpha_certified_with_strategies"] > ALPHA
    assert not v[INSITU_VARIANT]["risk"]["exceeds_alpha"]
    assert v[INSITU_VARIANT]["risk"]["threshold"] > v["retrieval"]["risk"]["threshold"]
    assert v[INSITU_VARIANT]["risk"]["audit"]["verdict"] != "alarm"
    # the top-level in-situ block: Theorem 2.2's view at the static λ_w is reversed
    ins = doc["insitu"]
    assert ins["thresholds"] == [lv["threshold"] for lv in ins["levels"]]
    assert ins["thresholds"][0] == v[INSITU_VARIANT]["risk"]["threshold"]
    assert ins["rounds"] == len(ins["thresholds_per_round"]) - 1 and ins["converged"] is True
    view = ins["theorem_view"]
    assert view["static_threshold"] == doc["calibration"]["levels"][0]["threshold"]
    assert view["alpha_certified_with_strategies"] > view["alpha_certified_without_strategies"]
    assert view["alpha_certified_without_strategies"] == pytest.approx(doc["calibration"]["levels"][0]["risk_bound"])


def test_report_renders_the_risk_and_insitu_tables(doc: dict[str, Any], ev: Evaluation, tmp_path: Path) -> None:
    md = render_markdown(doc, plots=())
    assert "## Risk of accepted weak answers" in md and render_risk(doc).strip() in md
    assert render_insitu(doc).strip() in md and "Theorem 2.2's view" in md
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "| **yes** |" in rows[LABELS["retrieval"]]
    assert "| no |" in rows[LABELS[INSITU_VARIANT]] and LABELS[INSITU_VARIANT] == "Inter-Cascade (in-situ λ)"
    # the whole report with plots: a fourth variant does not break the figures
    files = write_report(doc, outcome_records(ev), tmp_path / "rep")
    assert [p.name for p in files.plots] == list(PLOTS)
    assert json.loads(files.results.read_text())["variants"][INSITU_VARIANT]["risk"] == doc["variants"][INSITU_VARIANT]["risk"]


def test_no_insitu_no_block(ev: Evaluation) -> None:
    plain = dataclasses.replace(
        ev, runs={k: r for k, r in ev.runs.items() if k != INSITU_VARIANT},
        metrics={k: m for k, m in ev.metrics.items() if k != INSITU_VARIANT}, insitu=None,
    )
    d = results_document(plain, dataset={})
    assert "insitu" not in d and d["settings"]["insitu"] is False
    assert set(d["variants"]) == {"jung", "retrieval"} and all("risk" in s for s in d["variants"].values())
    assert render_insitu(d) == "" and "In-situ calibration" not in render_markdown(d, plots=())
    with pytest.raises(InvalidArgumentError, match="in-situ"):
        risk_document(dataclasses.replace(ev, insitu=None), INSITU_VARIANT)
