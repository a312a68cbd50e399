"""Answer extraction on what the local Qwen2.5-Coder models really write: ``\\boxed{...}``
(often without an ``Answer:`` line, followed by more numbers) and "The answer is ..."
followed by prose with other numbers."""

from __future__ import annotations

import pytest

from intercascade_core.core.tasks import extract_answer, grade


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the reference's mis-scored 1.5B output: a later number after the boxed answer
        ("It takes 180 / 15 = 12 days.\nSo she needs \\boxed{12} days to finish the 180-page book.", "12"),
        ("The answer is \\boxed{8}. Check: 100 - 92 = 8, and 100 is the total.", "8"),
        ("Therefore the final answer is \\(\\boxed{\\frac{3}{4}}\\) of the cake (out of 100%).", "0.75"),
        ("Answer: \\boxed{27}", "27"),
        ("So \\boxed{1,234} dollars were spent, out of 2000.", "1234"),
        ("First \\boxed{5}, corrected: \\boxed{6}.", "6"),  # the last box wins
        # "The answer is N" followed by prose with other numbers
        ("Thus, the answer is 18 apples, since 3 times 6 = 18 and not 20.", "18"),
        ("The answer is 42. (We checked with 7 * 6.)", "42"),
        ("The answer is: 15 cookies", "15"),
        ("The answer is $1,234.50.", "1234.5"),
    ],
)
def test_local_model_formats(text: str, expected: str) -> None:
    assert extract_answer(text, "math") == expected


def test_an_explicit_answer_line_still_wins_over_a_box_in_the_working() -> None:
    text = "Step: \\boxed{3} apples per bag.\n3 * 4 = 12\nAnswer: 12"
    assert extract_answer(text, "math") == "12"


def test_boxed_letter_for_mcq() -> None:
    assert extract_answer("The capital is Paris, so \\boxed{B}.", "mcq") == "B"


def test_unbalanced_box_falls_back() -> None:
    assert grade("\\boxed{12 is the result", "12", "math").correct is True
