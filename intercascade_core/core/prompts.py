"""Prompts: strategy-free, strategy-augmented (weak) and strategy-generation (strong),
and the parser of the strong model's labelled strategy reply.

The paper's prompt tables were lost in extraction, so the wording is ours
(algorithms.md §4). Two properties are load-bearing and tested:

- ``weak_prompt(q, [])`` is byte-identical to ``strategy_free_prompt(q)``, so with no
  strategies Inter-Cascade is the Jung baseline decision for decision;
- retrieved items are clearly delimited and placed *before* the unchanged
  strategy-free prompt, so a reader (human, LLM or the simulator) finds the new
  problem after the last delimiter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import InvalidArgumentError, MalformedStrategy
from .sanitize import (
    MAX_ANSWER_CHARS,
    MAX_QUERY_CHARS,
    MAX_STRATEGY_CHARS,
    find_labels,
    sanitize_text,
)
from .tasks import Query

__all__ = [
    "EXAMPLE_CLOSE",
    "EXAMPLE_OPEN",
    "ParsedStrategy",
    "StrategyItem",
    "answer_and_strategy_prompt",
    "as_messages",
    "parse_strategy",
    "strategy_free_prompt",
    "strategy_generation_prompt",
    "weak_prompt",
]

# Delimiters around each retrieved example; user text is escaped so it cannot forge them.
EXAMPLE_OPEN = "<<<EXAMPLE {i}>>>"
EXAMPLE_CLOSE = "<<<END EXAMPLE {i}>>>"
STRATEGY_PREFACE = (
    "Below are previously solved problems that may be similar to the new problem, each with "
    "its answer and a reusable solution strategy. Use a strategy only if it fits the new problem."
)
STRATEGY_REQUEST_MARK = "Write a general, reusable strategy"

# "Reason step by step, briefly" first: with "write only the final answer" up front, small
# models (Qwen2.5-Coder-0.5B) skip their working and guess (measured: 2/8 vs 5/8 correct).
_MATH_INSTRUCTIONS = (
    "Solve the following math problem. Reason step by step, briefly, and then on the last "
    'line write the final answer in the form "Answer: <number>".'
)
_MCQ_INSTRUCTIONS = (
    "Answer the following multiple-choice question. Think briefly, then on the last line write "
    'only the letter of the correct option in the form "Answer: <letter>" (A, B, C or D).'
)
_LETTERS = "ABCD"

# strategy sanity limits: shorter is not a strategy, much longer is not a strategy either;
# what is kept is cut to the sanitizer's MAX_STRATEGY_CHARS when stored and shown
MIN_STRATEGY_CHARS = 20
MAX_PARSED_STRATEGY_CHARS = 4000


class StrategyItem(Protocol):
    """What a retrieved item must offer (``repository.Entry`` does)."""

    @property
    def query(self) -> str: ...
    @property
    def answer(self) -> str: ...
    @property
    def strategy(self) -> str: ...


def _problem_block(query: Query) -> str:
    if query.family == "mcq":
        lines = [f"Question: {query.text.strip()}"]
        lines += [f"{_LETTERS[i]}. {opt.strip()}" for i, opt in enumerate(query.options)]
        return "\n".join(lines)
    return f"Problem: {query.text.strip()}"


def strategy_free_prompt(query: Query) -> str:
    """The baseline prompt of every level (and the strong model's answer prompt)."""
    instructions = _MCQ_INSTRUCTIONS if query.family == "mcq" else _MATH_INSTRUCTIONS
    return f"{instructions}\n\n{_problem_block(query)}\n"


def weak_prompt(query: Query, strategies: Sequence[StrategyItem] = ()) -> str:
    """Retrieved (problem, answer, strategy) items, delimited, then the strategy-free prompt.

    With no strategies the result *is* ``strategy_free_prompt(query)`` (byte-identical).
    """
    base = strategy_free_prompt(query)
    if not strategies:
        return base
    blocks = [STRATEGY_PREFACE, ""]
    for i, item in enumerate(strategies, start=1):
        blocks.append(EXAMPLE_OPEN.format(i=i))
        # stored text is LLM-written: sanitised so it cannot forge a delimiter or a label
        blocks.append(f"Problem: {sanitize_text(item.query.strip(), max_chars=MAX_QUERY_CHARS)}")
        blocks.append(f"Answer: {sanitize_text(item.answer.strip(), max_chars=MAX_ANSWER_CHARS)}")
        blocks.append(f"Strategy: {sanitize_text(item.strategy.strip(), max_chars=MAX_STRATEGY_CHARS)}")
        blocks.append(EXAMPLE_CLOSE.format(i=i))
        blocks.append("")
    blocks.append("Now the new problem.")
    blocks.append("")
    return "\n".join(blocks) + base


_SECTION_FORMAT = (
    "Reply with exactly these three labelled sections, each label at the start of a line:\n"
    "Solution: <a concise solution of this problem>\n"
    "Answer: <the final answer only>\n"
    "Strategy: <the general strategy: the key idea, the steps that transfer to problems with "
    "the same logical structure, and common pitfalls>"
)


def strategy_generation_prompt(query: Query, answer: str) -> str:
    """The teacher prompt h(q, a): a reusable strategy, independent of this instance."""
    return (
        f"You have solved the problem below; your final answer was: {answer.strip()}\n"
        f"{STRATEGY_REQUEST_MARK} that would help a weaker solver with other problems of the "
        "same logical structure. The strategy must not depend on this problem's specific "
        "numbers, names or entities: describe the method, not this instance.\n"
        f"{_SECTION_FORMAT}\n\n{_problem_block(query)}\n"
    )


def answer_and_strategy_prompt(query: Query) -> str:
    """Single-call variant: answer and strategy at once (confidence on the answer span)."""
    return (
        f"Solve the problem below, then {STRATEGY_REQUEST_MARK[0].lower()}"
        f"{STRATEGY_REQUEST_MARK[1:]} for problems of the same logical structure that does not "
        "depend on this problem's specific numbers, names or entities.\n"
        f"{_SECTION_FORMAT}\n\n{_problem_block(query)}\n"
    )


def as_messages(prompt: str) -> list[dict[str, str]]:
    """A single-turn chat message list."""
    return [{"role": "user", "content": prompt}]


@dataclass(frozen=True, slots=True)
class ParsedStrategy:
    solution: str
    answer: str
    strategy: str


# the strong reply's sections; "Final answer:" counts as "Answer:"
_SECTIONS = {"solution": "solution", "answer": "answer", "final answer": "answer",
             "strategy": "strategy"}


def parse_strategy(
    text: str, *, problem: str | None = None, strict: bool = True
) -> ParsedStrategy:
    """Parse ``Solution: / Answer: / Strategy:`` sections (any order, markdown tolerated).

    A section starts where :func:`~.sanitize.find_labels` (the recogniser that
    :func:`~.sanitize.sanitize_text` neutralises) finds its label, so any line the
    sanitiser would rewrite as a label is a heading here and vice versa: ``1. Answer:``,
    ``**Strategy**:``, fullwidth or Cyrillic spellings alike.

    Raises :class:`MalformedStrategy` (never returns a half-parsed record) when the Strategy
    section is missing, duplicated or empty. ``strict`` (the default here; the cascade's
    ``store_rule="strict"``) adds a filter the paper does not have: it also rejects a
    strategy that is too short or too long, or that quotes three or more of ``problem``'s
    multi-digit numbers (it then depends on this instance). Without it a too-long strategy
    is still cut to the sanitiser's limit when stored.
    """
    if not isinstance(text, str):
        raise InvalidArgumentError("text", f"expected str, got {type(text).__name__}")
    matches = [m for m in find_labels(text) if m.label in _SECTIONS]
    sections: dict[str, str] = {}
    for i, m in enumerate(matches):
        label = _SECTIONS[m.label]
        end = matches[i + 1].line_start if i + 1 < len(matches) else len(text)
        body = text[m.end : end].strip().strip("*").strip()
        if label in sections:
            if label == "strategy":
                raise MalformedStrategy("the Strategy section appears more than once")
            continue  # a later "Answer:" inside the solution: keep the first
        sections[label] = body
    strategy = sections.get("strategy")
    if strategy is None:
        raise MalformedStrategy("no 'Strategy:' section")
    if not strategy:
        raise MalformedStrategy("the Strategy section is empty")
    if not strict:
        return ParsedStrategy(
            solution=sections.get("solution", ""), answer=sections.get("answer", ""),
            strategy=strategy,
        )
    if len(strategy) < MIN_STRATEGY_CHARS:
        raise MalformedStrategy(
            f"Strategy section too short ({len(strategy)} < {MIN_STRATEGY_CHARS} chars)"
        )
    if len(strategy) > MAX_PARSED_STRATEGY_CHARS:
        raise MalformedStrategy(
            f"Strategy section too long ({len(strategy)} > {MAX_PARSED_STRATEGY_CHARS} chars)"
        )
    if problem is not None:
        instance_numbers = set(re.findall(r"\d{2,}", problem))
        quoted = sorted(n for n in instance_numbers if re.search(rf"(?<!\d){n}(?!\d)", strategy))
        if len(quoted) >= 3:
            raise MalformedStrategy(f"Strategy depends on this instance's numbers {quoted}")
    return ParsedStrategy(
        solution=sections.get("solution", ""), answer=sections.get("answer", ""), strategy=strategy
    )
