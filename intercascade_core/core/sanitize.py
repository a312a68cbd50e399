"""Untrusted text: strategies are LLM-written, so treat them like user input.

:func:`sanitize_text` (and :func:`sanitize_strategy` / :func:`sanitize_entry` on top of it)
makes a string safe to place inside a delimited block of a prompt:

1. **Control characters stripped.** ``\\r\\n``/``\\r``/U+2028/U+2029 become ``\\n``; every
   other character of Unicode category Cc (C0/C1 controls, DEL), Cf (zero-width and
   bidi-override format characters such as U+200B, U+202E, U+FEFF), Cs (lone surrogates),
   Co (private use) and Cn (unassigned) is removed; ``\\t`` becomes a space. At most two
   consecutive newlines are kept; trailing spaces on lines are dropped.
2. **Markers neutralised.** Every check runs on a *folded view* of the text (below), so
   lookalike spellings are caught, but only the matched spans are rewritten: the rest of
   the text keeps its own characters (``x²`` stays ``x²``).

   - Runs of two or more angle brackets (``<``, ``>`` and their lookalikes) become the
     guillemets ``‹``/``›``, so no ``<<<EXAMPLE n>>>`` delimiter (:mod:`.prompts`) can be
     forged.
   - Chat-template markers become harmless: ``<|``/``|>`` (ChatML, Llama 3, Phi,
     DeepSeek's ``<｜…｜>``) turn into ``‹¦``/``¦›``, special-token tags such as Gemma's
     ``<start_of_turn>``/``<end_of_turn>``, ``<s>``, ``</s>``, ``<bos>``, ``<think>`` get
     guillemets, and ``[INST]``, ``[/INST]``, ``[SYSTEM_PROMPT]``-style tags get round
     brackets.
   - A line that starts like a prompt label (:data:`PROMPT_LABELS`: ``Answer:``,
     ``Strategy:``, ``Problem:``, ``Human:``, ``Assistant:`` ...) after any list, quote,
     emphasis or space prefix (``1. ``, ``a) ``, ``- ``, ``> ``, ``**``, ``“`` ...) has
     the label rewritten as ``[answer]`` etc.; ``Now the new problem`` becomes
     ``[now the new problem]``. The text can then neither open a new prompt section
     nor plant a fake answer line.
   - The teacher prompt's own phrases (``Write a general, reusable strategy`` and
     ``your final answer was:``) become ``[strategy request]`` / ``[your final answer
     was]`` wherever they occur, so a stored strategy cannot turn a weak prompt into a
     teaching prompt.

3. **Length bounded.** At most ``max_chars`` characters (default
   :data:`MAX_STRATEGY_CHARS`); longer text is cut at a word boundary when there is one
   near the limit and ends with ``…``.

The result is a fixed point (``sanitize_text(sanitize_text(x)) == sanitize_text(x)``) and
is never longer than ``max_chars``. Single ``<``/``>`` (``x < 3``) are kept.

**The folded view** (:func:`fold`) is what a reader that is lenient about spelling sees:
NFKD compatibility decomposition (the "K" of NFKC folds fullwidth, mathematical and
circled letters to ASCII; decomposing rather than composing lets combining accents be
dropped), combining marks and format characters removed, case folded, every space
separator and blank filler read as a space, colon lookalikes (``：``, ``꞉``, ``∶`` ...)
read as ``:``, and the Cyrillic, Greek and Armenian letters that look like the Latin
letters of the labels read as those letters (:data:`_CONFUSABLES`). That table is small
and explicit on purpose: the labels are a fixed handful of ASCII words, and core/ takes
no dependency beyond the standard library and numpy/scipy (a full Unicode confusables
package would add one for a few dozen code points).

:func:`find_labels` is the one line-label recogniser: :func:`sanitize_text` neutralises
what it finds and :func:`~intercascade_core.core.prompts.parse_strategy` reads its
sections with it, so the two can never disagree about what a label line is.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from ..errors import InvalidArgumentError
from .repository import Entry

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_QUERY_CHARS",
    "MAX_STRATEGY_CHARS",
    "PROMPT_LABELS",
    "LabelMatch",
    "find_labels",
    "fold",
    "sanitize_entry",
    "sanitize_strategy",
    "sanitize_text",
]

#: default bound on a stored strategy (prompts.py rejects longer parses at 4000)
MAX_STRATEGY_CHARS = 2000
MAX_QUERY_CHARS = 8000
MAX_ANSWER_CHARS = 1000

#: the labels a line must not start with (prompt sections of :mod:`.prompts` and the role
#: names of common chat templates), in folded (lower-case ASCII) spelling
PROMPT_LABELS: Final = (
    "problem",
    "question",
    "answer",
    "final answer",
    "strategy",
    "solution",
    "example",
    "end example",
    "system",
    "user",
    "assistant",
    "human",
    "ai",
    "model",
    "instruction",
    "response",
)

ELLIPSIS = "…"
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_MARK_CATEGORIES = frozenset({"Mn", "Mc", "Me"})
_NEWLINE_CHARS = "\r\x85\x0b\x0c\u2028\u2029"
_NEWLINES = re.compile("\r\n|[" + _NEWLINE_CHARS + "]")

# Lookalikes of Latin letters, checked before case folding (Greek capital Eta looks like H,
# its small form like n). Sources: Unicode's confusables.txt for Cyrillic, Greek, Armenian
# and Latin-extension letters, plus the Cyrillic small letters that print as small capitals
# (к м н т в). A false match only rewrites a label-like line start, so the table errs wide.
_CONFUSABLES: Final[dict[str, str]] = {
    # Cyrillic capitals and smalls
    "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p",
    "С": "c", "Т": "t", "Х": "x", "У": "y", "І": "i", "Ј": "j", "Ѕ": "s", "Ԛ": "q",
    "Ԝ": "w", "Ү": "y", "Ӏ": "l", "Ԁ": "d", "Һ": "h",
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i",
    "ј": "j", "ѕ": "s", "ԁ": "d", "һ": "h", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ү": "y",
    "ԍ": "g", "к": "k", "м": "m", "н": "h", "т": "t", "в": "b", "п": "n", "г": "r",
    "ѵ": "v",
    # Greek capitals and smalls
    "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m",
    "Ν": "n", "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x", "Ϲ": "c", "Ϳ": "j",
    "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ϲ": "c", "ϳ": "j", "η": "n", "μ": "u", "ω": "w", "γ": "y",
    # Armenian
    "օ": "o", "ս": "u", "ո": "n", "հ": "h", "զ": "q", "ց": "g", "Ս": "u",
    "Օ": "o",
    # Latin extensions and IPA that NFKD leaves alone
    "ı": "i", "ɩ": "i", "ɪ": "i", "ɡ": "g", "ȷ": "j", "ɑ": "a", "ɒ": "a", "ɛ": "e",
    "ɜ": "e", "ɔ": "c", "ʀ": "r", "ʏ": "y", "ʜ": "h", "ʟ": "l", "ɴ": "n", "ᴀ": "a",
    "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ᴋ": "k", "ᴍ": "m", "ᴏ": "o", "ᴘ": "p", "ᴛ": "t",
    "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z", "ꜱ": "s", "ſ": "s",
}
# Colon lookalikes that NFKD does not map to ':' (fullwidth and small forms it does).
_COLONS: Final = frozenset(
    "\ua789\u02d0\u02f8\u2236\u1804\u05c3\u0703\u0704\u205a\u2982\u0589\u16ec\ua4fd\ufe30\u1361\u0f14"
)
# Characters that render as blank but are letters or symbols (not category Zs).
_BLANKS: Final = frozenset("\t\u2800\u3164\u115f\u1160\uffa0\u17b4\u17b5")
# Angle-bracket lookalikes NFKD does not fold (fullwidth and small forms it does); the
# guillemets ‹› are the neutral form, so they count as part of a run but stay as they are.
_LT: Final = "<\u2039\u27e8\u3008\u2329\u27ea\u300a\u226a"
_GT: Final = ">\u203a\u27e9\u3009\u232a\u27eb\u300b\u226b"
_PIPE: Final = "|\u2223\u01c0\u2502"


@functools.lru_cache(maxsize=8192)
def _fold_char(ch: str) -> str:
    if ch == "\n" or ch in _NEWLINE_CHARS:
        return "\n"
    if ch in _CONFUSABLES:
        return _CONFUSABLES[ch]
    if ch in _COLONS:
        return ":"
    if ch in _BLANKS:
        return " "
    category = unicodedata.category(ch)
    if category in _DROP_CATEGORIES or category in _MARK_CATEGORIES:
        return ""
    if category == "Zs":
        return " "
    if ch.isascii():
        return ch.lower()
    out = []
    for c in unicodedata.normalize("NFKD", ch):
        if unicodedata.category(c) not in _MARK_CATEGORIES:
            out.append(":" if c in _COLONS else _CONFUSABLES.get(c, c))
    # case folding can expand (ß -> ss) and yield more lookalikes: one more table pass
    return "".join(_CONFUSABLES.get(c, c) for c in "".join(out).casefold())


_ASCII_FOLD: Final = str.maketrans("\t\r\x0b\x0c", " \n\n\n")
_ASCII_DROPPED = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def _view(text: str) -> tuple[str, Sequence[int]]:
    """The folded view of ``text`` and, per view character, the index it came from."""
    if text.isascii() and not _ASCII_DROPPED.search(text):
        # the common case: one view character per character
        return text.lower().translate(_ASCII_FOLD), range(len(text))
    parts: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        f = _fold_char(ch)
        if f:
            parts.append(f)
            index.extend([i] * len(f))
    return "".join(parts), index


def fold(text: str) -> str:
    """The folded view of ``text`` (see the module docstring): what the label checks read."""
    if not isinstance(text, str):
        raise InvalidArgumentError("text", f"must be a str, got {type(text).__name__}")
    return _view(text)[0]


# -- the line-label recogniser (on the folded view) ------------------------------------
_SEP = r"(?:[^\w\n]|_)"  # punctuation, symbol or space; underscore (markdown emphasis)
_DECOR = r"(?:[^\w\n:]|_)"  # the same without the colon
_END = r"(?![^\W_])"  # the word ends here (an underscore may follow: "__Answer__:")
# prefix units: punctuation/space, a digit, an enumerator letter or roman numeral before
# ".", ")" or "]" ("a) ", "iv. "); the units never overlap, so long lines cannot make the
# lazy repetition backtrack badly
_PREFIX = r"(?:" + _SEP + r"|\d|[a-z](?=[.)\]])|[ivxlc]{2,6}(?=[.)\]]))*?"
_LABEL_ALTERNATION = "|".join(
    sorted((f"{_SEP}*".join(map(re.escape, lab.split(" "))) for lab in PROMPT_LABELS),
           key=len, reverse=True)
)
_COLON_RUN = _DECOR + r"*:(?:" + _DECOR + r"*:)*"  # decorated colons, all of them
_LABEL_RE = re.compile(
    r"^(?P<prefix>" + _PREFIX + r")(?:"
    r"(?P<label>" + _LABEL_ALTERNATION + r")" + _END + _COLON_RUN
    # the weak prompt's section divider has no colon; "[" before it is the neutral form
    + r"|(?<!\[)(?P<phrase>now" + _SEP + r"+the" + _SEP + r"+new" + _SEP
    + r"+(?:problem|question))" + _END + r")",
    re.MULTILINE,
)
_LABEL_CANON: Final = {lab.replace(" ", ""): lab for lab in PROMPT_LABELS}


def _canonical(m: re.Match[str]) -> tuple[str, str]:
    """(group name, canonical label) of a :data:`_LABEL_RE` match."""
    group = "label" if m.group("label") is not None else "phrase"
    words = re.findall(r"[a-z]+", m.group(group))
    return group, _LABEL_CANON.get("".join(words), " ".join(words))


@dataclass(frozen=True, slots=True)
class LabelMatch:
    """A label at the start of a line of some text (offsets into that text).

    ``label`` is the canonical spelling (an item of :data:`PROMPT_LABELS`, or ``"now the
    new problem"``/``"now the new question"``); ``line_start`` is where the line begins,
    ``start`` where the label itself begins (after its prefix), ``end`` just past its last
    colon (past the phrase for the divider).
    """

    label: str
    line_start: int
    start: int
    end: int


def find_labels(text: str) -> Iterator[LabelMatch]:
    """Every line of ``text`` that a reader would take as a prompt label, in order.

    Lines end at ``\\n`` and at the other line breaks that :func:`sanitize_text` turns into
    ``\\n``. The check reads the folded view, so lookalike letters, colon variants, odd
    spaces, combining marks and zero-width characters do not hide a label.
    """
    if not isinstance(text, str):
        raise InvalidArgumentError("text", f"must be a str, got {type(text).__name__}")
    view, index = _view(text)
    for m in _LABEL_RE.finditer(view):
        group, label = _canonical(m)
        yield LabelMatch(
            label=label,
            line_start=index[m.start() - 1] + 1 if m.start() > 0 else 0,
            start=index[m.start(group)],
            end=index[m.end() - 1] + 1,
        )


# -- other markers (on the folded view, anywhere in a line) ------------------------------
_ANGLE_RUN = re.compile(f"[{_LT}{_GT}]{{2,}}")
_PIPE_MARKER = re.compile(rf"[{_LT}][{_PIPE}]|[{_PIPE}][{_GT}]")
_SPECIAL_TAG = re.compile(
    rf"[{_LT}] *(?:/ *)?(?:[a-z0-9]+_[a-z0-9_]*|s|bos|eos|pad|unk|eot|sep|cls|mask|think|sys)"
    rf" *[{_GT}]"
)
_BRACKET_TAG = re.compile(r"\[ *(?:/ *)?(?:inst|sys|[a-z]+_[a-z_]+) *\]")
_REQUEST_MARK = re.compile(
    r"write" + _SEP + r"+a" + _SEP + r"+general" + _SEP + r"+reusable" + _SEP
    + r"+strateg(?:y|ies)" + _END
)
_SHOWN_ANSWER = re.compile(
    r"your" + _SEP + r"+final" + _SEP + r"+answer" + _SEP + r"+was" + _END + _COLON_RUN
)


def _angle(f: str) -> str | None:
    return "‹" if f in _LT else "›" if f in _GT else None


def _chat(f: str) -> str | None:
    return "¦" if f in _PIPE else _angle(f)


def _bracket(f: str) -> str | None:
    return {"[": "(", "]": ")"}.get(f) or _angle(f)


def _per_char(convert: Callable[[str], str | None]) -> Callable[[str, re.Match[str]], str]:
    """Convert each character of a span by what it reads as (fullwidth '＜' as '<');
    characters the converter does not know (a combining mark inside the span) stay."""

    def replace(span: str, _m: re.Match[str]) -> str:
        return "".join(convert(_fold_char(c)) or c for c in span)

    return replace


def _fixed(text: str) -> Callable[[str, re.Match[str]], str]:
    return lambda _span, _m: text


def _rewrite(
    text: str,
    pattern: re.Pattern[str],
    replace: Callable[[str, re.Match[str]], str],
    start: Callable[[re.Match[str]], int] = lambda m: m.start(),
) -> str:
    """Replace, in ``text``, the original span of every match of ``pattern`` on the view
    (from ``start(match)`` to the match's end)."""
    view, index = _view(text)
    out: list[str] = []
    pos = 0
    for m in pattern.finditer(view):
        a, b = index[start(m)], index[m.end() - 1] + 1
        if a < pos:  # two view matches inside one original character
            continue
        out += (text[pos:a], replace(text[a:b], m))
        pos = b
    return "".join(out) + text[pos:] if out else text


def _neutralise(text: str) -> str:
    text = _rewrite(text, _ANGLE_RUN, _per_char(_angle))
    text = _rewrite(text, _PIPE_MARKER, _per_char(_chat))
    text = _rewrite(text, _SPECIAL_TAG, _per_char(_bracket))
    text = _rewrite(text, _BRACKET_TAG, _per_char(_bracket))
    text = _rewrite(text, _REQUEST_MARK, _fixed("[strategy request]"))
    text = _rewrite(text, _SHOWN_ANSWER, _fixed("[your final answer was]"))
    # a label is rewritten from where it starts: its list/quote prefix stays as written
    return _rewrite(
        text,
        _LABEL_RE,
        lambda _span, m: f"[{_canonical(m)[1]}]",
        start=lambda m: m.start(_canonical(m)[0]),
    )


def _strip_controls(text: str) -> str:
    text = _NEWLINES.sub("\n", text).replace("\t", " ")
    out = []
    for ch in text:
        if ch == "\n" or unicodedata.category(ch) not in _DROP_CATEGORIES:
            out.append(ch)
    return "".join(out)


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
    if len(text) <= _REMEMBERED_CHARS:
        return _remembered(str(text), max_chars)
    return _sanitize(text, max_chars)


def _sanitize(text: str, max_chars: int) -> str:
    prev = None
    out = text
    # neutralising can expose new patterns (e.g. a removed control char joins '<' '<'):
    # iterate to the fixed point (each pass only shrinks or keeps the pattern count)
    for _ in range(8):
        out = _tidy(_neutralise(_strip_controls(out)))
        if out == prev:
            break
        prev = out
    # cutting a neutral text leaves it neutral (a prefix of a line cannot complete a
    # label, a run or a tag); the second pass is a guard, not a step that changes text
    return _tidy(_neutralise(_bound(out, max_chars))) if len(out) > max_chars else out


class _Memo:
    """The results of :func:`_sanitize` for recent texts, least recently used dropped first,
    within a budget of characters (texts and results counted) as well as of entries: a
    count alone would let 4096 distinct texts of 4096 astral characters hold 128 MiB.
    Thread-safe; the values are ``str``, immutable."""

    def __init__(self, max_entries: int, max_chars: int) -> None:
        self.max_entries, self.max_chars = max_entries, max_chars
        self.chars = 0
        self._items: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __call__(self, text: str, max_chars: int) -> str:
        key = (text, max_chars)
        with self._lock:
            out = self._items.get(key)
            if out is not None:
                self._items.move_to_end(key)
                return out
        out = _sanitize(text, max_chars)  # outside the lock: pure, a race only repeats it
        with self._lock:
            if key not in self._items:
                self._items[key] = out
                self.chars += len(text) + len(out)
                while self.chars > self.max_chars or len(self._items) > self.max_entries:
                    (old, _), dropped = self._items.popitem(last=False)
                    self.chars -= len(old) + len(dropped)
        return out

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.chars = 0


# A prompt shows the same stored strategies again and again, and checking one costs tens
# of microseconds: short texts are remembered (the function is pure), within 4096 entries
# and 2**21 characters (at most 8 MiB of text and results).
_REMEMBERED_CHARS = 4096
_remembered = _Memo(max_entries=4096, max_chars=2**21)


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
