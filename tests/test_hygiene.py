"""Strategy hygiene: reduced strategies and pure removal of refuted strategies."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np
import pytest

from intercascade_core.core.calibrate import calibrate
from intercascade_core.core.cascade import CascadeConfig, Level, init_state, run_stream
from intercascade_core.core.hygiene import (
    HygienicTeacher,
    drop_refuted,
    drop_strategies,
    general_strategy,
    reduce_entry,
    reduce_repository,
    reduced_strategy_text,
    refuted_ids,
)
from intercascade_core.core.prompts import (
    as_messages,
    strategy_free_prompt,
    strategy_generation_prompt,
    weak_prompt,
)
from intercascade_core.core.protocols import Generation
from intercascade_core.core.repository import Entry, Repository, empty_repository, update
from intercascade_core.core.tasks import Query
from intercascade_core.errors import InvalidArgumentError
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import SimBackend, templated_math_stream

EMB = HashingEmbedder(dim=32)

WORKED_REPLY = (
    "Solution: Mia starts with 12 apples. 12 + 5 = 17, then 17 - 3 = 14.\n"
    "Answer: 14\n"
    "Strategy: Track one running total. Add what is received; here 12 + 5 = 17. "
    "Subtract what is given away, which gives = 14. Check the unit of the final answer."
)


def test_general_strategy_drops_the_worked_solution() -> None:
    out = general_strategy(WORKED_REPLY)
    assert out == "Track one running total. Add what is received; Check the unit of the final answer."
    assert "Solution" not in out and "12" not in out and "17" not in out and "=" not in out
    assert out.startswith("Track one running total.")
    assert out.endswith("Check the unit of the final answer.")
    # a bare strategy with no arithmetic is returned as it is
    bare = "Multiply the number of groups by the group size, then add the rest."
    assert general_strategy(bare) == bare


def test_reduced_text_is_strategy_plus_final_answer() -> None:
    text = reduced_strategy_text(WORKED_REPLY, "14")
    first, last = text.rsplit("\n", 1)
    assert first == general_strategy(WORKED_REPLY)
    assert last == "Final answer of the example: 14"
    assert "17" not in text


def test_general_strategy_iv() -> None:
    with pytest.raises(InvalidArgumentError, match="nothing general"):
        general_strategy("12 + 5 = 17.")
    with pytest.raises(InvalidArgumentError, match="text"):
        general_strategy(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="answer"):
        reduced_strategy_text(WORKED_REPLY, 14)  # type: ignore[arg-type]


def _repo(n: int = 6) -> Repository:
    entries = [Entry(query=f"problem {i} about apples", answer=str(10 + i),
                     strategy=f"Method {i}: add then subtract. Here {i} + 1 = {i + 1}.",
                     tenant="a" if i % 2 else "b")
               for i in range(n)]
    vecs = np.asarray(EMB.embed([e.query for e in entries]), dtype=np.float32)
    return update(empty_repository(EMB.dim), entries, vecs)


def test_drop_strategies_builds_a_new_version() -> None:
    repo = _repo()
    before_entries, before_vecs = list(repo.entries), repo.vectors.copy()
    new = drop_strategies(repo, {1, 3})
    assert len(new) == 4 and [e.id for e in new.entries] == [0, 2, 4, 5]
    np.testing.assert_array_equal(new.vectors, before_vecs[[0, 2, 4, 5]])
    assert [e.tenant for e in new.entries] == ["b", "b", "b", "a"]
    assert new.tenant_size("a") == 1
    # the old version is untouched and still usable
    assert len(repo) == 6 and list(repo.entries) == before_entries
    np.testing.assert_array_equal(repo.vectors, before_vecs)
    # predicate form; dropping nothing returns the same version
    by_pred = drop_strategies(repo, lambda e: e.answer == "10")
    assert [e.id for e in by_pred.entries] == [1, 2, 3, 4, 5]
    assert drop_strategies(repo, []) is repo
    # appending to the new version still works and leaves the old one alone
    extra = update(new, [Entry(query="q", answer="1", strategy="s" * 30)], before_vecs[:1])
    assert len(extra) == 5 and len(new) == 4 and len(repo) == 6


def test_drop_strategies_iv() -> None:
    with pytest.raises(InvalidArgumentError, match="repo"):
        drop_strategies([], [1])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="drop"):
        drop_strategies(_repo(), ["a"])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="drop"):
        drop_strategies(_repo(), "12")  # type: ignore[arg-type]


def test_reduce_entry_and_repository() -> None:
    repo = _repo(3)
    red = reduce_repository(repo)
    assert [e.strategy for e in red.entries] == [f"Method {i}: add then subtract." for i in range(3)]
    assert [e.answer for e in red.entries] == ["10", "11", "12"]
    assert reduce_entry(repo.entries[0]) == red.entries[0]
    assert "=" in repo.entries[0].strategy  # unchanged
    # the weak prompt then carries the problem, the final answer and the method only
    prompt = weak_prompt(Query(text="problem 9 about apples", gold="1"), list(red.entries))
    assert "Answer: 10" in prompt and "+ 1 =" not in prompt


def test_refuted_ids_and_drop_refuted() -> None:
    repo = _repo(4)
    gold = {"problem 0 about apples": "10", "problem 1 about apples": "99", "problem 2 about apples": "12.0"}
    assert refuted_ids(repo, gold) == (1,)
    assert refuted_ids(repo, lambda e: e.id >= 2 or None) == (2, 3)
    cal = calibrate(np.linspace(0.5, 1, 100), np.ones(100, bool), alpha=0.2, delta=0.1)
    state = init_state([cal, cal], dim=EMB.dim)
    state = dataclasses.replace(state, repositories=(repo,))
    cleaned = drop_refuted(state, gold)
    assert [e.id for e in cleaned.repositories[0].entries] == [0, 2, 3]
    assert len(state.repositories[0]) == 4
    with pytest.raises(InvalidArgumentError, match="gold"):
        refuted_ids(repo, 3)  # type: ignore[arg-type]


class WorkedTeacher:
    """Wraps a model; its strategy replies also carry the worked arithmetic."""

    def __init__(self, inner: ChatModel) -> None:
        self.inner = inner

    @property
    def model(self) -> str:
        return self.inner.model

    def generate(self, messages: Sequence[Mapping[str, str]], **params: Any) -> Generation:
        gen = self.inner.generate(messages, **params)
        if "your final answer was:" in messages[-1]["content"]:
            return dataclasses.replace(gen, text=gen.text + " Worked: 12 + 5 = 17 and 17 - 3 = 14.")
        return gen


def test_hygienic_teacher_passes_answers_through_and_reduces_strategies() -> None:
    q = templated_math_stream(1, seed=5)[0]
    with httpx.Client(transport=SimBackend(seed=2).transport()) as client:
        strong = ChatModel("http://sim/v1", "sim-strong", client=client, sleep=lambda s: None)
        teacher = HygienicTeacher(WorkedTeacher(strong))
        assert teacher.model == "sim-strong"
        answer = teacher.generate(as_messages(strategy_free_prompt(q)))
        assert answer == strong.generate(as_messages(strategy_free_prompt(q)))
        reply = teacher.generate(as_messages(strategy_generation_prompt(q, "14")))
        assert reply.text.startswith("Answer: ")
        assert "Solution:" not in reply.text and "12 + 5" not in reply.text and "Strategy: " in reply.text

        # through the cascade: every stored strategy is the reduced one
        weak = ChatModel("http://sim/v1", "sim-weak", client=client, sleep=lambda s: None)
        cal = calibrate(np.linspace(0.5, 1, 100), np.ones(100, bool), alpha=0.2, delta=0.1)
        never = dataclasses.replace(cal, threshold=float("inf"))
        strong_cal = dataclasses.replace(cal, threshold=0.0)
        levels = [Level(weak), Level(teacher)]
        # the teacher wrappers rewrite the separate strategy call, which two-call mode makes
        run = run_stream(templated_math_stream(12, n_templates=3, seed=6), levels, EMB,
                         calibrations=[never, strong_cal], config=CascadeConfig(backend="numpy", strategy_mode="two_call"), progress=False)
        stored = run.state.repositories[0].entries
        assert len(stored) == 12
        assert all(not re.search(r"\d\s*[-+]\s*\d", e.strategy) for e in stored)
        raw = run_stream(templated_math_stream(12, n_templates=3, seed=6), [Level(weak), Level(WorkedTeacher(strong))],
                         EMB, calibrations=[never, strong_cal], config=CascadeConfig(backend="numpy", strategy_mode="two_call"), progress=False)
        assert all("12 + 5" in e.strategy for e in raw.state.repositories[0].entries)


def test_drop_keeps_embeddings_bit_exact_at_scale() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3000, 64)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    repo = update(empty_repository(64), [Entry(query=str(i), answer="", strategy="") for i in range(3000)], v)
    new = drop_strategies(repo, range(0, 3000, 2))
    np.testing.assert_array_equal(new.vectors, repo.vectors[1::2])
