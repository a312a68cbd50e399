"""The bounded JSON reader's screens: the result and the refusals are those of checking
every number and stripping strings with a regex (the reference below), whichever way
:func:`~intercascade_core.core.untrusted_json.loads` takes through a document."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.core import untrusted_json
from intercascade_core.errors import MalformedJSONError

_STRING = re.compile(r'"(?:[^"\\]++|\\[\s\S]?+)*+(?:"|\Z)')


def reference_depth(text: str) -> int:
    """Nesting depth with strings removed by one regex (escapes and all)."""
    skeleton = _STRING.sub("", text)
    depth = best = 0
    for c in skeleton:
        if c in "[{":
            depth += 1
            best = max(best, depth)
        elif c in "]}":
            depth -= 1
    return best


def reference(text: str, max_depth: int = 64, max_number_chars: int = 100) -> object:
    """What the reader must do: refuse deep nesting, long or overflowing numbers and
    NaN/Infinity (each literal checked in Python), else return what json returns."""
    if reference_depth(text) > max_depth:
        raise MalformedJSONError("depth", "")

    def number(literal: str, convert: type) -> object:
        if len(literal) > max_number_chars:
            raise MalformedJSONError("number", "")
        value = convert(literal)
        if isinstance(value, float) and not math.isfinite(value):
            raise MalformedJSONError("number", "")
        return value

    def constant(name: str) -> object:
        raise MalformedJSONError("number", "")

    try:
        return json.loads(text, parse_int=lambda s: number(s, int),
                          parse_float=lambda s: number(s, float), parse_constant=constant)
    except json.JSONDecodeError:
        raise MalformedJSONError("syntax", "") from None


def outcome(fn, *args, **kwargs) -> tuple[str, object]:
    try:
        return "ok", fn(*args, **kwargs)
    except MalformedJSONError as e:
        return e.kind, None


def same(a: object, b: object) -> bool:
    """Equal, with NaN-free floats compared bit for bit (0.0 and -0.0 differ)."""
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex()
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# Literals on both sides of every screen: long runs, exponents of 2 and 3+ digits,
# overflowing mantissas, zeros, and number-like text inside strings.
number_literals = st.one_of(
    st.integers(-(10**250), 10**250).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds(lambda m, e, sign: f"{m}e{sign}{e}", st.integers(0, 10**220),
              st.integers(0, 999), st.sampled_from(["", "+", "-"])),
    st.builds(lambda m, f, e: f"{m}.{f}E{e:03d}", st.integers(0, 99), st.integers(0, 99),
              st.integers(0, 400)),
    st.sampled_from(["0", "-0", "-0.0", "1e999", "1e-999", "1E+308", "1.8e308", "9e307",
                     "1e0000000000309", "1" + "0" * 120, "0." + "0" * 150 + "1"]),
)
string_bodies = st.text(alphabet='ab[]{}"\\e0123456789.+-\n\u00e9', max_size=30)
leaves = st.one_of(number_literals, string_bodies.map(json.dumps),
                   st.sampled_from(["true", "false", "null", "NaN", "-Infinity"]))


def _doc(tree: object) -> str:
    if isinstance(tree, list):
        return "[" + ", ".join(_doc(x) for x in tree) + "]"
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_doc(v)}" for k, v in tree.items()) + "}"
    return str(tree)


documents = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(string_bodies, inner, max_size=3),
    max_leaves=25,
).map(_doc)


@settings(max_examples=600, deadline=None)
@given(documents, st.integers(1, 12), st.sampled_from([1, 5, 24, 100, 199, 200, 201, 400]))
def test_the_reader_does_what_checking_every_number_does(text, max_depth, max_number_chars):
    want = outcome(reference, text, max_depth, max_number_chars)
    for data in (text, text.encode()):
        got = outcome(untrusted_json.loads, data, max_depth=max_depth,
                      max_number_chars=max_number_chars)
        assert got[0] == want[0] and same(got[1], want[1]), (got, want)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet='[]{}"\\, :a1', max_size=60), st.integers(1, 6))
def test_the_depth_check_agrees_with_the_regex_on_any_text(text, max_depth):
    """Valid or not: a depth refusal exactly when the regex skeleton is too deep."""
    deep = reference_depth(text) > max_depth
    kind, _ = outcome(untrusted_json.loads, text, max_depth=max_depth)
    assert (kind == "depth") == deep


def test_the_depth_check_over_a_large_skeleton_uses_the_regex_and_agrees():
    # more than 64 KiB of quotes and brackets: the regex branch; escaped quotes included
    inner = '["[[", "\\"]]", "\\\\", {"a": [1]}], '
    flat = "[" + inner * 6000 + "0]"
    assert len(flat.encode().translate(None, untrusted_json._NOT_STRUCTURE)) > (
        untrusted_json._SPLIT_MAX)
    assert untrusted_json.loads(flat, max_depth=4) == json.loads(flat)
    assert outcome(untrusted_json.loads, flat, max_depth=3)[0] == "depth"
    nested = "[" * 40 + '"]]]]\\"]]", ' + '"", ' * 40_000 + "0" + "]" * 40
    with pytest.raises(MalformedJSONError) as info:
        untrusted_json.loads(nested, max_depth=39)
    assert info.value.kind == "depth"
    assert untrusted_json.loads(nested, max_depth=40) is not None


@pytest.mark.parametrize(("text", "kind"), [
    ("[" + "1" * 101 + "]", "number"),  # a long run: every literal checked
    ('["' + "1" * 101 + '"]', "ok"),  # the same run in a string is only text
    ("[1e999]", "number"),  # a three-digit exponent: floats checked
    ('["3e123", 1.5]', "ok"),  # an exponent-like string (a hex id) costs a check, no more
    ("[1e-400]", "ok"),  # underflow is 0.0, finite
    ("[1e99]", "ok"),
    ("[" + "9" * 100 + "]", "ok"),
    ("[" + "9" * 99 + ".0e99]", "number"),  # 102 characters
    ("[Infinity]", "number"),
    ("[-Infinity]", "number"),
])
def test_number_rules_on_each_way_through(text, kind):
    got = outcome(untrusted_json.loads, text)
    assert got[0] == kind
    if kind == "ok":
        assert same(got[1], json.loads(text))


def test_long_mantissas_are_checked_above_the_screen():
    # within max_number_chars but longer than the screen's 200: parsed with checks
    big = "9" * 250 + "e99"  # 10**349: not a float
    assert outcome(untrusted_json.loads, f"[{big}]", max_number_chars=400)[0] == "number"
    fine = "9" * 150 + "e99"  # 10**249
    assert untrusted_json.loads(f"[{fine}]", max_number_chars=400) == [float(fine)]
    assert untrusted_json.loads("[" + "7" * 300 + "]", max_number_chars=400) == [int("7" * 300)]


def test_a_logprob_reply_is_read_as_json_reads_it():
    from intercascade_core.models.sim import SimBackend

    backend = SimBackend(seed=3)
    for model in ("sim-weak", "sim-strong"):
        body = json.dumps({"model": model, "messages": [
            {"role": "user", "content": 'Problem: Tom has 3 "red" apples and buys 4.'}]})
        reply = backend.respond("POST", "/v1/chat/completions", body.encode()).body
        assert same(untrusted_json.loads(reply), json.loads(reply))


def test_an_integer_past_the_interpreters_digit_limit_is_a_number_error() -> None:
    # max_number_chars allows it, but int() refuses more digits than its limit (4300 by
    # default): still one typed refusal, never a bare ValueError
    with pytest.raises(MalformedJSONError) as err:
        untrusted_json.loads("[" + "1" * 5000 + "]", max_number_chars=10_000)
    assert err.value.kind == "number"
    assert untrusted_json.loads("1" * 4000, max_number_chars=10_000) == int("1" * 4000)
