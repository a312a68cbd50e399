"""Benchmark loaders (fixture files in each public schema), streams and orders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from intercascade_core.core.tasks import grade
from intercascade_core.errors import DatasetFormatError, InvalidArgumentError
from intercascade_core.lab.datasets import (
    Problem,
    gsm_symbolic_split,
    gsm_symbolic_templates,
    load_confidences,
    load_dataset,
    load_gsm8k,
    load_gsm_plus,
    load_metamath,
    load_nasa_history,
    order_stream,
    split_problems,
    to_queries,
)

DATA = Path(__file__).parent / "fixtures" / "data"


# --------------------------------------------------------------------------- loaders


def test_gsm8k_fixture() -> None:
    probs = load_gsm8k(DATA / "gsm8k.jsonl")
    assert [p.answer for p in probs] == ["72", "10", "3600"]  # blank line skipped, comma removed
    assert all(p.family == "math" and p.dataset == "gsm8k" for p in probs)
    assert probs[0].solution.endswith("#### 72")
    assert len({p.uid for p in probs}) == 3


def test_gsm_plus_fixture_groups_by_seed_question() -> None:
    probs = load_gsm_plus(DATA / "gsm_plus.jsonl")
    assert [p.answer for p in probs] == ["33", "126", "3", "None"]
    assert [p.meta_value("perturbation_type") for p in probs] == [
        "numerical substitution",
        "adding operation",
        "distractor insertion",
        "critical thinking",
    ]
    groups = [p.group for p in probs]
    assert groups[0] == groups[1] == groups[3] != groups[2]
    grouped = order_stream(probs, "grouped")
    assert [p.answer for p in grouped] == ["33", "126", "None", "3"]
    # the critical-thinking gold is text and grades by normalised match
    assert grade("Answer: None", probs[3].answer, "math").correct is True


def test_metamath_json_array_fixture() -> None:
    probs = load_metamath(DATA / "metamath.json")
    assert [p.answer for p in probs] == ["\\sqrt{5}", "752", "752"]
    assert probs[0].meta_value("type") == "MATH_AnsAug"
    assert probs[1].group == probs[2].group != probs[0].group  # same original question


def test_nasa_history_hf_schema_shuffles_options_reproducibly() -> None:
    probs = load_nasa_history(DATA / "nasa_history.jsonl", seed=0)
    again = load_nasa_history(DATA / "nasa_history.jsonl", seed=0)
    assert probs == again
    for p, right in zip(probs, ["Apollo 11", "Project Mercury", "Alan Shepard"], strict=True):
        assert p.family == "mcq" and len(p.choices) == 4
        assert p.choices["ABCD".index(p.answer)] == right
    other = load_nasa_history(DATA / "nasa_history.jsonl", seed=1)
    assert [p.choices for p in other] != [p.choices for p in probs]
    q = probs[0].to_query()
    assert q.family == "mcq" and q.options == probs[0].choices and q.gold == probs[0].answer


def test_nasa_history_letters_csv() -> None:
    probs = load_nasa_history(DATA / "nasa_history_letters.csv")
    assert [p.answer for p in probs] == ["B", "C"]
    assert probs[1].choices == ("Spitzer", "Chandra", "Hubble", "Kepler")


def test_load_dataset_dispatch_and_unknown_name() -> None:
    assert load_dataset("gsm8k", DATA / "gsm8k.jsonl") == load_gsm8k(DATA / "gsm8k.jsonl")
    with pytest.raises(InvalidArgumentError, match="unknown dataset 'mmlu'"):
        load_dataset("mmlu", DATA / "gsm8k.jsonl")


def test_to_queries_maps_fields() -> None:
    probs = load_gsm8k(DATA / "gsm8k.jsonl")
    qs = to_queries(probs)
    assert [q.text for q in qs] == [p.question for p in probs]
    assert [q.gold for q in qs] == [p.answer for p in probs]
    assert [q.id for q in qs] == [p.uid for p in probs]


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    ("loader", "name", "lines", "line", "field"),
    [
        (load_gsm8k, "a.jsonl", ['{"question": "q", "answer": "x\\n#### 1"}', '{"question": "q2"}'], 2, "answer"),
        (load_gsm8k, "a.jsonl", ['{"question": "q", "answer": "no marker"}'], 1, "answer"),
        (load_gsm8k, "a.jsonl", ['{"question": "q", "answer": "x #### 1"}', "", '{"question": 3.5, "answer": ['], 3, "<record>"),
        (load_gsm8k, "a.jsonl", ['{"question": ["q"], "answer": "x #### 1"}'], 1, "question"),
        (load_gsm_plus, "p.jsonl", ['{"question": "q", "answer": "1"}'], 1, "perturbation_type"),
        (load_metamath, "m.jsonl", ['{"query": "q", "response": "it is 4"}'], 1, "response"),
        (load_metamath, "m.jsonl", ['{"query": "", "response": "The answer is: 4"}'], 1, "query"),
        (load_nasa_history, "n.jsonl", ['{"question": "q", "correct_answer": "a", "incorrect_answer_1": "b", "incorrect_answer_2": "c"}'], 1, "incorrect_answer_3"),
        (load_nasa_history, "n.jsonl", ['{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"}'], 1, "answer"),
        (load_nasa_history, "n.jsonl", ['{"question": "q", "choices": ["a", "b"], "answer": "A"}'], 1, "choices"),
        (load_nasa_history, "n.jsonl", ['{"question": "q", "answer": "A"}'], 1, "choices"),
    ],
)
def test_malformed_records_name_file_line_and_field(
    tmp_path: Path, loader, name: str, lines: list[str], line: int, field: str  # type: ignore[no-untyped-def]
) -> None:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError) as info:
        loader(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), line, field)
    assert str(err).startswith(f"{path}:{line}: field {field!r}")
    assert isinstance(err, ValueError)


def test_json_array_error_reports_the_elements_line(tmp_path: Path) -> None:
    recs = [{"query": "q1", "response": "The answer is: 1"}, {"query": "q2", "response": "none"}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    with pytest.raises(DatasetFormatError) as info:
        load_metamath(path)
    assert info.value.line == 6 and info.value.field == "response"
    assert path.read_text().splitlines()[5].strip() == "{"


def test_csv_error_line_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_text("question,A,B,C,D,answer\nq,a,b,c,d,A\nq2,a,b,c,d,\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError) as info:
        load_nasa_history(path)
    assert (info.value.line, info.value.field) == (3, "answer")
    with pytest.raises(InvalidArgumentError, match="no such file"):
        load_gsm8k(tmp_path / "missing.jsonl")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="no records"):
        load_gsm8k(empty)


# --------------------------------------------------------------------------- streams


def _probs(groups: str) -> tuple[Problem, ...]:
    return tuple(Problem(uid=str(i), question=f"q{i}", answer="1", group=g) for i, g in enumerate(groups))


def test_orders() -> None:
    probs = _probs("abcabcab")
    assert order_stream(probs, "as-is") == probs
    grouped = order_stream(probs, "grouped")
    assert "".join(p.group for p in grouped) == "aaabbbcc"
    assert [p.uid for p in grouped if p.group == "a"] == ["0", "3", "6"]
    s1 = order_stream(probs, "shuffled", seed=3)
    assert s1 == order_stream(probs, "shuffled", seed=3)
    assert sorted(p.uid for p in s1) == sorted(p.uid for p in probs)
    assert s1 != order_stream(probs, "shuffled", seed=4)
    with pytest.raises(InvalidArgumentError, match="order"):
        order_stream(probs, "random")


def test_split_problems_is_disjoint_and_seeded() -> None:
    probs = _probs("abcdefghij")
    sp = split_problems(probs, 4, seed=1)
    assert len(sp.calibration) == 4 and len(sp.test) == 6
    assert {p.uid for p in sp.calibration}.isdisjoint(p.uid for p in sp.test)
    assert sp == split_problems(probs, 4, seed=1)
    with pytest.raises(InvalidArgumentError, match="n_calibration"):
        split_problems(probs, 10)


def test_gsm_symbolic_split_is_seeded_and_disjoint() -> None:
    sp = gsm_symbolic_split(templates=4, variants=5, calibration_variants=3, seed=7, order="grouped")
    assert len(sp.test) == 20 and len(sp.calibration) == 12
    assert {p.group for p in sp.test} == {p.group for p in sp.calibration}
    assert len({p.group for p in sp.test}) == 4
    test_q = {p.question for p in sp.test}
    assert len(test_q) == 20
    assert test_q.isdisjoint(p.question for p in sp.calibration)
    # grouped: each template's variants are contiguous
    runs = [p.group for i, p in enumerate(sp.test) if i == 0 or sp.test[i - 1].group != p.group]
    assert len(runs) == 4
    for p in sp.test:
        assert p.answer and p.solution.rstrip().endswith(p.answer)
        assert p.question and p.family == "math" and p.dataset == "gsm_symbolic"
    assert sp == gsm_symbolic_split(templates=4, variants=5, calibration_variants=3, seed=7, order="grouped")
    other = gsm_symbolic_split(templates=4, variants=5, calibration_variants=3, seed=8, order="grouped")
    assert {p.question for p in other.test} != test_q


def test_gsm_symbolic_pool_is_disjoint_and_leaves_the_other_draws_alone() -> None:
    kw = dict(templates=3, variants=4, calibration_variants=2, seed=5)
    plain = gsm_symbolic_split(**kw)  # type: ignore[arg-type]
    with_pool = gsm_symbolic_split(**kw, pool_variants=2)  # type: ignore[arg-type]
    assert plain.pool == () and len(with_pool.pool) == 6
    assert (with_pool.test, with_pool.calibration) == (plain.test, plain.calibration)
    pool_q = {p.question for p in with_pool.pool}
    assert len(pool_q) == 6
    assert pool_q.isdisjoint(p.question for p in plain.test + plain.calibration)
    assert {p.group for p in with_pool.pool} == {p.group for p in plain.test}
    with pytest.raises(InvalidArgumentError, match="pool_variants"):
        gsm_symbolic_split(**kw, pool_variants=-1)  # type: ignore[arg-type]


def test_gsm_symbolic_explicit_templates_and_bad_arguments() -> None:
    usable = gsm_symbolic_templates()
    assert len(usable) >= 80
    sp = gsm_symbolic_split(templates=[usable[0], usable[1]], variants=2, calibration_variants=0)
    assert {p.group for p in sp.test} == {f"t{usable[0]:02d}", f"t{usable[1]:02d}"}
    assert sp.calibration == ()
    with pytest.raises(InvalidArgumentError, match="templates"):
        gsm_symbolic_split(templates=[32])  # a template reasoning-gym marks broken
    with pytest.raises(InvalidArgumentError, match="templates"):
        gsm_symbolic_split(templates=0)
    with pytest.raises(InvalidArgumentError, match="variants"):
        gsm_symbolic_split(variants=0)


# --------------------------------------------------------------------------- confidences


def test_load_confidences_single_and_cascade(tmp_path: Path) -> None:
    one = tmp_path / "c.csv"
    one.write_text("confidence,correct\n0.9,1\n0.2,false\n0.5,True\n", encoding="utf-8")
    lc = load_confidences(one)
    assert lc.levels == ("model",)
    np.testing.assert_array_equal(lc.confidences[0], [0.9, 0.2, 0.5])
    np.testing.assert_array_equal(lc.correct[0], [True, False, True])
    assert not lc.confidences[0].flags.writeable
    two = tmp_path / "c.jsonl"
    two.write_text(
        '{"weak_confidence": 0.4, "weak_correct": 0, "strong_confidence": 0.8, "strong_correct": true}\n',
        encoding="utf-8",
    )
    lc2 = load_confidences(two)
    assert lc2.levels == ("weak", "strong")
    assert lc2.correct[1].tolist() == [True]


@pytest.mark.parametrize(
    ("body", "line", "field"),
    [
        ("confidence,correct\n0.9,1\n1.5,0\n", 3, "confidence"),
        ("confidence,correct\n0.9,maybe\n", 2, "correct"),
        ("confidence\n0.9\n", 2, "correct"),
        ("weak_confidence,weak_correct,strong_confidence\n0.9,1,0.5\n", 2, "strong_correct"),
        ("score,label\n0.9,1\n", 2, "confidence"),
        ("confidence,correct\nabc,1\n", 2, "confidence"),
    ],
)
def test_load_confidences_errors(tmp_path: Path, body: str, line: int, field: str) -> None:
    path = tmp_path / "c.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DatasetFormatError) as info:
        load_confidences(path)
    assert (info.value.line, info.value.field) == (line, field)
