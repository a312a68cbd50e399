"""sanitize_text remembers short texts: the same result as computing it, and bounded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.core import sanitize

hostile = st.lists(st.sampled_from(["a", " ", "\n", "<", ">", "|", ":", "Answer", "Strategy",
                                    "<<<", "\u200b", "\x00", "\u0410nswer", "[INST]", "#"]),
                   max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(hostile, st.integers(0, 60))
def test_a_remembered_result_is_the_computed_one(text, max_chars):
    first = sanitize.sanitize_text(text, max_chars=max_chars)
    assert first == sanitize._sanitize(text, max_chars)
    assert sanitize.sanitize_text(text, max_chars=max_chars) == first  # from the cache


def test_long_texts_are_not_remembered():
    sanitize._remembered.cache_clear()
    long = "Strategy: x\n" * 1000
    assert len(long) > sanitize._REMEMBERED_CHARS
    out = sanitize.sanitize_text(long, max_chars=100_000)
    assert out == sanitize._sanitize(long, 100_000)
    assert sanitize._remembered.cache_info().currsize == 0
    sanitize.sanitize_text("short", max_chars=10)
    info = sanitize._remembered.cache_info()
    assert info.currsize == 1 and info.maxsize == 4096
