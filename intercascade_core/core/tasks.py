"""Task families: the query record, final-answer extraction and grading.

Two families cover the paper's four datasets:

- ``"math"``: GSM-Symbolic, GSM-Plus and MetaMath. The gold answer is a number
  (``"1,234"``, ``"$5"``, ``"12.5%"``, ``"3/4"``) or, for GSM-Plus "critical thinking"
  items and some MetaMath answers, a short string (``"None"``, ``"\\frac{\\pi}{2}"``).
- ``"mcq"``: NASA-History-MCQ, four options labelled A-D, gold is the letter.

Dataset *loading* lives elsewhere (``datasets``); this module is pure.
An unparseable model answer is graded wrong and flagged ``unparseable`` (never an error).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, get_args

from ..errors import InvalidArgumentError

__all__ = [
    "FAMILIES",
    "Family",
    "Grade",
    "Query",
    "extract_answer",
    "grade",
    "normalize_text_answer",
    "parse_number",
]

Family = Literal["math", "mcq"]
FAMILIES: tuple[str, ...] = get_args(Family)

# GSM-style relative tolerance: |pred - gold| <= REL_TOL * max(1, |gold|)
REL_TOL = 1e-6


@dataclass(frozen=True, slots=True)
class Query:
    """One problem of a stream.

    ``template`` is metadata for reporting only: no model (simulated or real) ever sees it;
    the simulator infers templates from the question text like any reader would.
    ``options`` holds the four option texts of an MCQ item (already part of ``text`` or not:
    prompts render them when given).
    """

    text: str
    gold: str | None = None
    family: Family = "math"
    id: str = ""
    template: str | None = None
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise InvalidArgumentError("text", f"a query needs non-empty text, got {self.text!r}")
        if self.family not in FAMILIES:
            raise InvalidArgumentError("family", f"expected one of {FAMILIES}, got {self.family!r}")
        if self.family == "mcq" and self.options and len(self.options) != 4:
            raise InvalidArgumentError(
                "options", f"an mcq item has 4 options, got {len(self.options)}"
            )


@dataclass(frozen=True, slots=True)
class Grade:
    """The grading of one model answer. ``answer`` is the extracted, normalised answer
    (``None`` when unparseable); ``correct`` is ``None`` when no gold answer is known."""

    answer: str | None
    correct: bool | None
    unparseable: bool


_NUMBER_RE = re.compile(
    r"(?<![\w.])[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?|(?<![\w.])[-+]?\.\d+"
)
# the final-answer line the prompts ask for; tolerate markdown bold and "Final answer"
_ANSWER_LINE_RE = re.compile(
    r"^\W*(?:final\s+)?answer\s*(?:is)?\s*[:：]\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE
)
# "the answer is N" up to the end of its sentence ("..., since 3 * 6 = 18" is not the answer)
_THE_ANSWER_IS_RE = re.compile(
    r"the answer is\s*:?\s*(.+?)\s*(?:[.;!?,](?:\s|$)|\s(?:since|because)\b|$)",
    re.IGNORECASE | re.MULTILINE,
)
_LETTER_RE = re.compile(r"(?<![A-Za-z])\(?([A-Da-d])\)?(?![A-Za-z])")


def parse_number(text: str) -> float | None:
    """Parse ``'1,234'``, ``'$5.50'``, ``'12%'``, ``'-3/4'``, ``'\\frac{3}{4}'`` to a float;
    ``None`` when *text* is not a single finite number (up to trailing punctuation and units
    words). Model output is untrusted: huge values (``1e400/1``) are ``None``, never an error."""
    try:
        value = _parse_number(text)
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    return value if value is not None and math.isfinite(value) else None


def _parse_number(text: str) -> float | None:
    s = text.strip().strip("*").strip()
    s = s.rstrip(".;!")
    s = re.sub(r"\\?\$", "", s)  # dollar signs, also LaTeX-escaped
    frac = re.fullmatch(r"(-?)\\d?frac\{(-?\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", s.replace(" ", ""))
    if frac:
        sign = -1.0 if frac.group(1) else 1.0
        den = float(frac.group(3))
        return sign * float(frac.group(2)) / den if den != 0 else None
    s = s.replace(",", "").replace(" ", "").rstrip("%")
    if "/" in s:
        num, _, den_text = s.partition("/")
        try:
            value = Fraction(num) / Fraction(den_text)
        except (ValueError, ZeroDivisionError):
            return None
        return float(value)
    try:
        value_f = float(s)
    except ValueError:
        return None
    return value_f if math.isfinite(value_f) else None


def normalize_text_answer(text: str) -> str:
    """Normalise a non-numeric answer for exact matching (MetaMath LaTeX, GSM-Plus 'None')."""
    s = text.strip().strip("*").strip().rstrip(".")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("$", "")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s)
    return s.lower()


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed); None if none/unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def _answer_lines(text: str) -> list[str]:
    lines = [m.group(1) for m in _ANSWER_LINE_RE.finditer(text)]
    boxed = _last_boxed(text)
    # a box wins unless an explicit "Answer:" line (without a box) says otherwise
    if boxed is not None and (not lines or "\\boxed" in lines[-1]):
        return [boxed]
    if not lines:
        lines = [m.group(1) for m in _THE_ANSWER_IS_RE.finditer(text)]
    return lines


def extract_answer(text: str, family: Family) -> str | None:
    """The model's final answer, normalised; ``None`` when unparseable.

    math: the last ``\\boxed{...}`` unless the last explicit ``Answer:`` line has no
    box; else the last ``Answer:`` line (a number in it, else its
    normalised text); else the last "the answer is ..." sentence; else the last number
    anywhere in the text. mcq: the first standalone letter A-D on
    the last ``Answer:`` line (no fallback: a stray "A" in prose is not an answer).
    """
    if family not in FAMILIES:
        raise InvalidArgumentError("family", f"expected one of {FAMILIES}, got {family!r}")
    lines = _answer_lines(text)
    if family == "mcq":
        if not lines:
            return None
        m = _LETTER_RE.search(lines[-1])
        return m.group(1).upper() if m else None
    if lines:
        line = lines[-1].rsplit("=", 1)[-1]  # "3 + 4 = 7" -> "7"
        whole = parse_number(line)
        if whole is not None:
            return _format_number(whole)
        nums = _NUMBER_RE.findall(line)
        # a tuple, interval or set ("(2, 3)") is a text answer, not its last number
        if nums and not (len(nums) > 1 and re.search(r"[()\[\]{}]", line)):
            value = parse_number(nums[-1])
            if value is not None:
                return _format_number(value)
        norm = normalize_text_answer(line)
        return norm or None
    nums = _NUMBER_RE.findall(text)
    for raw in reversed(nums):
        value = parse_number(raw)
        if value is not None:
            return _format_number(value)
    return None


def _format_number(value: float) -> str:
    # canonical text so equal numbers compare equal as strings too ("5.0" -> "5")
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def grade(text: str, gold: str | None, family: Family) -> Grade:
    """Extract the answer from *text* and compare with *gold* (``None`` = unknown gold)."""
    answer = extract_answer(text, family)
    if answer is None:
        return Grade(answer=None, correct=None if gold is None else False, unparseable=True)
    if gold is None:
        return Grade(answer=answer, correct=None, unparseable=False)
    return Grade(answer=answer, correct=answers_match(answer, gold, family), unparseable=False)


def answers_match(answer: str, gold: str, family: Family) -> bool:
    """Whether an extracted *answer* equals *gold* (numeric with tolerance, else text)."""
    if family == "mcq":
        g = _LETTER_RE.search(gold.strip())
        return g is not None and answer.upper() == g.group(1).upper()
    a, g_num = parse_number(answer), parse_number(gold)
    if a is not None and g_num is not None:
        return abs(a - g_num) <= REL_TOL * max(1.0, abs(g_num))
    if g_num is not None:  # numeric gold, non-numeric answer
        return False
    return normalize_text_answer(answer) == normalize_text_answer(gold)
