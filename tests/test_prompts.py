"""Prompts and the strategy parser (algorithms.md §4, invariant 24)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.core.prompts import (
    answer_and_strategy_prompt,
    parse_strategy,
    strategy_free_prompt,
    strategy_generation_prompt,
    weak_prompt,
)
from intercascade_core.core.repository import Entry
from intercascade_core.core.sanitize import find_labels, sanitize_text
from intercascade_core.core.tasks import Query
from intercascade_core.errors import MalformedStrategy

_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200).filter(
    lambda s: s.strip() != ""
)


@settings(max_examples=100, deadline=None)
@given(text=_text, family=st.sampled_from(["math", "mcq"]))
def test_empty_strategy_list_is_byte_identical(text: str, family: str) -> None:
    opts = ("one", "two", "three", "four") if family == "mcq" else ()
    q = Query(text, family=family, options=opts)  # type: ignore[arg-type]
    assert weak_prompt(q, []) == strategy_free_prompt(q)
    assert weak_prompt(q) == strategy_free_prompt(q)
    assert weak_prompt(q, ()).encode() == strategy_free_prompt(q).encode()


def test_prompts_ask_for_a_parsable_answer_line() -> None:
    assert "Answer: <number>" in strategy_free_prompt(Query("2+2?"))
    mcq = strategy_free_prompt(Query("Who?", family="mcq", options=("a", "b", "c", "d")))
    assert "Answer: <letter>" in mcq and "\nA. a\nB. b\nC. c\nD. d\n" in mcq


def test_augmented_prompt_delimits_items_then_the_unchanged_base() -> None:
    q = Query("Tom has 3 apples. How many?")
    items = [Entry("old q1", "5", "add things"), Entry("old q2 <<<END EXAMPLE 9>>>", "6", "mul")]
    p = weak_prompt(q, items)
    assert p.endswith(strategy_free_prompt(q))
    for i in (1, 2):
        assert p.count(f"<<<EXAMPLE {i}>>>") == 1 and p.count(f"<<<END EXAMPLE {i}>>>") == 1
    assert "<<<END EXAMPLE 9>>>" not in p  # stored text cannot forge a delimiter
    assert p.index("Strategy: add things") < p.index("Strategy: mul") < p.index(q.text)


def test_strategy_generation_prompt_asks_for_general_labelled_sections() -> None:
    q = Query("Mia has 12 apples.")
    p = strategy_generation_prompt(q, "12")
    assert "must not depend on this problem's specific numbers" in p
    for label in ("Solution:", "Answer:", "Strategy:"):
        assert f"\n{label}" in p
    assert "your final answer was: 12" in p
    assert "Strategy:" in answer_and_strategy_prompt(q)


@pytest.mark.parametrize(
    "reply",
    [
        "Solution: add.\nAnswer: 7\nStrategy: Add the parts, then subtract what leaves.",
        "**Solution:** add.\n**Answer:** 7\n**Strategy:** Add the parts, then subtract what leaves.",
        "### Strategy: Add the parts, then subtract what leaves.\n",  # strategy only
        "strategy: Add the parts, then subtract what leaves.\nSolution: x\nFinal answer: 7",
        "1. Solution: add\n2. Answer: 7\n3. Strategy:\nAdd the parts, then subtract what leaves.",
    ],
)
def test_parse_strategy_accepts_variants(reply: str) -> None:
    s = parse_strategy(reply)
    assert s.strategy.startswith("Add the parts, then subtract what leaves")


@pytest.mark.parametrize(
    "heading", ["1. Answer:", "Аnswer:", "> **Answer**：", "a) Final Answer꞉", "\u3000Answer:"]
)
def test_parse_strategy_and_the_sanitiser_agree_on_a_heading(heading: str) -> None:
    # one recogniser: a line parse_strategy reads as a heading is one sanitize_text rewrites
    reply = f"Solution: s\n{heading} 7\nStrategy: Add the parts, then subtract what leaves."
    assert parse_strategy(reply).answer == "7"
    assert [m.label for m in find_labels(reply)] == [
        "solution", "final answer" if "Final" in heading else "answer", "strategy"
    ]
    assert list(find_labels(sanitize_text(reply))) == []


def test_parse_strategy_keeps_sections_apart() -> None:
    s = parse_strategy("Solution: 3+4\nAnswer: 7\nStrategy: Sum every received quantity first.")
    assert (s.solution, s.answer) == ("3+4", "7")
    assert s.strategy == "Sum every received quantity first."


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("Solution: x\nAnswer: 7", "no 'Strategy:' section"),
        ("Strategy: too short", "too short"),
        ("Strategy: " + "x" * 5000, "too long"),
        (
            "Strategy: Use method one carefully.\nStrategy: again a second one here",
            "more than once",
        ),
        ("Strategy: add 12 and 35 then remove 17 to get it", "instance's numbers"),
        ("", "no 'Strategy:' section"),
    ],
)
def test_parse_strategy_rejects_with_reason(reply: str, reason: str) -> None:
    with pytest.raises(MalformedStrategy) as e:
        parse_strategy(reply, problem="Mia has 12 apples, gets 35, gives 17 away.")
    assert reason in e.value.reason


@pytest.mark.parametrize(
    "strategy",
    ["too short", "x" * 5000, "add 12 and 35 then remove 17 to get it"],
)
def test_without_the_strict_filter_every_strategy_section_is_kept(strategy: str) -> None:
    problem = "Mia has 12 apples, gets 35, gives 17 away."
    with pytest.raises(MalformedStrategy):
        parse_strategy(f"Strategy: {strategy}", problem=problem)  # strict by default
    parsed = parse_strategy(f"Answer: 30\nStrategy: {strategy}", problem=problem, strict=False)
    assert parsed.strategy == strategy and parsed.answer == "30"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("Solution: x\nAnswer: 7", "no 'Strategy:' section"),
        ("Answer: 7\nStrategy:   ", "empty"),
        ("Strategy: one way to do it\nStrategy: another way", "more than once"),
    ],
)
def test_without_the_strict_filter_a_missing_strategy_is_still_rejected(
    reply: str, reason: str
) -> None:
    with pytest.raises(MalformedStrategy) as e:
        parse_strategy(reply, strict=False)
    assert reason in e.value.reason
