"""Untrusted text: strategies are LLM-written, so treat them like user input.

:func:`sanitize_text` (and :func:`sanitize_strategy` / :func:`sanitize_entry` on top of it)
makes a string safe to place inside a delimited block of a prompt:

1. **Control characters stripped.** ``\\r\\n``/``\\r``/U+2028/U+2029 become ``\\n``; every
   other character of Unicode category Cc (C0/C1 controls, DEL), Cf (zero-width and
   bidi-override format characters such as U+200B, U+202E, U+FEFF), Cs (lone surrogates),
   Co (private use) and Cn (unassigned) is removed; ``\\t`` becomes a space. At most two
   consecutive newlines are kept; trailing spaces on lines are dropped.
2. **Delimiter spoofing neutralised.** Runs of two or more angle brackets (``<``, ``>``
   and their fullwidth/small-form lookalikes) become the single guillemets ``‹``/``›``,
   so no ``<<<EXAMPLE n>>>``-style delimiter (:mod:`.prompts`) can be forged; chat-template
   markers (``<|``, ``|>``, ``[INST]``, ``</s>``, ``<s>``) are defused the same way; a
   line that starts like a prompt label (``Problem:``, ``Question:``, ``Answer:``,
   ``Strategy:``, ``Solution:``, ``System:``, ``User:``, ``Assistant:``, ``Now the new
   problem``) is rewritten as ``[problem]`` etc., so the text cannot open a new section
   of the prompt or plant a fake answer line.
3. **Length bounded.** At most ``max_chars`` characters (default
   :data:`MAX_STRATEGY_CHARS`); longer text is cut at a word boundary when there is one
   near the limit and ends with ``…``.

The result is a fixed point (``sanitize_text(sanitize_text(x)) == sanitize_text(x)``) and
is never longer than ``max_chars``. Single ``<``/``>`` (``x < 3``) are kept.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

from ..errors import InvalidArgumentError
from .repository import Entry

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_QUERY_CHARS",
    "MAX_STRATEGY_CHARS",
    "sanitize_entry",
    "sanitize_strategy",
    "sanitize_text",
]

#: default bound on a stored strategy (prompts.py rejects longer parses at 4000)
MAX_STRATEGY_CHARS = 2000
MAX_QUERY_CHARS = 8000
MAX_ANSWER_CHARS = 1000

ELLIPSIS = "…"
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_NEWLINES = re.compile("\r\n|\r|\u2028|\u2029|\x85|\x0b|\x0c")
_LT = "<\uff1c\ufe64\u2039\u27e8\u3008\u2329"  # < ＜ ﹤ ‹ ⟨ 〈 〈
_GT = ">\uff1e\ufe65\u203a\u27e9\u3009\u232a"
_ANGLE_RUN = re.compile(f"[{_LT}{_GT}]{{2,}}")
_PIPE = "|\uff5c"
_CHAT_MARKERS = re.compile(
    rf"[{_LT}][{_PIPE}]|[{_PIPE}][{_GT}]|\[/?INST\]|[{_LT}]/?s[{_GT}]", re.IGNORECASE
)
_LABELS = (
    "problem",
    "question",
    "answer",
    "final answer",
    "strategy",
    "solution",
    "system",
    "user",
    "assistant",
    "example",
    "end example",
)
_LABEL_LINE = re.compile(
    r"^([ \t>#*_\-]*)("
    + "|".join(sorted((re.escape(x) for x in _LABELS), key=len, reverse=True))
    + r")[ \t*_]*[:：]",
    re.IGNORECASE | re.MULTILINE,
)
_NEW_PROBLEM = re.compile(
    r"^([ \t>#*_\-]*)now the new (problem|question)", re.IGNORECASE | re.MULTILINE
)


def _strip_controls(text: str) -> str:
    text = _NEWLINES.sub("\n", text).replace("\t", " ")
    out = []
    for ch in text:
        if ch == "\n" or unicodedata.category(ch) not in _DROP_CATEGORIES:
            out.append(ch)
    return "".join(out)


def _angle(ch: str) -> str:
    return "‹" if ch in _LT else "›"


def _neutralise(text: str) -> str:
    text = _ANGLE_RUN.sub(lambda m: "".join(_angle(c) for c in m.group(0)), text)
    text = _CHAT_MARKERS.sub(
        lambda m: (
            "".join(_angle(c) if c in _LT + _GT else ("¦" if c in _PIPE else c) for c in m.group(0))
            .replace("[", "(")
            .replace("]", ")")
        ),
        text,
    )
    text = _LABEL_LINE.sub(lambda m: f"{m.group(1)}[{m.group(2).lower()}]", text)
    text = _NEW_PROBLEM.sub(lambda m: f"{m.group(1)}[now the new {m.group(2).lower()}]", text)
    return text


def _tidy(text: str) -> str:
    lines = [ln.rstrip(" ") for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _bound(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    if max_chars == 0:
        return ""
    cut = text[: max_chars - 1]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space >= max_chars // 2:
        cut = cut[:space]
    return cut.rstrip() + ELLIPSIS


def sanitize_text(text: str, *, max_chars: int = MAX_STRATEGY_CHARS) -> str:
    """Make ``text`` safe for a delimited prompt block (see the module docstring)."""
    if not isinstance(text, str):
        raise InvalidArgumentError("text", f"must be a str, got {type(text).__name__}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0:
        raise InvalidArgumentError("max_chars", f"must be an int >= 0, got {max_chars!r}")
    prev = None
    out = text
    # neutralising can expose new patterns (e.g. a removed control char joins '<' '<'):
    # iterate to the fixed point (each pass only shrinks or keeps the pattern count)
    for _ in range(8):
        out = _tidy(_neutralise(_strip_controls(out)))
        if out == prev:
            break
        prev = out
    return _tidy(_neutralise(_bound(out, max_chars))) if len(out) > max_chars else out


def sanitize_strategy(text: str, *, max_chars: int = MAX_STRATEGY_CHARS) -> str:
    """:func:`sanitize_text` with the strategy bound."""
    return sanitize_text(text, max_chars=max_chars)


def sanitize_entry(
    entry: Entry,
    *,
    max_strategy_chars: int = MAX_STRATEGY_CHARS,
    max_query_chars: int = MAX_QUERY_CHARS,
    max_answer_chars: int = MAX_ANSWER_CHARS,
) -> Entry:
    """The entry with query, answer and strategy sanitised (same object when unchanged)."""
    if not isinstance(entry, Entry):
        raise InvalidArgumentError("entry", f"must be an Entry, got {type(entry).__name__}")
    q = sanitize_text(entry.query, max_chars=max_query_chars)
    a = sanitize_text(entry.answer, max_chars=max_answer_chars)
    s = sanitize_text(entry.strategy, max_chars=max_strategy_chars)
    if (q, a, s) == (entry.query, entry.answer, entry.strategy):
        return entry
    return dataclasses.replace(entry, query=q, answer=a, strategy=s)
