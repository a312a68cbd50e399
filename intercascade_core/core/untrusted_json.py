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

# A JSON string, possessive so a failed match never backtracks; an unterminated string
# runs to the end (one pass, never quadratic). Removing strings leaves the structure.
_STRING = re.compile(r'"(?:[^"\\]++|\\[\s\S]?+)*+(?:"|\Z)')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # +1 / -1 as int8


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
    text = _text(data, max_bytes)
    _check_depth(text, max_depth)

    def number(literal: str, convert: type[int] | type[float]) -> int | float:
        if len(literal) > max_number_chars:
            raise MalformedJSONError(
                "number", f"a number literal of {len(literal)} characters (at most "
                f"{max_number_chars})")
        value = convert(literal)
        if isinstance(value, float) and not math.isfinite(value):
            raise MalformedJSONError("number", "a number beyond the float range")
        return value

    def constant(name: str) -> Any:
        raise MalformedJSONError("number", f"{name} is not JSON")

    try:
        return json.loads(
            text,
            parse_int=lambda s: number(s, int),
            parse_float=lambda s: number(s, float),
            parse_constant=constant,
        )
    except json.JSONDecodeError as e:
        raise MalformedJSONError("syntax", str(e)) from None  # json's words, never the text
    except RecursionError:  # the pre-check makes this unreachable; kept as a last guard
        raise MalformedJSONError("depth", "nested too deep to parse") from None


def _text(data: bytes | bytearray | str, max_bytes: int) -> str:
    if isinstance(data, str):
        # a str of n characters is n to 4n bytes in UTF-8: encode only when it matters
        size = len(data) if len(data) * 4 <= max_bytes else len(
            data.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise MalformedJSONError("size", f"{size} bytes, more than the {max_bytes} allowed")
        return data.removeprefix("\ufeff")
    if not isinstance(data, bytes | bytearray):
        raise InvalidArgumentError("data", f"expected bytes or str, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MalformedJSONError("size", f"{len(data)} bytes, more than the {max_bytes} allowed")
    try:
        return bytes(data).decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise MalformedJSONError("encoding", f"not UTF-8 (byte {e.start})") from None


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse nesting deeper than *max_depth* without parsing (no recursion)."""
    # UTF-8 multi-byte sequences hold no ASCII bytes, so deleting bytes is exact
    skeleton = _STRING.sub("", text).encode("utf-8", "surrogatepass")
    brackets = skeleton.translate(None, _NOT_BRACKET)
    if brackets.count(b"[") + brackets.count(b"{") <= max_depth:
        return  # not even that many openings in all
    steps = np.frombuffer(brackets.translate(_STEP), dtype=np.int8)
    depth = int(np.cumsum(steps, dtype=np.int64).max())
    if depth > max_depth:
        raise MalformedJSONError("depth", f"nested {depth} deep (at most {max_depth})")
