"""The study runner's statistics (bench/local_llm/study.py): Wilson intervals, the exact
McNemar test, Holm's step-down adjustment and the paired analysis, against hand values."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import norm

_PATH = Path(__file__).resolve().parent.parent / "bench" / "local_llm" / "study.py"


def _load() -> Any:
    saved = list(sys.path)  # the runner puts its own folder first on the path
    try:
        spec = importlib.util.spec_from_file_location("_study_under_test", _PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


study = _load()


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (7, 20), (60, 120), (1, 1)])
def test_wilson_is_the_score_interval(k: int, n: int) -> None:
    z = norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = study.wilson(k, n)
    assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert hi == pytest.approx(min(1.0, centre + half), abs=1e-12)


def test_wilson_half_width_at_120_is_within_the_protocols_bound() -> None:
    lo, hi = study.wilson(60, 120)  # the widest interval at n = 120
    assert (hi - lo) / 2 <= 0.089
    assert all(math.isnan(v) for v in study.wilson(0, 0))


def test_mcnemar_exact_counts_discordant_pairs_and_is_two_sided() -> None:
    same = [True, False, True]
    assert study.mcnemar_exact(same, same) == (0, 0, 1.0)  # no discordant pair
    base = [False] * 6 + [True] * 4
    arm = [True] * 6 + [True] * 4
    assert study.mcnemar_exact(base, arm) == (6, 0, pytest.approx(2 / 64))
    assert study.mcnemar_exact(arm, base) == (0, 6, pytest.approx(2 / 64))  # symmetric
    base = [False] * 5 + [True]
    arm = [True] * 5 + [False]
    assert study.mcnemar_exact(base, arm) == (5, 1, pytest.approx(2 * 7 / 64))
    b, c, p = study.mcnemar_exact([False, True], [True, False])
    assert (b, c, p) == (1, 1, 1.0)  # balanced: never significant
    with pytest.raises(ValueError):
        study.mcnemar_exact([True], [True, False])  # unpaired lists are refused


def test_holm_step_down_is_monotone_and_capped() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> 0.02, 0.03, 0.06, max(0.06, 0.04)
    assert study.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert study.holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])  # ties: both m * p
    assert study.holm([0.5, 0.6, 1.0, 0.9]) == [1.0, 1.0, 1.0, 1.0]
    assert study.holm([]) == []


def _records(correct: dict[str, list[bool]]) -> list[dict[str, Any]]:
    return [{"query": f"q{i}", "arm": arm, "correct": ok, "confidence": 0.5, "shown": [],
             "copied_a_shown_answer": False, "shown_from_wrong_strong_answers": 0}
            for arm, oks in correct.items() for i, ok in enumerate(oks)]


def test_analyse_all_arms_equal_is_no_gain_and_the_default_best_arm() -> None:
    oks = [True, False] * 10
    an = study.analyse(_records({a: oks for a in study.ARMS}))
    assert an["n_queries"] == 20
    assert all(an["arms"][a]["mcnemar_p_holm"] == 1.0 for a in study.ARMS[1:])
    assert an["significant_gains"] == [] and an["significant_losses"] == []
    assert an["best_arm"] == "A1"


def test_analyse_finds_a_gain_and_a_loss_and_pairs_by_query() -> None:
    n = 40
    arms = {"A0": [i % 2 == 0 for i in range(n)], "A1": [True] * n, "A2": [False] * n,
            "A3": [i % 2 == 0 for i in range(n)], "A4": [i % 2 == 0 or i < 4 for i in range(n)]}
    records = _records(arms)
    records += [{"query": "partial", "arm": "A0", "correct": True, "confidence": 0.5,
                 "shown": []}]  # a query not every arm answered is left out
    an = study.analyse(records)
    assert an["n_queries"] == n
    assert an["arms"]["A1"]["gained"] == 20 and an["arms"]["A1"]["lost"] == 0
    assert an["significant_gains"] == ["A1"] and an["significant_losses"] == ["A2"]
    assert an["best_arm"] == "A1"
    assert study.analyse([])["n_queries"] == 0


def test_write_atomically_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "arms.md"
    target.write_text("old\n")
    study.write_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arms.md"]


def _eval_doc(alpha: float = 0.3) -> dict[str, Any]:
    """The keys of an `intercascade eval` results.json that step 4's summary reads."""
    level = {"name": "weak", "threshold": 0.9, "abstained": False, "guaranteed": True, "n_accepted": 30,
             "n_errors": 2, "risk_bound": 0.2, "calibration_accuracy": 0.55}
    abstain = {**level, "name": "strong", "threshold": None, "abstained": True, "n_accepted": 0, "n_errors": 0,
               "risk_bound": 1.0, "calibration_accuracy": 0.91}
    fallback = {**level, "threshold": 0.5, "guaranteed": False}
    variant = {"pipeline_accuracy": 0.8, "coverage": 0.5, "strong_calls": 6, "n_queries": 12, "weak_accuracy": 0.5,
               "accepted_per_level": [4, 2], "discarded": 6, "failed": 0, "repository_size": 0}
    return {
        "dataset": {"n_test": 120, "n_calibration": 80},
        "settings": {"alpha": alpha, "delta": 0.1, "split_delta": True, "min_n": 20, "k": 2, "strategy_mode": "single_call",
                     "store_rule": "paper"},
        "calibration": {"levels": [level, abstain]},
        "teach_calibration": {"levels": [fallback, {**abstain, "calibration_accuracy": 0.35}],
                              "prompts": ["strategy_free", "answer_and_strategy"]},
        "insitu": {"levels": [{k: v for k, v in lv.items() if k != "calibration_accuracy"}  # as eval writes it
                              for lv in ({**abstain, "name": "weak"}, abstain)]},
        "variants": {"jung": variant, "retrieval": {**variant, "pipeline_accuracy": 1.0, "coverage": 0.0}},
    }


def test_step_4_summary_flags_what_a_table_would_hide() -> None:
    own = {"n_test": 120, "n_calibration": 80, "calibration": {"weak_accuracy": 0.55, "strong_accuracy": 0.4},
           "settings": {"alpha": 0.3, "delta": 0.1, "split_delta": True, "min_n": 20, "k": 2}}
    text = "\n".join(study.cascade_section(_eval_doc(), own))
    assert "NOT THE STUDY'S" not in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "answered nothing" in rows["retrieval"] and "100" not in rows["retrieval"].split(" | ")[1]
    assert "80.0%" in rows["jung"]
    assert "(no guarantee)" in rows["Inter-Cascade, weak"] and "(no guarantee)" not in rows["Jung, weak"]
    assert "abstain" in rows["in-situ, weak"] and "abstain" in rows["in-situ, strong"]
    assert "answer-and-strategy" in rows["Inter-Cascade, strong"]
    other = "\n".join(study.cascade_section(_eval_doc(alpha=0.4), own))
    assert "NOT THE STUDY'S STEP 4" in other and "alpha 0.4 (the study's: 0.3)" in other


def _study_doc(weak_acc: float = 0.5) -> dict[str, Any]:
    return {"n_test": 120, "n_calibration": 80, "calibration": {"weak_accuracy": weak_acc, "strong_accuracy": 0.35},
            "settings": {"alpha": 0.3, "delta": 0.1, "split_delta": True, "min_n": 20, "k": 2},
            "records": [{"query": f"q{i}", "arm": arm, "answer": str(i), "correct": i < 3}
                        for i in range(4) for arm in ("A0", "A1")]}


def _reproduction_paragraph(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("**Reproduction.**"))


def test_step_4_summary_sets_its_replies_against_step_1s() -> None:
    # Jung's weak model: q0 the same answer, q1 and q2 other answers (q2 now wrong), q3 the same
    outcomes = [{"variant": v, "id": f"q{i}", "weak_answer": a, "weak_correct": ok}
                for v in ("jung", "retrieval")
                for i, a, ok in ((0, "0", True), (1, "9", True), (2, "7", False), (3, "3.0", False))]
    text = "\n".join(study.cascade_section(_eval_doc(), _study_doc(), outcomes))
    para = _reproduction_paragraph(text)
    assert "weak: 55.0% here, 50.0% in step 1" in para  # Jung's weak level, not the strong one's 91 %
    assert "strong on the answer-and-strategy prompt: 35.0% here, 35.0% in step 1" in para  # the teach block
    # "3.0" is the same answer as "3": compared as answers, not as strings
    assert "4 test queries: 2 correct here (Jung), 3 in arm A0, with a different final answer on 2 of them" in para
    assert "llama.cpp" in para
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert rows["Jung, weak"][2] == "55.0%" and rows["Jung, strong"][2] == "91.0%"
    assert rows["Inter-Cascade, strong"][2] == "35.0%" and rows["in-situ, weak"][2] == "—"
    no_outcomes = _reproduction_paragraph("\n".join(study.cascade_section(_eval_doc(), _study_doc())))
    assert "test queries" not in no_outcomes


def test_step_4_summary_names_no_cause_when_every_reply_reproduced() -> None:
    same = [{"variant": "jung", "id": f"q{i}", "weak_answer": str(i), "weak_correct": i < 3} for i in range(4)]
    para = _reproduction_paragraph("\n".join(study.cascade_section(_eval_doc(), _study_doc(0.55), same)))
    assert "different final answer on 0 of them" in para and "llama.cpp" not in para


def test_step_4_summary_takes_failed_calls_and_a_study_without_calibration() -> None:
    failed = [{"variant": "jung", "id": "q0", "weak_answer": None, "weak_correct": None}]
    own = {k: v for k, v in _study_doc().items() if k != "calibration"}
    para = _reproduction_paragraph("\n".join(study.cascade_section(_eval_doc(), own, failed)))
    assert "weak: 55.0% here, — in step 1" in para
    missing_only = _reproduction_paragraph("\n".join(study.cascade_section(_eval_doc(), own)))
    assert "llama.cpp" not in missing_only  # a missing figure is no difference
    assert "1 test queries: 0 correct here (Jung), 1 in arm A0, with a different final answer on 1 of them" in para


@pytest.mark.parametrize(("text", "error"), [('{"settings": {}}', "KeyError"), ("{", "JSONDecodeError"),
                                             ('{"settings": {}, "dataset": null}', "AttributeError")])
def test_arms_md_survives_an_unreadable_step_4(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "cascade").mkdir()
    (tmp_path / "cascade" / "results.json").write_text(text)
    study.write_report(_arms_doc(), tmp_path / "arms.md")
    assert f"could not be read ({error}" in (tmp_path / "arms.md").read_text()


@pytest.mark.parametrize(("line", "error"), [
    ('{"variant": "jung"', "JSONDecodeError"), ("[1, 2]", "ValueError: line 1"), ("null", "ValueError: line 1"),
    ('{"variant": "jung", "id": ["q0"], "weak_answer": "1"}', "ValueError: line 1"),
    ('{"variant": "jung", "id": "q0", "weak_answer": 5}', "ValueError: line 1"),
])
def test_an_unreadable_outcomes_file_costs_only_the_answer_comparison(tmp_path: Path, line: str, error: str) -> None:
    (tmp_path / "cascade").mkdir()
    (tmp_path / "cascade" / "results.json").write_text(json.dumps(_eval_doc()))
    (tmp_path / "cascade" / "outcomes.jsonl").write_text(line + "\n")
    study.write_report(_arms_doc(), tmp_path / "arms.md")
    text = (tmp_path / "arms.md").read_text()
    assert "## Step 4: the cascade" in text and "| Jung, weak |" in text
    assert f"`cascade/outcomes.jsonl` could not be read ({error}" in text
    assert "test queries:" not in _reproduction_paragraph(text)


def _arms_doc() -> dict[str, Any]:
    """A study results.json with no test queries answered yet."""
    return {"complete": False, "protocol": "P.md", "n_test": 120, "n_calibration": 80,
            "settings": {"templates": [1], "variants": 12, "calibration_variants": 8, "pool_variants": 4,
                         "models": {"weak": "w", "strong": "s"}, "embedder": "e", "k": 2, "tau": 0.7, "alpha": 0.3,
                         "delta": 0.1, "split_delta": True, "min_n": 20, "seed": 1},
            "calibration": {"weak_accuracy": 0.5, "weak_threshold": 0.9, "strong_accuracy": 0.4,
                            "strong_threshold": 0.95, "strong_abstained": False},
            "teaching": {"pool": 4, "stored": 2, "stored_from_correct_answers": 1},
            "analysis": {"n_queries": 0}, "model_time": {}}
