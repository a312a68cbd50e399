"""Answer extraction and grading per task family (algorithms.md §4)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.core.tasks import Query, extract_answer, grade, parse_number
from intercascade_core.errors import InvalidArgumentError


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", 1234.0),
        ("$5.50", 5.5),
        ("\\$12", 12.0),
        ("12%", 12.0),
        ("-3/4", -0.75),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{1}{8}", 0.125),
        (" 42. ", 42.0),
        ("1,000,000.25", 1000000.25),
        ("abc", None),
        ("1/0", None),
        ("", None),
    ],
)
def test_parse_number(text: str, value: float | None) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("text", "gold", "correct"),
    [
        ("Step 1 ... 3 + 4 = 7\nAnswer: 7", "7", True),
        ("Answer: $1,234.00", "1234", True),
        ("**Answer:** 12.5%", "12.5", True),
        ("Final answer: 3/4", "0.75", True),
        ("Answer: 7 apples", "7", True),
        ("Answer: 8", "7", False),
        ("I got 5 then 9", "9", True),  # fallback: the last number in the text
        ("The answer is: \\frac{1}{2}", "0.5", True),
        ("Answer: None", "None", True),  # GSM-Plus critical-thinking items
        ("Answer: none.", "None", True),
        ("Answer: 0", "None", False),
        ("Answer: \\left(2, 3\\right)", "(2,3)", True),  # MetaMath non-numeric gold
        ("Answer: 1000002", "1000000", False),  # tolerance is relative 1e-6 of max(1,|gold|)
        ("Answer: 1000000.5", "1000000", True),
    ],
)
def test_grade_math(text: str, gold: str, correct: bool) -> None:
    g = grade(text, gold, "math")
    assert g.correct is correct
    assert not g.unparseable


@pytest.mark.parametrize(
    ("text", "gold", "correct"),
    [
        ("Reasoning...\nAnswer: B", "B", True),
        ("Answer: (c)", "C", True),
        ("Answer: D. The Apollo program", "D", True),
        ("Answer: A", "B", False),
    ],
)
def test_grade_mcq(text: str, gold: str, correct: bool) -> None:
    assert grade(text, gold, "mcq").correct is correct


@pytest.mark.parametrize(
    ("text", "family"),
    [
        ("I am not sure.", "math"),
        ("A is a vowel and so is E", "mcq"),  # no answer line: a stray letter is no answer
        ("Answer: maybe E", "mcq"),
        ("", "math"),
    ],
)
def test_unparseable_is_wrong_and_flagged(text: str, family: str) -> None:
    g = grade(text, "B" if family == "mcq" else "3", family)  # type: ignore[arg-type]
    assert g.unparseable and g.correct is False and g.answer is None
    # without gold, correctness is unknown, still flagged
    assert grade(text, None, family).correct is None  # type: ignore[arg-type]


def test_last_answer_line_wins() -> None:
    assert extract_answer("Answer: 3\nwait, recheck\nAnswer: 4", "math") == "4"


@settings(max_examples=200, deadline=None)
@given(
    value=st.integers(min_value=-(10**9), max_value=10**9),
    dollar=st.booleans(),
    commas=st.booleans(),
)
def test_integer_formats_round_trip(value: int, dollar: bool, commas: bool) -> None:
    body = f"{abs(value):,}" if commas else str(abs(value))
    text = ("-" if value < 0 else "") + ("$" if dollar else "") + body
    assert grade(f"work...\nAnswer: {text}", str(value), "math").correct


def test_query_validation_names_the_value() -> None:
    with pytest.raises(InvalidArgumentError, match="family"):
        Query("x", family="essay")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="text"):
        Query("   ")
    with pytest.raises(InvalidArgumentError, match="options"):
        Query("q", family="mcq", options=("a", "b"))
    with pytest.raises(InvalidArgumentError, match="family"):
        extract_answer("Answer: 1", "essay")  # type: ignore[arg-type]
