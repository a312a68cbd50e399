"""sanitize_text remembers short texts: the same result as computing it, and bounded."""

from __future__ import annotations

import threading

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
    sanitize._remembered.clear()
    long = "Strategy: x\n" * 1000
    assert len(long) > sanitize._REMEMBERED_CHARS
    out = sanitize.sanitize_text(long, max_chars=100_000)
    assert out == sanitize._sanitize(long, 100_000)
    assert len(sanitize._remembered) == 0
    sanitize.sanitize_text("short", max_chars=10)
    assert len(sanitize._remembered) == 1 and sanitize._remembered.chars == 10


def test_the_memo_is_bounded_by_characters_and_entries():
    memo = sanitize._Memo(max_entries=3, max_chars=100)
    texts = [f"{i} " + "\U0001F600" * 20 for i in range(10)]  # 22 characters each
    for t in texts:
        assert memo(t, 1000) == sanitize._sanitize(t, 1000)
        assert memo.chars <= 100 and len(memo) <= 3
    assert memo.chars == sum(len(t) + len(sanitize._sanitize(t, 1000)) for t in texts[-2:])
    memo(texts[-2], 1000)  # used again: now the most recent, so texts[-1] goes next
    memo(texts[0], 1000)
    assert [t for t, _ in memo._items] == [texts[-2], texts[0]]
    many = sanitize._Memo(max_entries=3, max_chars=10**6)
    for i in range(10):
        many(str(i), 5)
    assert len(many) == 3  # the entry bound holds for tiny texts


def test_the_memo_gives_every_thread_the_computed_result():
    memo = sanitize._Memo(max_entries=8, max_chars=400)
    texts = [f"Strategy: step {i}\x00<<<" for i in range(32)]
    want = {t: sanitize._sanitize(t, 50) for t in texts}
    errors: list[str] = []

    def work(seed: int) -> None:
        for j in range(2000):
            t = texts[(seed * 7 + j) % len(texts)]
            if memo(t, 50) != want[t]:
                errors.append(t)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert memo.chars == sum(len(t) + len(want[t]) for t, _ in memo._items)
    assert memo.chars <= 400 and len(memo) <= 8
