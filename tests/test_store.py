"""store: save/open round trips, memory mapping, hostile files (typed errors naming the
file) and a byte-flip fuzz test (never a crash, never a partial load)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.core.retrieve import int8_scan_copy, retrieve
from intercascade_core.errors import (
    CorruptStoreError,
    IncompatibleStoreError,
    InvalidArgumentError,
    StoreError,
)
from intercascade_core.storage.store import (
    DATA_FILES,
    ENTRIES,
    HNSW_INDEX,
    MANIFEST,
    SCAN_ERRS,
    SCAN_FILES,
    SCAN_PACKED,
    SCAN_SCALES,
    VECTORS,
    DerivedDataWarning,
    manifest_digest,
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
            st.sampled_from(["default", "a", "b\u00fc", "t" * 40]),
            st.integers(-(2**40), 2**40),
            st.floats(allow_nan=False, allow_infinity=False),
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
    """Edit the manifest and re-sign it (its own sha256), to reach the checks behind
    the checksum; an unsigned edit is refused by the checksum first."""
    m = json.loads((p / MANIFEST).read_text())
    m.update(changes)
    m["sha256"] = manifest_digest(m)
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
    m["sha256"] = manifest_digest(m)
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


# ----------------------------------------------------------------------------- manifest checksum
@pytest.mark.parametrize(
    "change", [{"lsn": 1}, {"count": 19}, {"tenants": ["a", "c"]}, {"embedding_model": "x"}]
)
def test_an_unsigned_manifest_edit_is_a_checksum_mismatch(saved: Path, change: dict) -> None:
    m = json.loads((saved / MANIFEST).read_text())
    m.update(change)  # not re-signed: what a hand edit or a damaged byte gives
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptStoreError, match=r"manifest\.json: sha256 checksum mismatch"):
        open_repository(saved, verify="size")


def test_the_checksum_is_required_from_version_2_and_version_1_still_opens(saved: Path) -> None:
    m = json.loads((saved / MANIFEST).read_text())
    del m["sha256"]
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptStoreError, match="fields must be"):
        open_repository(saved)
    del m["derived"]
    m["format_version"] = 1  # what earlier versions wrote: no checksum, no derived data
    (saved / MANIFEST).write_text(json.dumps(m))
    assert len(open_repository(saved).repository) == 20


def test_save_refuses_what_could_not_be_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for bad in (Entry("q", "a", "s", created_at=float("inf")), Entry("q", "a", "s", id=2**70)):
        repo = update(empty_repository(4), [bad], random_unit(rng, 1, 4))
        with pytest.raises(InvalidArgumentError, match="entries"):
            save(tmp_path / "r", repo, model_id=MODEL)
        assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- derived data
def _peek(prev, repo):  # the arena's derived value, unchanged
    return prev


def _mapped(a: np.ndarray) -> bool:
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return type(base).__name__ == "mmap"


def _same_top(repo, queries, k: int = 7) -> None:
    for tenant in (None, "a"):
        a = retrieve(repo, queries, k, scan="int8", tenant=tenant)
        b = retrieve(repo, queries, k, scan="f32", tenant=tenant)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("n", [1, 16, 37, 300])
@pytest.mark.parametrize("verify", ["full", "size"])
def test_scan_copy_is_saved_and_mapped_on_open(tmp_path: Path, n: int, verify: str) -> None:
    repo = _repo(n, tenants=("a", "b"))
    save(tmp_path / "r", repo, model_id=MODEL, scan_copy=True)
    assert {SCAN_PACKED, SCAN_SCALES, SCAN_ERRS} <= {p.name for p in (tmp_path / "r").iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact copy is used without a warning
        got = open_repository(tmp_path / "r", verify=verify).repository  # type: ignore[arg-type]
    copy = got.derived("int8", _peek)
    assert copy is not None and copy.rows == n and _mapped(copy.packed)
    queries = random_unit(np.random.default_rng(1), 4, 16)
    _same_top(got, queries)
    # appending copies the mapped copy once and extends it; results stay exact
    grown = update(
        got, [Entry("x", "a", "s", tenant="a")] * 20, random_unit(np.random.default_rng(2), 20, 16)
    )
    int8_scan_copy(grown)
    assert not _mapped(grown.derived("int8", _peek).packed)
    _same_top(grown, queries)
    _same_top(got, queries)  # the older version still reads only its rows


def test_no_scan_copy_below_the_auto_threshold(tmp_path: Path) -> None:
    save(tmp_path / "r", _repo(30), model_id=MODEL)
    assert not any(p.name.startswith("scan.") for p in (tmp_path / "r").iterdir())
    assert open_repository(tmp_path / "r").repository.derived("int8", _peek) is None


def _damage_scan(path: Path, how: str) -> None:
    f = path / SCAN_PACKED
    if how == "flip":
        data = bytearray(f.read_bytes())
        data[-70] ^= 0x04  # in the last row's codes
        f.write_bytes(bytes(data))
    elif how == "truncate":
        f.write_bytes(f.read_bytes()[:-16])
    elif how == "missing":
        f.unlink()
    elif how == "other-rows":  # a well-formed copy of other vectors, re-signed
        other = tmp = path.parent / "other"
        save(tmp, _repo(37, seed=5, tenants=("a", "b")), model_id=MODEL, scan_copy=True)
        for name in SCAN_FILES:
            shutil.copyfile(other / name, path / name)
        m = json.loads((path / MANIFEST).read_text())
        m["derived"]["int8"]["files"] = json.loads((other / MANIFEST).read_text())["derived"][
            "int8"
        ]["files"]
        m["sha256"] = manifest_digest(m)
        (path / MANIFEST).write_text(json.dumps(m))
    elif how == "wrong-rows":
        m = json.loads((path / MANIFEST).read_text())
        m["derived"]["int8"]["rows"] = 36
        m["sha256"] = manifest_digest(m)
        (path / MANIFEST).write_text(json.dumps(m))
    elif how == "fifo":
        f.unlink()
        os.mkfifo(f)


@pytest.mark.parametrize(
    ("how", "verify"),
    # a byte inside an unsampled row is found by the checksum, i.e. by verify="full" only
    [("flip", "full")]
    + [
        (h, v)
        for h in ("truncate", "missing", "other-rows", "wrong-rows", "fifo")
        for v in ("full", "size")
    ],
)
def test_a_damaged_scan_copy_is_rebuilt_with_a_warning(
    tmp_path: Path, how: str, verify: str
) -> None:
    repo = _repo(37, tenants=("a", "b"))
    save(tmp_path / "r", repo, model_id=MODEL, scan_copy=True)
    _damage_scan(tmp_path / "r", how)
    with pytest.warns(DerivedDataWarning, match=r"scan\.packed\.npy|rebuilt"):
        got = open_repository(tmp_path / "r", verify=verify).repository  # type: ignore[arg-type]
    assert got.derived("int8", _peek) is None  # not trusted: rebuilt on first use
    _same_top(got, random_unit(np.random.default_rng(3), 5, 16))
    _assert_same(repo, got)


def test_a_flip_in_a_sampled_row_is_found_without_checksums(tmp_path: Path) -> None:
    save(tmp_path / "r", _repo(37), model_id=MODEL, scan_copy=True)
    f = tmp_path / "r" / SCAN_SCALES
    data = bytearray(f.read_bytes())
    data[-(48 * 4) + 1] ^= 0x01  # the scale of row 0 of the last block (row 32, sampled)
    f.write_bytes(bytes(data))
    with pytest.warns(DerivedDataWarning, match="sampled rows"):
        got = open_repository(tmp_path / "r", verify="size").repository
    assert got.derived("int8", _peek) is None


def test_hnsw_index_is_saved_and_loaded(tmp_path: Path) -> None:
    from intercascade_core.storage import hnsw

    repo = _repo(300, tenants=("a", "b"))
    queries = random_unit(np.random.default_rng(4), 6, 16)
    before = retrieve(repo, queries, 5, backend="hnsw")  # builds the arena's index
    save(tmp_path / "r", repo, model_id=MODEL)
    assert (tmp_path / "r" / HNSW_INDEX).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = open_repository(tmp_path / "r", verify="size").repository
    assert hnsw.index_stats(got)["count"] == 300  # loaded, not rebuilt
    after = retrieve(got, queries, 5, backend="hnsw")
    np.testing.assert_array_equal(before.indices, after.indices)
    np.testing.assert_array_equal(before.scores, after.scores)
    grown = update(got, [Entry("x", "a", "s")] * 3, random_unit(np.random.default_rng(5), 3, 16))
    top = retrieve(grown, grown.vectors[-1:], 1, backend="hnsw")
    assert top.indices[0, 0] == 302  # the loaded index grows with the repository


def _damage_hnsw(path: Path, how: str) -> None:
    f = path / HNSW_INDEX
    m = json.loads((path / MANIFEST).read_text())
    rec = m["derived"]["hnsw"]
    if how == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
        return
    if how == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
        return
    if how == "params":
        rec["M"] += 1  # any M but the one search builds with
    elif how == "rows":
        rec["rows"] = 299
    elif how == "dim-in-file":  # a consistent record of a file whose header says otherwise
        data = bytearray(f.read_bytes())
        data[16:24] = (299).to_bytes(8, "little")  # the row count in hnswlib's header
        f.write_bytes(bytes(data))
        import hashlib

        rec["files"][HNSW_INDEX] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    m["sha256"] = manifest_digest(m)
    (path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["flip", "truncate", "params", "rows", "dim-in-file"])
def test_a_damaged_or_mismatched_hnsw_index_is_rebuilt_with_a_warning(
    tmp_path: Path, how: str
) -> None:
    from intercascade_core.storage import hnsw

    repo = _repo(300)
    retrieve(repo, repo.vectors[:1], 3, backend="hnsw")
    save(tmp_path / "r", repo, model_id=MODEL)
    _damage_hnsw(tmp_path / "r", how)
    with pytest.warns(DerivedDataWarning, match=r"hnsw\.bin"):
        got = open_repository(tmp_path / "r", verify="size").repository  # checksummed anyway
    assert hnsw.index_stats(got)["count"] == 0  # dropped; the next search rebuilds it
    top = retrieve(got, repo.vectors[7:8], 1, backend="hnsw")
    assert top.indices[0, 0] == 7
