"""Tests of the Embedder protocol, input validation and the HashingEmbedder test double."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.core.protocols import Embedder, validate_texts
from intercascade_core.errors import InvalidArgumentError
from intercascade_core.models.hashing import HashingEmbedder


def _check_contract(v: np.ndarray, n: int, dim: int) -> None:
    assert v.dtype == np.float32
    assert v.shape == (n, dim)
    assert v.flags.c_contiguous
    assert np.all(np.isfinite(v))
    if n:
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_hashing_is_an_embedder() -> None:
    e = HashingEmbedder()
    assert isinstance(e, Embedder)
    assert e.dim == 384
    assert "test-double" in e.model_id


def test_hashing_contract_and_determinism() -> None:
    texts = ["What is 2 + 3?", "", "?!", "naïve café — 日本語", "word " * 5000]
    a = HashingEmbedder().embed(texts)
    b = HashingEmbedder().embed(texts)
    _check_contract(a, len(texts), 384)
    np.testing.assert_array_equal(a, b)
    # empty and punctuation-only texts share the sentinel vector
    np.testing.assert_array_equal(a[1], a[2])


def test_hashing_empty_batch() -> None:
    _check_contract(HashingEmbedder(dim=16).embed([]), 0, 16)


def test_hashing_similarity_tracks_word_overlap() -> None:
    v = HashingEmbedder().embed(
        [
            "Tom has 3 apples and buys 5 more",
            "Tom has 3 apples and buys 7 more",
            "capital of France",
        ]
    )
    assert v[0] @ v[1] > v[0] @ v[2]


def test_hashing_seed_changes_vectors() -> None:
    t = ["same text here"]
    assert not np.array_equal(HashingEmbedder(seed=0).embed(t), HashingEmbedder(seed=1).embed(t))


def test_hashing_stable_across_processes() -> None:
    code = (
        "from intercascade_core.models.hashing import HashingEmbedder;"
        "print(HashingEmbedder(dim=32).embed(['stable hashing across processes']).tobytes().hex())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(s)},
        ).stdout
        for s in (1, 2)
    }
    assert len(outs) == 1
    here = HashingEmbedder(dim=32).embed(["stable hashing across processes"]).tobytes().hex()
    assert outs == {here + "\n"}


@pytest.mark.parametrize("dim", [0, -1, 1.5, True, "384"])
def test_hashing_bad_dim(dim: object) -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        HashingEmbedder(dim=dim)  # type: ignore[arg-type]
    assert ei.value.argument == "dim"


@pytest.mark.parametrize(
    ("texts", "argument"),
    [
        ("a bare string", "texts"),
        (b"bytes", "texts"),
        (None, "texts"),
        (42, "texts"),
        (["ok", None], "texts[1]"),
        (["ok", 3], "texts[1]"),
        ([b"\xff\xfe not utf-8"], "texts[0]"),
        (["lone surrogate \udcff"], "texts[0]"),
    ],
)
def test_bad_input_is_typed(texts: object, argument: str) -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        validate_texts(texts)
    assert ei.value.argument == argument
    with pytest.raises(InvalidArgumentError):
        HashingEmbedder().embed(texts)  # type: ignore[arg-type]


def test_tuple_is_accepted() -> None:
    assert validate_texts(("a", "b")) == ["a", "b"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",))), max_size=8))
def test_hashing_contract_property(texts: list[str]) -> None:
    v = HashingEmbedder(dim=64).embed(texts)
    _check_contract(v, len(texts), 64)
    # row i depends only on text i
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(v[i], HashingEmbedder(dim=64).embed([t])[0])
