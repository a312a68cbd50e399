"""Repository: immutable versions over a shared append-only arena."""

from __future__ import annotations

import ast
import dataclasses
import mmap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import intercascade_core
from intercascade_core import Entry, InvalidArgumentError, Repository, empty_repository, update
from intercascade_core.core.repository import NORM_TOLERANCE, append_exact, from_arrays, unit_rows
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
    given = [Entry("a", "b", "c", id=77), *entries(2)]
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
    token = r1.derived("who", lambda prev, r: prev or object())
    assert r2.derived("who", lambda prev, r: prev) is token  # in place: storage shared
    assert r3.derived("who", lambda prev, r: prev) is None  # branched: storage of its own
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


# ----------------------------------------------------------------------------- derived data
def _cover(prev: list[int] | None, repo: Repository) -> list[int]:
    """Derived data for the tests: the row lengths it was extended to, in order."""
    seen = [] if prev is None else prev
    if not seen or seen[-1] < len(repo):
        seen.append(len(repo))
    return seen


def test_derived_is_shared_by_in_place_versions_and_grown() -> None:
    v = random_unit(np.random.default_rng(4), 9, 3)
    r1 = update(empty_repository(3), entries(3), v[:3])
    assert r1.derived("cover", _cover) == [3]
    r2 = update(r1, entries(4), v[3:7])
    got = r2.derived("cover", _cover)
    assert got == [3, 7] and r1.derived("cover", _cover) is got  # older version: already covered
    assert r1.derived("other", _cover) == [3]  # keys are independent
    branch = update(r1, entries(2), v[7:9])
    assert branch.derived("cover", _cover) == [5]  # a branch starts afresh
    assert r2.derived("cover", _cover) == [3, 7]


def test_derived_extend_runs_under_the_storage_lock() -> None:
    """Concurrent calls on versions of one arena are serialised: each extend sees the
    value the previous one stored, none is lost (extend yields the GIL mid-way, so
    without the lock the threads would overwrite one another's counts)."""
    v = random_unit(np.random.default_rng(5), 16, 4)
    versions = [update(empty_repository(4), entries(1), v[:1])]
    for i in range(1, 16):
        versions.append(update(versions[-1], entries(1), v[i : i + 1]))

    def count(prev: int | None, repo: Repository) -> int:
        n = prev or 0
        time.sleep(1e-4)
        return n + 1

    def work(r: Repository) -> None:
        for _ in range(20):
            r.derived("n", count)

    threads = [threading.Thread(target=work, args=(r,)) for r in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert versions[0].derived("n", lambda prev, r: prev) == 16 * 20


# ----------------------------------------------------------------------------- bulk loads
def _readonly_map(tmp_path: Path, a: np.ndarray) -> np.ndarray:
    path = tmp_path / f"a{a.dtype}.bin"
    path.write_bytes(a.tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=a.dtype).reshape(a.shape)


def test_from_arrays_shares_read_only_maps_and_copies_the_rest(tmp_path: Path) -> None:
    v = random_unit(np.random.default_rng(6), 5, 4)
    codes = np.array([0, 1, 0, 1, 1], np.int32)
    es = [Entry(f"q{i}", "a", "s", tenant="ab"[c], id=10 + i) for i, c in enumerate(codes)]
    mv, mc = _readonly_map(tmp_path, v), _readonly_map(tmp_path, codes)
    r = from_arrays(mv, mc, ("a", "b"), es)
    assert np.shares_memory(r.vectors, mv) and np.shares_memory(r.tenant_codes, mc)
    assert [e.id for e in r.entries] == [10, 11, 12, 13, 14]  # ids kept as given
    assert r.tenant_size("b") == 3 and r.tenant_names == ("a", "b")
    np.testing.assert_array_equal(r.vectors, v)  # bit-exact, not renormalised

    w = v.copy()
    r2 = from_arrays(w, codes.copy(), ["a", "b"], tuple(es))
    assert not np.shares_memory(r2.vectors, w)  # a writeable array is copied
    w[0, 0] = 7.0
    np.testing.assert_array_equal(r2.vectors, v)
    with pytest.raises(ValueError):
        r2.vectors.flags.writeable = True

    grown = update(r, [Entry("n", "a", "s", tenant="c")], v[:1])  # the first update copies
    assert len(grown) == 6 and grown.tenant_names == ("a", "b", "c")
    assert [e.id for e in grown.entries][-1] == 5
    assert len(r) == 5 and r.tenant_names == ("a", "b", "c")  # names are per arena
    np.testing.assert_array_equal(mv, v)


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        ((np.ones((2, 3)), np.zeros(2, np.int32), ["t"], entries(2)), "vectors"),
        ((np.ones(3, np.float32), np.zeros(1, np.int32), ["t"], entries(1)), "vectors"),
        ((np.ones((2, 0), np.float32), np.zeros(2, np.int32), ["t"], entries(2)), "vectors"),
        ((np.ones((2, 3), np.float32), np.zeros(2, np.int64), ["t"], entries(2)), "tenant_codes"),
        ((np.ones((2, 3), np.float32), np.zeros(3, np.int32), ["t"], entries(2)), "tenant_codes"),
        ((np.ones((2, 3), np.float32), np.zeros(2, np.int32), ["t", "t"], entries(2)), "tenants"),
        ((np.ones((2, 3), np.float32), np.zeros(2, np.int32), [1], entries(2)), "tenants"),
        ((np.ones((2, 3), np.float32), np.zeros(2, np.int32), ["t"], entries(3)), "entries"),
    ],
)
def test_from_arrays_iv(args: tuple[object, ...], argument: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        from_arrays(*args)  # type: ignore[arg-type]
    assert info.value.argument == argument


def test_from_arrays_empty() -> None:
    r = from_arrays(np.empty((0, 3), np.float32), np.empty(0, np.int32), [], [])
    assert len(r) == 0 and r.dim == 3 and r.vectors.shape == (0, 3)
    assert len(update(r, entries(1), np.array([[0, 1, 0]], np.float32))) == 1


# ----------------------------------------------------------------------------- unit_rows
def test_unit_rows_is_the_one_check() -> None:
    v = np.array([[1.0005, 0.0], [0.0, 0.9995]], np.float32)
    out = unit_rows(v, 2)
    np.testing.assert_array_equal(out, [[1, 0], [0, 1]])
    assert out.flags.c_contiguous and v[0, 0] == np.float32(1.0005)
    assert unit_rows(v, 2, renormalise=False) is v  # bit-exact rows come back as given
    assert unit_rows(v[0], 2).shape == (1, 2)  # a 1-D row is one row
    assert unit_rows(v, 2, count=2).shape == (2, 2)
    assert unit_rows(np.empty((0, 2), np.float32), 2).shape == (0, 2)
    off = np.array([[1 + 2 * NORM_TOLERANCE, 0]], np.float32)
    for bad, count, match in [
        (v[0], 2, "shape"),  # 1-D is one row only when one row is expected
        (v, 3, "shape"),
        (v.astype(np.float64), None, "float32"),
        (v.tolist(), None, "numpy"),
        (off, None, "L2 norm"),
        (np.array([[np.nan, 1]], np.float32), None, "NaN"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match) as info:
            unit_rows(bad, 2, count=count, argument="rows_in")
        assert info.value.argument == "rows_in"


def test_append_exact_stores_rows_bit_exactly() -> None:
    v = np.array([[1.0005, 0.0, 0.0]], np.float32)
    assert append_exact(empty_repository(3), entries(1), v).vectors[0, 0] == np.float32(1.0005)
    assert update(empty_repository(3), entries(1), v).vectors[0, 0] == np.float32(1.0)


# ----------------------------------------------------------------------------- encapsulation
_PRIVATE = frozenset({"_arena", "_Arena", "_n", "_append"})


def _reaches_in(source: str) -> list[str]:
    """Places in ``source`` that touch the repository's internals: ``x._arena``-style
    attributes on anything but ``self``/``cls``, ``getattr(x, "_arena")``, and private
    names imported from the repository module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in _PRIVATE:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr"):
                for arg in node.args[1:2]:
                    if isinstance(arg, ast.Constant) and arg.value in _PRIVATE:
                        found.append(f"{node.lineno}: {node.func.id}(..., {arg.value!r})")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("repository"):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_the_scan_finds_reaches_into_the_repository() -> None:
    assert _reaches_in("n = repo._n") == ["1: ._n"]
    assert _reaches_in("a = getattr(repo, '_arena')") == ["1: getattr(..., '_arena')"]
    assert _reaches_in("from ..core.repository import _Arena, Entry") == ["1: import _Arena"]
    assert _reaches_in("class C:\n    def f(self):\n        return self._n") == []


def test_no_module_outside_repository_reaches_into_it() -> None:
    root = Path(intercascade_core.__file__).parent
    own = root / "core" / "repository.py"
    found = [
        f"{path.relative_to(root)}:{where}"
        for path in sorted(root.rglob("*.py"))
        if path != own
        for where in _reaches_in(path.read_text(encoding="utf-8"))
    ]
    assert found == []
