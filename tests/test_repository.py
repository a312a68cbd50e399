"""Repository: immutable versions over a shared append-only arena."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from intercascade_core import Entry, InvalidArgumentError, Repository, empty_repository, update
from tests.strategies import entries, random_unit


def test_empty_repository() -> None:
    r = empty_repository(8)
    assert len(r) == 0 and r.dim == 8
    assert r.vectors.shape == (0, 8) and r.vectors.dtype == np.float32
    assert list(r.entries) == []


def test_entry_defaults_and_frozen() -> None:
    e = Entry(query="q", answer="a", strategy="s")
    assert (e.source_level, e.source_model, e.created_at, e.tenant, e.id) == (
        0,
        "",
        0.0,
        "default",
        -1,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.query = "x"  # type: ignore[misc]
    assert not hasattr(e, "__dict__")


def test_update_appends_and_assigns_ids() -> None:
    rng = np.random.default_rng(1)
    v = random_unit(rng, 5, 6)
    r0 = empty_repository(6)
    given = [Entry("a", "b", "c", id=77)] + entries(2)
    r1 = update(r0, given, v[:3])
    r2 = update(r1, entries(2, "z"), v[3:])
    assert len(r0) == 0 and len(r1) == 3 and len(r2) == 5
    assert [e.id for e in r2.entries] == [77, 1, 2, 3, 4]
    assert r2.entries[-1].query == "z1" and r2.entries[1:3][0].query == "q0"
    np.testing.assert_allclose(r2.vectors, v, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(r1.vectors, r2.vectors[:3])


def test_update_older_version_copies() -> None:
    rng = np.random.default_rng(2)
    v = random_unit(rng, 4, 3)
    r1 = update(empty_repository(3), entries(2), v[:2])
    r2 = update(r1, entries(1, "b"), v[2:3])
    r3 = update(r1, entries(1, "c"), v[3:4])  # branch from the older version
    assert r2._arena is r1._arena and r3._arena is not r1._arena
    assert [e.query for e in r2.entries] == ["q0", "q1", "b0"]
    assert [e.query for e in r3.entries] == ["q0", "q1", "c0"]
    np.testing.assert_allclose(r2.vectors[2], v[2], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r3.vectors[2], v[3], rtol=1e-6, atol=1e-7)


def test_growth_keeps_old_views_valid() -> None:
    rng = np.random.default_rng(3)
    v = random_unit(rng, 100, 4)
    r = empty_repository(4)
    versions = []
    for i in range(100):
        r = update(r, entries(1), v[i : i + 1])
        versions.append((r, r.vectors, r.vectors.copy()))
    for i, (ri, view, snapshot) in enumerate(versions):
        assert len(ri) == i + 1
        np.testing.assert_array_equal(view, snapshot)
        np.testing.assert_array_equal(ri.vectors, snapshot)
        np.testing.assert_allclose(snapshot, v[: i + 1], rtol=1e-6, atol=1e-7)


def test_vectors_read_only_and_cannot_be_made_writeable() -> None:
    r = update(empty_repository(3), entries(1), np.array([[1, 0, 0]], np.float32))
    view = r.vectors
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0] = 2.0
    with pytest.raises(ValueError):
        view.flags.writeable = True
    with pytest.raises(ValueError):
        view[:1].flags.writeable = True


def test_nearly_unit_rows_are_renormalised() -> None:
    v = np.array([[1.0005, 0.0]], np.float32)
    r = update(empty_repository(2), entries(1), v)
    assert r.vectors[0, 0] == np.float32(1.0)
    assert v[0, 0] == np.float32(1.0005)  # input unmodified


def test_single_row_may_be_1d() -> None:
    r = update(empty_repository(2), entries(1), np.array([0.0, 1.0], np.float32))
    assert r.vectors.shape == (1, 2)


def test_update_with_no_entries_returns_same_version() -> None:
    r = empty_repository(2)
    assert update(r, [], np.empty((0, 2), np.float32)) is r


def test_repository_is_not_hashable_by_value() -> None:
    a, b = empty_repository(2), empty_repository(2)
    assert a != b and a == a
    assert isinstance(a, Repository)


@pytest.mark.parametrize(
    ("vectors", "argument"),
    [
        (np.ones((1, 3), np.float64) / np.sqrt(3), "vectors"),  # wrong dtype
        ([[1.0, 0.0, 0.0]], "vectors"),  # not an ndarray
        (np.ones((1, 4), np.float32) / 2, "vectors"),  # wrong dimension
        (np.ones((2, 3), np.float32) / np.sqrt(np.float32(3)), "vectors"),  # wrong row count
        (np.array([[np.nan, 0, 0]], np.float32), "vectors"),
        (np.array([[np.inf, 0, 0]], np.float32), "vectors"),
        (np.array([[2.0, 0, 0]], np.float32), "vectors"),  # non-unit: rejected
        (np.zeros((1, 3), np.float32), "vectors"),
    ],
)
def test_update_iv(vectors: object, argument: str) -> None:
    r = empty_repository(3)
    with pytest.raises(InvalidArgumentError) as info:
        update(r, entries(1), vectors)  # type: ignore[arg-type]
    assert info.value.argument == argument
    assert len(r) == 0


def test_update_iv_entries_and_repo() -> None:
    r = empty_repository(3)
    v = np.array([[1, 0, 0]], np.float32)
    with pytest.raises(InvalidArgumentError):
        update(r, ["not an entry"], v)  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError):
        update(r, Entry("q", "a", "s"), v)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        update("repo", entries(1), v)  # type: ignore[arg-type]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidArgumentError):
            empty_repository(bad)  # type: ignore[arg-type]
