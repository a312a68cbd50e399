"""export: JSONL fine-tuning set in chat format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.errors import InvalidArgumentError
from intercascade_core.storage.export import export_finetune
from tests.strategies import random_unit


def _repo():
    es = [
        Entry(
            "What is 2+3?",
            "5",
            "Add the two numbers.\x00",
            source_model="strong",
            source_level=1,
            tenant="a",
        ),
        Entry("What is 2+3?", "5", "Add them.", tenant="a"),  # duplicate query
        Entry("Halve 10", "5", "Divide by two.", tenant="b", created_at=4.0),
    ]
    return update(empty_repository(8), es, random_unit(np.random.default_rng(0), 3, 8))


def test_export_chat_format(tmp_path: Path) -> None:
    n = export_finetune(_repo(), tmp_path / "ft.jsonl", uses=np.array([2, 0, 1]))
    lines = (tmp_path / "ft.jsonl").read_text().splitlines()
    assert n == len(lines) == 2
    ex = [json.loads(x) for x in lines]
    roles = [[m["role"] for m in e["messages"]] for e in ex]
    assert roles == [["system", "user", "assistant"]] * 2
    assert ex[0]["messages"][1]["content"] == "What is 2+3?"
    assert ex[0]["messages"][2]["content"] == "Strategy: Add the two numbers.\n\nAnswer: 5"
    assert ex[0]["metadata"] == {
        "id": 0,
        "tenant": "a",
        "source_model": "strong",
        "source_level": 1,
        "created_at": 0.0,
        "uses": 2,
    }
    assert ex[1]["metadata"]["tenant"] == "b"


def test_export_filters(tmp_path: Path) -> None:
    repo = _repo()
    assert export_finetune(repo, tmp_path / "a.jsonl", tenant="b") == 1
    assert export_finetune(repo, tmp_path / "b.jsonl", dedupe_queries=False, system=None) == 3
    first = json.loads((tmp_path / "b.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert export_finetune(repo, tmp_path / "c.jsonl", uses=[0, 3, 1], min_uses=1) == 2
    assert export_finetune(empty_repository(8), tmp_path / "d.jsonl") == 0
    assert (tmp_path / "d.jsonl").read_bytes() == b""
    n = export_finetune(
        repo, tmp_path / "e.jsonl", template=lambda e: [{"role": "user", "content": e.query}]
    )
    assert n == 2


def test_export_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="uses"):
        export_finetune(_repo(), tmp_path / "x", uses=[1])
    with pytest.raises(InvalidArgumentError, match="template"):
        export_finetune(_repo(), tmp_path / "x", template=lambda e: "nope")  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidArgumentError, match="min_uses"):
        export_finetune(_repo(), tmp_path / "x", min_uses=-1)
    assert not (tmp_path / "x").exists()
