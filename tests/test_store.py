"""store: save/open round trips, memory mapping, hostile files (typed errors naming the
file) and a byte-flip fuzz test (never a crash, never a partial load)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.core.retrieve import retrieve
from intercascade_core.errors import (
    CorruptStoreError,
    IncompatibleStoreError,
    InvalidArgumentError,
    StoreError,
)
from intercascade_core.storage.store import (
    DATA_FILES,
    ENTRIES,
    MANIFEST,
    VECTORS,
    open_repository,
    save,
)
from tests.strategies import random_unit

MODEL = "hashing-test-double/dim=16/seed=0"

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30) | st.text(
    max_size=10
)


def _repo(n: int, dim: int = 16, seed: int = 0, tenants: tuple[str, ...] = ("default",)):
    rng = np.random.default_rng(seed)
    vec = random_unit(rng, n, dim)
    es = [
        Entry(
            f'q{i} \u00e9\n"x"',
            f"a{i}",
            f"s{i}\x00",
            source_level=1,
            source_model="m",
            created_at=float(i) / 3,
            tenant=tenants[int(rng.integers(len(tenants)))],
        )
        for i in range(n)
    ]
    return update(empty_repository(dim), es, vec)


def _assert_same(r1, r2) -> None:
    assert len(r1) == len(r2) and r1.dim == r2.dim
    assert list(r1.entries) == list(r2.entries)
    np.testing.assert_array_equal(r1.vectors, r2.vectors)


@settings(max_examples=25)
@given(
    rows=st.lists(
        st.tuples(
            texts,
            texts,
            texts,
            st.sampled_from(["default", "a", "b\u00fc", ""]),
            st.integers(-(2**40), 2**40),
            st.floats(allow_nan=False),
        ),
        max_size=12,
    ),
    seed=st.integers(0, 2**16),
    verify=st.sampled_from(["full", "size"]),
)
def test_round_trip_property(tmp_path_factory, rows, seed, verify) -> None:
    """save -> open gives identical entries, vectors, tenants, usage counters, manifest
    and retrieval results (every backend that needs no extra index)."""
    dim = 8
    rng = np.random.default_rng(seed)
    vec = random_unit(rng, len(rows), dim)
    es = [
        Entry(q, a, s, source_level=lv % 5, source_model="m", created_at=ca, tenant=t)
        for (q, a, s, t, lv, ca) in rows
    ]
    repo = update(empty_repository(dim), es, vec)
    uses = rng.integers(0, 100, size=len(rows))
    path = tmp_path_factory.mktemp("rt") / "repo"
    m = save(path, repo, model_id=MODEL, uses=uses, lsn=3)
    got = open_repository(path, model_id=MODEL, dim=dim, verify=verify)
    _assert_same(repo, got.repository)
    np.testing.assert_array_equal(got.uses, uses)
    assert got.manifest == m
    assert got.manifest.count == len(rows) and got.manifest.lsn == 3
    queries = random_unit(rng, 3, dim)
    for tenant in (None, "default", "a", "zz"):
        for backend in ("exact", "numpy"):
            a = retrieve(repo, queries, 4, backend=backend, tenant=tenant)
            b = retrieve(got.repository, queries, 4, backend=backend, tenant=tenant)
            np.testing.assert_array_equal(a.indices, b.indices)
            np.testing.assert_array_equal(a.scores, b.scores)
    for t in {e.tenant for e in es}:
        assert got.repository.tenant_size(t) == repo.tenant_size(t)


def test_open_memory_maps_and_is_read_only(tmp_path: Path) -> None:
    repo = _repo(40)
    save(tmp_path / "r", repo, model_id=MODEL)
    got = open_repository(tmp_path / "r", verify="size").repository
    v = got.vectors
    assert not v.flags.writeable and not v.flags.owndata
    with pytest.raises(ValueError):
        v.flags.writeable = True
    # the mapping is the file: no copy of the vectors was made
    base = v
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    assert type(base).__name__ == "mmap"
    # appending to the opened version works and leaves it unchanged
    extra = random_unit(np.random.default_rng(9), 2, 16)
    grown = update(got, [Entry("n1", "a", "s"), Entry("n2", "a", "s", tenant="t")], extra)
    assert len(grown) == 42 and len(got) == 40
    assert grown.entries[41].id == 41 and grown.tenant_code("t") >= 0
    np.testing.assert_array_equal(grown.vectors[:40], repo.vectors)


def test_older_version_saved_and_tenant_codes_renumbered(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    v = random_unit(rng, 4, 16)
    r1 = update(empty_repository(16), [Entry("a", "a", "s", tenant="x")], v[:1])
    r2 = update(r1, [Entry("b", "a", "s", tenant="y"), Entry("c", "a", "s", tenant="x")], v[1:3])
    save(tmp_path / "old", r1, model_id=MODEL)
    got = open_repository(tmp_path / "old").repository
    assert got.tenant_code("x") == 0 and got.tenant_code("y") == -1
    save(tmp_path / "new", r2, model_id=MODEL)
    _assert_same(r2, open_repository(tmp_path / "new").repository)


def test_empty_repository_round_trip(tmp_path: Path) -> None:
    save(tmp_path / "e", empty_repository(5), model_id="")
    got = open_repository(tmp_path / "e", dim=5)
    assert len(got.repository) == 0 and got.repository.vectors.shape == (0, 5)
    r = update(got.repository, [Entry("q", "a", "s")], random_unit(np.random.default_rng(0), 1, 5))
    assert len(r) == 1


def test_lazy_entries_are_identical(tmp_path: Path) -> None:
    repo = _repo(30, tenants=("a", "b"))
    save(tmp_path / "r", repo, model_id=MODEL)
    lazy = open_repository(tmp_path / "r", verify="size").repository
    assert lazy.entries[-1] == repo.entries[-1]
    assert lazy.entries[3:7] == repo.entries[3:7]
    assert list(lazy.entries) == list(repo.entries)
    older = update(lazy, [Entry("z", "a", "s")], repo.vectors[:1])
    branch = update(lazy, [Entry("w", "a", "s")], repo.vectors[1:2])  # copies the lazy list
    assert older.entries[30].query == "z" and branch.entries[30].query == "w"


def test_save_refuses_existing_target_unless_overwrite(tmp_path: Path) -> None:
    save(tmp_path / "r", _repo(3), model_id=MODEL)
    with pytest.raises(InvalidArgumentError, match="exists"):
        save(tmp_path / "r", _repo(5), model_id=MODEL)
    save(tmp_path / "r", _repo(5), model_id=MODEL, overwrite=True)
    assert len(open_repository(tmp_path / "r").repository) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temp or aside dirs left


def test_no_pickle_anywhere(tmp_path: Path) -> None:
    save(tmp_path / "r", _repo(4), model_id=MODEL)
    for name in ("vectors.npy", "tenants.npy", "uses.npy", "entries.offsets.npy"):
        arr = np.load(tmp_path / "r" / name, allow_pickle=False)
        assert not arr.dtype.hasobject


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="repo"):
        save(tmp_path / "x", "nope", model_id=MODEL)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="uses"):
        save(tmp_path / "x", _repo(3), model_id=MODEL, uses=[1, 2])
    with pytest.raises(InvalidArgumentError, match="uses"):
        save(tmp_path / "x", _repo(3), model_id=MODEL, uses=[1, -2, 0])
    with pytest.raises(InvalidArgumentError, match="verify"):
        open_repository(tmp_path, verify="fast")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="not a directory"):
        open_repository(tmp_path / "missing")


# ----------------------------------------------------------------------------- hostile files
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    p = tmp_path / "r"
    save(p, _repo(20, tenants=("a", "b")), model_id=MODEL)
    return p


def _rewrite_manifest(p: Path, **changes: object) -> None:
    m = json.loads((p / MANIFEST).read_text())
    m.update(changes)
    (p / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("verify", ["full", "size"])
@pytest.mark.parametrize("name", DATA_FILES)
def test_truncated_file(saved: Path, name: str, verify: str) -> None:
    f = saved / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 3])
    with pytest.raises(CorruptStoreError, match=name.replace(".", r"\.")) as ei:
        open_repository(saved, verify=verify)  # type: ignore[arg-type]
    assert ei.value.path.endswith(name)


@pytest.mark.parametrize("name", DATA_FILES)
def test_corrupted_byte_is_a_checksum_mismatch(saved: Path, name: str) -> None:
    f = saved / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x20
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="checksum") as ei:
        open_repository(saved)
    assert ei.value.path == str(f)


def test_corrupted_jsonl_with_size_verify_fails_on_access(saved: Path) -> None:
    f = saved / ENTRIES
    data = f.read_bytes()
    f.write_bytes(data.replace(b'"query"', b'"qu\x00ry"', 1))
    repo = open_repository(saved, verify="size").repository  # structure only: lazy
    with pytest.raises(CorruptStoreError, match=r"entries\.jsonl: line 1"):
        repo.entries[0]
    with pytest.raises(CorruptStoreError, match="checksum"):
        open_repository(saved, verify="full")


def test_wrong_dimension_and_model(saved: Path) -> None:
    with pytest.raises(IncompatibleStoreError, match="dimension is 16, expected 384") as ei:
        open_repository(saved, dim=384)
    assert ei.value.path.endswith(MANIFEST)
    with pytest.raises(IncompatibleStoreError, match="embedding model"):
        open_repository(saved, model_id="all-MiniLM-L6-v2")


def test_manifest_dim_disagreeing_with_vectors(saved: Path) -> None:
    _rewrite_manifest(saved, dim=8)
    with pytest.raises(CorruptStoreError, match=r"vectors\.npy.*shape"):
        open_repository(saved, verify="size")


def test_future_format_version(saved: Path) -> None:
    _rewrite_manifest(saved, format_version=99)
    with pytest.raises(IncompatibleStoreError, match="newer") as ei:
        open_repository(saved)
    assert ei.value.path.endswith(MANIFEST)


@pytest.mark.parametrize(
    "change",
    [
        {"format": "other"},
        {"count": -1},
        {"count": True},
        {"dim": "16"},
        {"tenants": [1]},
        {"files": {}},
        {"format_version": 0},
        {"embedding_model": None},
    ],
)
def test_malformed_manifest(saved: Path, change: dict) -> None:
    _rewrite_manifest(saved, **change)
    with pytest.raises(CorruptStoreError, match=r"manifest\.json"):
        open_repository(saved)


def test_missing_files(saved: Path) -> None:
    (saved / VECTORS).unlink()
    with pytest.raises(CorruptStoreError, match=r"vectors\.npy: missing"):
        open_repository(saved)
    (saved / MANIFEST).unlink()
    with pytest.raises(CorruptStoreError, match=r"manifest\.json: missing"):
        open_repository(saved)


def test_manifest_not_json(saved: Path) -> None:
    (saved / MANIFEST).write_bytes(b"\xff{")
    with pytest.raises(CorruptStoreError, match="not valid JSON"):
        open_repository(saved)


def test_pickled_npy_is_rejected(saved: Path) -> None:
    """A vectors file replaced by an object array (which would need pickle) is refused
    before anything is unpickled, even with matching size/checksum in the manifest."""
    obj = np.empty((20, 16), dtype=object)
    with open(saved / VECTORS, "wb") as f:
        np.lib.format.write_array(f, obj, allow_pickle=True)
    import hashlib

    m = json.loads((saved / MANIFEST).read_text())
    data = (saved / VECTORS).read_bytes()
    m["files"][VECTORS] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptStoreError, match="dtype"):
        open_repository(saved)


# ----------------------------------------------------------------------------- fuzz
_FUZZ_SOURCE: dict[str, bytes] = {}


def _fuzz_files(tmp: Path) -> dict[str, bytes]:
    if not _FUZZ_SOURCE:
        save(
            tmp / "src",
            _repo(6, dim=4, tenants=("a", "b")),
            model_id=MODEL,
            uses=[0, 1, 2, 3, 4, 5],
        )
        for name in (*DATA_FILES, MANIFEST):
            _FUZZ_SOURCE[name] = (tmp / "src" / name).read_bytes()
    return _FUZZ_SOURCE


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from([*DATA_FILES, MANIFEST]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
    truncate=st.none() | st.integers(0, 10**6),
    verify=st.sampled_from(["full", "size"]),
)
def test_fuzz_byte_flips_never_crash_or_load_partially(
    tmp_path: Path, name, flips, truncate, verify
) -> None:
    files = _fuzz_files(tmp_path)
    target = tmp_path / "fuzz"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for n, data in files.items():
        (target / n).write_bytes(data)
    data = bytearray(files[name])
    for pos, x in flips:
        data[pos % len(data)] ^= x
    if truncate is not None:
        data = data[: truncate % (len(data) + 1)]
    (target / name).write_bytes(bytes(data))
    ref = _repo(6, dim=4, tenants=("a", "b"))
    try:
        got = open_repository(target, verify=verify)
    except StoreError as e:
        assert os.path.basename(e.path) in (*DATA_FILES, MANIFEST, "fuzz")
        return
    # loaded: with verify="full" it must be complete and identical to what was saved
    repo = got.repository
    if verify == "full":
        _assert_same(ref, repo)
        np.testing.assert_array_equal(got.uses, np.arange(6))
    else:  # structure-only: vectors/shape intact or an error on entry access
        assert len(repo) == 6 and repo.vectors.shape == (6, 4)
        try:
            list(repo.entries)
        except CorruptStoreError as e:
            assert e.path.endswith(ENTRIES)


def test_append_exact_stores_rows_bit_exactly() -> None:
    from intercascade_core.core.repository import append_exact

    rng = np.random.default_rng(4)
    raw = rng.standard_normal((6, 16)).astype(np.float32)
    rows = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    r0 = update(empty_repository(16), [Entry("a", "a", "s")], rows[:1])
    r1 = append_exact(r0, [Entry(f"q{i}", "a", "s", tenant="t") for i in range(3)], rows[1:4])
    np.testing.assert_array_equal(r1.vectors[1:], rows[1:4])  # no renormalisation
    # an older version branches (r0 is no longer the newest of its arena)
    r2 = append_exact(r0, [Entry("b", "a", "s")], rows[4:5])
    assert len(r1) == 4 and len(r2) == 2 and r2.entries[1].query == "b" and r2.entries[1].id == 1
    np.testing.assert_array_equal(r2.vectors[1], rows[4])
    assert r1.tenant_code("t") >= 0 and r2.tenant_code("t") == r1.tenant_code("t")
    with pytest.raises(InvalidArgumentError, match="vectors"):
        append_exact(r0, [Entry("c", "a", "s")], raw[:1] * 2)
