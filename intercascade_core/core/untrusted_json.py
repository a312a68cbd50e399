"""The one reader for JSON that comes from outside the process.

Model replies, response-cache lines, store manifests and calibration files are read with
:func:`loads`. ``json.loads`` trusts its input: a document nested a few thousand deep
raises ``RecursionError``, ``1e999`` becomes ``inf`` (and ``int(inf)`` an
``OverflowError`` later), a 100 000-digit integer costs seconds to convert or raises past
Python's digit limit, and ``NaN``/``Infinity`` are accepted although they are not JSON.
:func:`loads` checks the bounds before parsing, in linear time and without recursion, and
turns every failure into one typed :class:`~intercascade_core.errors.MalformedJSONError`
(also a ``ValueError``), whose ``kind`` says which rule was broken and whose message never
quotes the document (it may hold a secret).

Usage::

    from intercascade_core.core import untrusted_json
    doc = untrusted_json.loads(path.read_bytes(), max_bytes=1 << 20)

Rules (each a keyword argument with the default below):

* ``max_bytes``: the UTF-8 size of the document;
* ``max_depth``: arrays and objects nested inside each other (``[]`` is depth 1);
* ``max_number_chars``: the length of one number literal; every number must also be
  finite as a float (``1e999`` is refused, not read as ``inf``);
* bytes must be UTF-8 (a leading byte-order mark is skipped); ``NaN``, ``Infinity`` and
  ``-Infinity`` are refused.

Strings are returned as ``json`` decodes them (escaped lone surrogates included).

Speed. A model reply with logprobs holds hundreds of numbers, and a Python check per
number costs more than the parse itself. So the numbers are screened first, over the raw
bytes: a document with no run of number characters (``0-9 . e E + -``) longer than
``min(max_number_chars, 200)`` has no literal over the bound and none that overflows
without an exponent of three digits or more; only such an exponent (rare: ``1e-05`` has
two) brings back a check, of floats alone. A document that fails the screen is parsed
with every number checked, as before. The result is the same either way; only the cost
differs.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, MalformedJSONError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_NUMBER_CHARS",
    "MalformedJSONError",
    "loads",
]

DEFAULT_MAX_BYTES = 16 * 2**20  # a chat completion with logprobs for ~8k tokens fits 4x over
DEFAULT_MAX_DEPTH = 64  # completions nest 7 deep, manifests and calibration files less
DEFAULT_MAX_NUMBER_CHARS = 100  # repr of any float is at most 24 characters

# The structure (:func:`_check_depth`): quotes and brackets; then the strings of that
# skeleton (no escapes left in it) cut out by splitting at quotes, or, in a large one, by
# a possessive regex that never backtracks (an unterminated string runs to the end).
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STRINGS_OF_SKELETON = re.compile(rb'"[^"]*+(?:"|\Z)')
_SPLIT_MAX = 1 << 16
_STEP = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # +1 / -1 as int8

# The number screen (module docstring). A literal this long or shorter with an exponent
# of at most two digits is finite: below 10**200 * 10**99.
_SCREEN_CHARS = 200
_NUMBER_RUN = bytes(0x31 if b in b"0123456789.eE+-" else 0x20 for b in range(256))  # "1" / " "
_EXPONENT_VIEW = bytes(  # digits "0", e/E "e", signs "+", anything else " "
    0x30 if 0x30 <= b <= 0x39 else 0x65 if b in b"eE" else 0x2B if b in b"+-" else 0x20
    for b in range(256)
)


def _constant(name: str) -> Any:
    raise MalformedJSONError("number", f"{name} is not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise MalformedJSONError("number", "a number beyond the float range")
    return value


_PLAIN = json.JSONDecoder(parse_constant=_constant)  # numbers screened: json's own
_FLOATS = json.JSONDecoder(parse_float=_finite_float, parse_constant=_constant)


def loads(
    data: bytes | bytearray | str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_number_chars: int = DEFAULT_MAX_NUMBER_CHARS,
) -> Any:
    """Parse one JSON document within the bounds; raise ``MalformedJSONError`` otherwise."""
    for name, bound in (("max_bytes", max_bytes), ("max_depth", max_depth),
                        ("max_number_chars", max_number_chars)):
        if not (isinstance(bound, int) and not isinstance(bound, bool) and bound >= 1):
            raise InvalidArgumentError(name, f"must be an int >= 1, got {bound!r}")
    if max_depth > 500:  # the json module recurses once per level
        raise InvalidArgumentError("max_depth", f"must be at most 500, got {max_depth}")
    raw, text = _text(data, max_bytes)
    _check_depth(raw, max_depth)
    try:
        return _decoder(raw, max_number_chars).decode(text)
    except json.JSONDecodeError as e:
        raise MalformedJSONError("syntax", str(e)) from None  # json's words, never the text
    except RecursionError:  # the pre-check makes this unreachable; kept as a last guard
        raise MalformedJSONError("depth", "nested too deep to parse") from None


def _decoder(raw: bytes, max_number_chars: int) -> json.JSONDecoder:
    """The cheapest decoder that enforces the number rules on ``raw`` (module docstring)."""
    longest = min(max_number_chars, _SCREEN_CHARS)
    if b"1" * (longest + 1) in raw.translate(_NUMBER_RUN):
        return _checked(max_number_chars)  # a long run: check every literal
    view = raw.translate(_EXPONENT_VIEW)
    if b"0e000" in view or b"0e+000" in view:
        return _FLOATS  # a float could overflow: check floats
    return _PLAIN


def _checked(max_number_chars: int) -> json.JSONDecoder:
    """A decoder that checks the length of every number literal and that floats are finite."""

    def number(literal: str, convert: type[int] | type[float]) -> int | float:
        if len(literal) > max_number_chars:
            raise MalformedJSONError(
                "number", f"a number literal of {len(literal)} characters (at most "
                f"{max_number_chars})")
        try:
            value = convert(literal)
        except ValueError:  # past the interpreter's digit limit (sys.set_int_max_str_digits)
            raise MalformedJSONError(
                "number", f"an integer of {len(literal)} digits (past the interpreter's "
                "limit)") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise MalformedJSONError("number", "a number beyond the float range")
        return value

    return json.JSONDecoder(parse_int=lambda s: number(s, int),
                            parse_float=lambda s: number(s, float), parse_constant=_constant)


def _text(data: bytes | bytearray | str, max_bytes: int) -> tuple[bytes, str]:
    """(UTF-8 bytes, text without a byte-order mark) of a document within ``max_bytes``."""
    if isinstance(data, str):
        # a str of n characters is n to 4n bytes in UTF-8: encode once, to scan it
        raw = data.encode("utf-8", "surrogatepass")
        if len(raw) > max_bytes:
            raise MalformedJSONError("size", f"{len(raw)} bytes, more than the {max_bytes} allowed")
        return raw, data.removeprefix("\ufeff")
    if not isinstance(data, bytes | bytearray):
        raise InvalidArgumentError("data", f"expected bytes or str, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MalformedJSONError("size", f"{len(data)} bytes, more than the {max_bytes} allowed")
    raw = bytes(data)
    try:
        return raw, raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise MalformedJSONError("encoding", f"not UTF-8 (byte {e.start})") from None


def _check_depth(raw: bytes, max_depth: int) -> None:
    """Refuse nesting deeper than *max_depth* without parsing (no recursion).

    Escapes are dropped first where one could hide a quote, so that every quote left
    delimits a string: in a string a run of backslashes pairs up from its left, and a
    backslash left over escapes the quote after it. Then only quotes and brackets are kept
    (UTF-8 multi-byte sequences hold no ASCII bytes, so deleting bytes is exact) and the
    strings are cut out of that skeleton; an unterminated one runs to the end. Every pass
    is linear. (A backslash outside a string is not JSON: the parse refuses it.)
    """
    if b'\\"' in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = raw.translate(None, _NOT_STRUCTURE)
    if skeleton.count(b"[") + skeleton.count(b"{") <= max_depth:
        return  # not even that many openings in all
    if len(skeleton) <= _SPLIT_MAX:  # the faster way, while its list stays small
        brackets = b"".join(skeleton.split(b'"')[::2])
    else:
        brackets = _STRINGS_OF_SKELETON.sub(b"", skeleton)
    depth = int(np.cumsum(np.frombuffer(brackets.translate(_STEP), dtype=np.int8),
                          dtype=np.int64).max(initial=0))
    if depth > max_depth:
        raise MalformedJSONError("depth", f"nested {depth} deep (at most {max_depth})")
