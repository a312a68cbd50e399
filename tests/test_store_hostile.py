"""A durable store under damage and hostile files: property tests over every file.

The source store holds a checkpointed snapshot (with its int8 scan copy and hnsw index)
plus journal records after it; every entry in it was acknowledged. Each example copies
it, damages one file, and opens it (writer or reader, full checksums). Allowed outcomes:

* a typed :class:`StoreError` subclass naming a path inside the store, or
* a clean open holding **every** acknowledged entry, vectors and usage counts intact;
  derived data (scan copy, index) may be dropped with a :class:`DerivedDataWarning`
  and rebuilt, and retrieval must then still be exact;
* only when the damage is a truncation of the journal — indistinguishable from a crash
  mid-append — a prefix of the records may come back, with a :class:`TornJournalWarning`.

Anything else fails: another exception type (``IsADirectoryError``, ``RecursionError``),
an acknowledged entry silently missing, or an open that does not return in time (a FIFO).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from intercascade_core.core.repository import Entry, Repository, update
from intercascade_core.core.retrieve import retrieve
from intercascade_core.errors import StoreError, StoreLockedError
from intercascade_core.storage.journal import (
    CURRENT,
    JOURNAL,
    LOCK,
    DurableStore,
    TornJournalWarning,
)
from intercascade_core.storage.store import (
    HNSW_INDEX,
    MANIFEST,
    SCAN_FILES,
    DerivedDataWarning,
)
from tests.strategies import random_unit

DIM = 8
MODEL = "hostile-test-model"
OPEN_TIMEOUT_S = 30

_SOURCE: dict[str, Any] = {}


def _source(factory: pytest.TempPathFactory) -> tuple[Path, Repository, np.ndarray, str]:
    """The acknowledged store: 40 entries in a snapshot (scan copy + hnsw index), then
    12 journal records (entries and usage increments). Built once per session."""
    if not _SOURCE:
        root = factory.mktemp("hostile-src") / "store"
        rng = np.random.default_rng(0)
        ds = DurableStore.open(root, dim=DIM, model_id=MODEL)
        repo, uses = ds.repository, np.zeros(0, np.int64)
        for i in range(40):
            es = [Entry(f"q{i}", f"a{i}", f"strategy {i}", tenant="ab"[i % 2], created_at=float(i))]
            repo = update(repo, es, random_unit(rng, 1, DIM))
            ds.log(repo.entries[-1:], repo.vectors[-1:], [i - 1] if i else [])
        uses = np.asarray(
            np.bincount(np.arange(39), minlength=40), dtype=np.int64
        )  # one use of each row but the last, as logged
        retrieve(repo, repo.vectors[:1], 3, backend="hnsw")  # the arena gets an index
        ds.checkpoint(repo, uses, scan_copy=True)
        for i in range(40, 52):
            es = [Entry(f"q{i}", f"a{i}", f"strategy {i}", tenant="b", created_at=float(i))]
            repo = update(repo, es, random_unit(rng, 1, DIM))
            ds.log(repo.entries[-1:], repo.vectors[-1:], [3])
        uses = np.concatenate([uses, np.zeros(12, np.int64)])
        uses[3] += 12
        ds.close()
        snap = (root / CURRENT).read_text().strip()
        assert {p.name for p in (root / snap).iterdir()} >= {*SCAN_FILES, HNSW_INDEX, MANIFEST}
        _SOURCE.update(root=root, repo=repo, uses=uses, snap=snap)
    return _SOURCE["root"], _SOURCE["repo"], _SOURCE["uses"], _SOURCE["snap"]


def _files(root: Path) -> list[str]:
    """The store's non-empty files (LOCK is empty once its writer has let go)."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.stat().st_size
    )


def _copy(src: Path, factory: pytest.TempPathFactory) -> Path:
    dst = factory.mktemp("hostile") / "store"
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _open(root: Path, readonly: bool) -> DurableStore:
    return DurableStore.open(root, dim=DIM, model_id=MODEL, verify="full", readonly=readonly)


def _bounded(fn: Callable[[], Any], fifos: list[Path]) -> Any:
    """``fn()`` in a thread; fail if it has not returned in OPEN_TIMEOUT_S (after
    unblocking a reader stuck on one of ``fifos``, so the thread can end)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                box["value"] = fn()
            box["warnings"] = [w.category for w in caught]
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(OPEN_TIMEOUT_S)
    if t.is_alive():
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(10)
        pytest.fail(f"the open did not return within {OPEN_TIMEOUT_S} s (it hangs)")
    return box


def _check_outcome(
    box: dict[str, Any], root: Path, repo: Repository, uses: np.ndarray, *, prefix_ok: bool
) -> None:
    event(
        f"outcome: {type(box['error']).__name__ if 'error' in box else 'opened'}"
        + ("" if "error" in box else f" {sorted(w.__name__ for w in set(box['warnings']))}")
    )
    if "error" in box:
        e = box["error"]
        assert isinstance(e, StoreError) and not isinstance(e, StoreLockedError), repr(e)
        assert Path(e.path).resolve().is_relative_to(root.resolve()), e.path
        return
    ds: DurableStore = box["value"]
    try:
        got = ds.repository
        torn = TornJournalWarning in box["warnings"]
        assert set(box["warnings"]) <= {TornJournalWarning, DerivedDataWarning}, box["warnings"]
        if torn:
            assert prefix_ok, "a torn-tail warning for damage that is not a truncation"
        else:
            assert len(got) == len(repo), "an acknowledged entry was dropped"
        assert list(got.entries) == list(repo.entries[: len(got)])
        np.testing.assert_array_equal(got.vectors, repo.vectors[: len(got)])
        if len(got) == len(repo):
            np.testing.assert_array_equal(ds.uses, uses)
        # derived data is exact or rebuilt: the int8 scan and the index agree with f32
        q = repo.vectors[[5, 41]] if len(got) > 41 else repo.vectors[[5]]
        a = retrieve(got, q, 4, scan="int8")
        b = retrieve(got, q, 4, scan="f32")
        np.testing.assert_array_equal(a.indices, b.indices)
        top = retrieve(got, q[:1], 1, backend="hnsw")
        assert top.indices[0, 0] == 5
    finally:
        ds.close()


# ----------------------------------------------------------------------------- class 5: integrity
_LAST_RECORD_BYTES = 200  # each journal record of the source store is larger than this


def _edit_manifest(path: Path, key: str, delta: int) -> None:
    doc = json.loads(path.read_text())
    if key == "tenants":
        doc[key] = list(reversed(doc[key]))
    else:
        doc[key] = doc[key] + delta  # not re-signed: a hand edit or a damaged digit
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))


@settings(max_examples=250, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), readonly=st.booleans())
def test_damage_anywhere_is_a_typed_error_or_loses_nothing_acknowledged(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, readonly: bool
) -> None:
    src, repo, uses, snap = _source(tmp_path_factory)
    root = _copy(src, tmp_path_factory)
    # any file; a third of the examples each on the journal and on the manifest, where
    # damage could drop acknowledged records (the rest is checksummed data)
    manifest = f"{snap}/{MANIFEST}"
    name = data.draw(
        st.sampled_from([JOURNAL, manifest]) | st.sampled_from(_files(root)), label="file"
    )
    target = root / name
    raw = bytearray(target.read_bytes())
    kinds = ["flip", "truncate"] + (["edit"] if name == manifest else [])
    kind = data.draw(st.sampled_from(kinds), label="damage")
    if kind == "flip":  # one byte, any bits of it: damage to a complete, synced file
        anywhere = st.integers(0, len(raw) - 1)
        last_record = st.integers(max(0, len(raw) - _LAST_RECORD_BYTES), len(raw) - 1)
        pos = data.draw(anywhere | last_record if name == JOURNAL else anywhere, label="position")
        raw[pos] ^= data.draw(st.integers(1, 255), label="mask")
        target.write_bytes(bytes(raw))
    elif kind == "truncate":
        target.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="size")]))
    else:
        key = data.draw(st.sampled_from(["lsn", "count", "dim", "tenants", "format_version"]))
        _edit_manifest(target, key, data.draw(st.sampled_from([-1, 1, 5]), label="delta"))
    prefix_ok = kind == "truncate" and name == JOURNAL and not readonly
    if readonly and kind == "truncate" and name == JOURNAL:
        prefix_ok = True  # a reader leaves out a torn tail silently (a live writer's)
        box = _bounded(lambda: _open(root, True), [])
        if "value" in box and len(box["value"].repository) < len(repo):
            box["warnings"] = [*box["warnings"], TornJournalWarning]
    else:
        box = _bounded(lambda: _open(root, readonly), [])
    _check_outcome(box, root, repo, uses, prefix_ok=prefix_ok)


def test_an_edited_manifest_lsn_does_not_drop_journal_records(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The case that silently lost 12 acknowledged records: the snapshot's lsn raised."""
    src, _, _, snap = _source(tmp_path_factory)
    root = _copy(src, tmp_path_factory)
    _edit_manifest(root / snap / MANIFEST, "lsn", 12)
    with pytest.raises(StoreError, match=r"manifest\.json: sha256 checksum mismatch"):
        _open(root, False)


def test_a_flip_in_the_last_synced_record_is_an_error_not_a_torn_tail(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from intercascade_core.errors import JournalCorruptError

    src = _source(tmp_path_factory)[0]
    for where in (-1, -40, -300):  # in the vectors, in the JSON metadata
        root = _copy(src, tmp_path_factory)
        raw = bytearray((root / JOURNAL).read_bytes())
        raw[where] ^= 0x01
        (root / JOURNAL).write_bytes(bytes(raw))
        with pytest.raises(JournalCorruptError, match="checksum mismatch on a complete record"):
            _open(root, False)
        assert (root / JOURNAL).read_bytes() == bytes(raw)  # nothing truncated


def test_a_damaged_length_of_the_last_record_is_an_error(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from intercascade_core.errors import JournalCorruptError
    from intercascade_core.storage.journal import read_journal

    src = _source(tmp_path_factory)[0]
    root = _copy(src, tmp_path_factory)
    j = root / JOURNAL
    assert len(read_journal(j).records) == 12
    size = j.stat().st_size
    raw = bytearray(j.read_bytes())
    pos = 8 + 8 + int.from_bytes(raw[8:12], "little")  # past the header: walk the frames
    while (length := int.from_bytes(raw[pos : pos + 4], "little")) + pos + 8 != size:
        pos += 8 + length
    raw[pos + 2] ^= 0x01  # the last record's length + 65536: past the end of the file
    j.write_bytes(bytes(raw))
    with pytest.raises(JournalCorruptError, match="length field is damaged"):
        _open(root, False)


# ----------------------------------------------------------------------------- class 6: hostile paths
HOSTILE = ["symlink-zero", "symlink-copy", "fifo", "directory", "deep-json", "huge", "empty"]


def _make_hostile(target: Path, how: str) -> list[Path]:
    """Replace ``target`` (a file or the snapshot directory) by something hostile;
    return the FIFOs made (to unblock a stuck reader)."""
    content = target.read_bytes() if target.is_file() else b""
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    if how == "symlink-zero":
        os.symlink("/dev/zero", target)
    elif how == "symlink-copy":  # a link to an intact copy: still not followed
        copy = target.with_name(f".copy-of-{target.name}")
        if content:
            copy.write_bytes(content)
        else:
            copy.mkdir()
        os.symlink(copy.name, target)
    elif how == "fifo":
        os.mkfifo(target)
        return [target]
    elif how == "directory":
        target.mkdir()
    elif how == "deep-json":
        target.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    elif how == "huge":  # sparse: costs nothing on disk, everything to read whole
        with open(target, "wb") as f:
            f.truncate(1 << 40)
    elif how == "empty":
        target.write_bytes(b"")
    return []


@settings(max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), how=st.sampled_from(HOSTILE), readonly=st.booleans())
def test_hostile_files_are_typed_errors_naming_the_path(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, how: str, readonly: bool
) -> None:
    src, repo, uses, snap = _source(tmp_path_factory)
    root = _copy(src, tmp_path_factory)
    (root / LOCK).write_bytes(b"")
    name = data.draw(st.sampled_from([*_files(root), LOCK, snap]), label="target")
    target = root / name
    if readonly and name == LOCK:
        name = MANIFEST  # readers never touch the lock file
        target = root / snap / MANIFEST
    fifos = _make_hostile(target, how)
    box = _bounded(lambda: _open(root, readonly), fifos)
    if "error" in box:
        e = box["error"]
        assert isinstance(e, StoreError) and not isinstance(e, StoreLockedError), repr(e)
        assert e.path == str(target) or Path(e.path).parent == target, (e.path, str(target))
        return
    # an open may succeed only where the damage is harmless: derived data (dropped with a
    # warning and rebuilt) or a lock file that is a regular file (its content is only a note)
    derived = Path(name).name in (*SCAN_FILES, HNSW_INDEX)
    assert derived or (name == LOCK and how in ("deep-json", "huge", "empty")), (name, how)
    if derived:
        assert DerivedDataWarning in box["warnings"]
    _check_outcome(box, root, repo, uses, prefix_ok=False)


@pytest.mark.parametrize("name", [MANIFEST, CURRENT, JOURNAL])
def test_a_directory_in_place_of_a_file_is_a_store_error(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    src, _, _, snap = _source(tmp_path_factory)
    root = _copy(src, tmp_path_factory)
    target = root / snap / name if name == MANIFEST else root / name
    _make_hostile(target, "directory")
    with pytest.raises(StoreError, match="is a directory") as ei:
        _open(root, False)
    assert ei.value.path == str(target)


def test_a_store_path_that_is_a_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StoreError, match="not a directory"):
        _open(tmp_path / "f", False)
    with pytest.raises(StoreError, match="not a directory"):
        _open(tmp_path / "f", True)
