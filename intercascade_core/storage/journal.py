"""Online durability: an append-only journal of added entries, replayed on open.

File format (``journal.log``)::

    header  = b"ICJRNL01" | u32 len | u32 crc32(body) | body (JSON: dim, embedding_model)
    record  = u32 len | u32 crc32(payload) | payload
    payload = u32 json_len | JSON {lsn, entries, uses} | float32 vectors (n x dim, little endian)

Every record has a log sequence number (``lsn``), consecutive from 1. A snapshot written
by :func:`~intercascade_core.storage.store.save` records the ``lsn`` it includes; replay applies
only the records after it, so a crash between writing a snapshot and resetting the journal
never applies a record twice.

Reading stops at the first record that is incomplete or fails its checksum. If that record
is the **last** thing in the file it is a torn write (the process died while appending):
it is dropped with a :class:`TornJournalWarning` and the file is truncated to the last
good record before new appends. Anything else (a bad record followed by more data, a gap
in the lsn sequence, a wrong header) is corruption: :class:`JournalCorruptError`.

fsync policy (``fsync=``):

* ``"always"`` (default) — every :meth:`Journal.append` is written and ``fsync``-ed before
  it returns: an acknowledged record survives a SIGKILL *and* a power loss.
* ``"never"`` — written with one ``write`` (to the OS page cache) but not fsynced: an
  acknowledged record survives a SIGKILL of the process (the kernel still holds it) but
  not a power loss or kernel crash. About 10-100x cheaper per append on real disks.

Either way a record is one ``os.write`` of a fully framed buffer, so a reader never sees
a record that is both complete and wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

import numpy as np
import numpy.typing as npt

from ..core.repository import Entry, Repository, append_exact, empty_repository
from ..errors import (
    CorruptStoreError,
    IncompatibleStoreError,
    InvalidArgumentError,
    JournalCorruptError,
)
from .store import (
    StoredRepository,
    Verify,
    _entry_line,
    _parse_line,
    atomic_write_bytes,
    fsync_dir,
    open_repository,
    save,
)

__all__ = [
    "DurableStore",
    "Journal",
    "JournalRecord",
    "TornJournalWarning",
    "read_journal",
]

MAGIC = b"ICJRNL01"
_U32 = struct.Struct("<I")
_FRAME = struct.Struct("<II")
#: a record larger than this is treated as damage, not as a request to allocate it
MAX_RECORD_BYTES = 1 << 30

Fsync = Literal["always", "never"]


class TornJournalWarning(UserWarning):
    """The journal's last record was incomplete (a crash mid-append) and was dropped."""


@dataclass(frozen=True, slots=True, eq=False)
class JournalRecord:
    """One appended batch: entries with their vectors, and the rows whose usage counter
    is incremented (one increment per listed row)."""

    lsn: int
    entries: tuple[Entry, ...]
    vectors: npt.NDArray[np.float32]
    uses: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class JournalScan:
    records: tuple[JournalRecord, ...]
    dim: int
    model_id: str
    valid_end: int  # byte offset just past the last good record
    torn: bool  # a torn last record was found (and dropped)


def _header(dim: int, model_id: str) -> bytes:
    body = json.dumps({"dim": dim, "embedding_model": model_id}, sort_keys=True).encode()
    return MAGIC + _FRAME.pack(len(body), zlib.crc32(body)) + body


def _encode(
    rec_lsn: int, entries: Sequence[Entry], vectors: np.ndarray, uses: Sequence[int]
) -> bytes:
    meta = {
        "lsn": rec_lsn,
        "entries": [json.loads(_entry_line(e, 0)) for e in entries],
        "uses": [int(u) for u in uses],
    }
    js = json.dumps(meta, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    vec = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    payload = _U32.pack(len(js)) + js + vec
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(payload: bytes, dim: int, path: Path, where: str) -> JournalRecord:
    def bad(msg: str) -> JournalCorruptError:
        return JournalCorruptError(path, f"{where}: {msg}")

    if len(payload) < 4:
        raise bad("record too short")
    (jl,) = _U32.unpack_from(payload)
    if jl > len(payload) - 4:
        raise bad("metadata length exceeds the record")
    try:
        meta = json.loads(payload[4 : 4 + jl].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or set(meta) != {"lsn", "entries", "uses"}:
        raise bad("metadata must be an object with lsn, entries, uses")
    lsn, ents, uses = meta["lsn"], meta["entries"], meta["uses"]
    if not isinstance(lsn, int) or isinstance(lsn, bool) or lsn < 1:
        raise bad(f"bad lsn {lsn!r}")
    if not isinstance(ents, list) or not isinstance(uses, list):
        raise bad("entries and uses must be lists")
    if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uses):
        raise bad("uses must be row indices >= 0")
    entries = []
    for j, obj in enumerate(ents):
        try:
            raw = json.dumps(obj).encode("ascii")
        except (TypeError, ValueError):  # pragma: no cover - json.loads output re-dumps
            raise bad(f"entry {j} is not JSON") from None
        try:
            entry, _ = _parse_line(raw, path, j)
        except CorruptStoreError as err:
            raise bad(f"entry {j}: {err}") from None
        entries.append(entry)
    vec = payload[4 + jl :]
    if len(vec) != len(entries) * dim * 4:
        raise bad(f"{len(vec)} vector bytes for {len(entries)} entries of dim {dim}")
    arr = np.frombuffer(vec, dtype="<f4").astype(np.float32).reshape(len(entries), dim)
    arr.flags.writeable = False
    return JournalRecord(lsn, tuple(entries), arr, tuple(uses))


def read_journal(path: str | os.PathLike[str]) -> JournalScan:
    """Parse a journal file (see the module docstring for the torn-tail rule). Does not
    warn or modify the file; :class:`Journal` does both."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise JournalCorruptError(p, "missing") from None
    hdr_len = len(MAGIC) + _FRAME.size
    if len(data) < hdr_len or data[: len(MAGIC)] != MAGIC:
        raise JournalCorruptError(p, "bad header (not an intercascade journal)")
    blen, bcrc = _FRAME.unpack_from(data, len(MAGIC))
    body = data[hdr_len : hdr_len + blen]
    if len(body) != blen or zlib.crc32(body) != bcrc:
        raise JournalCorruptError(p, "header checksum mismatch")
    try:
        h = json.loads(body)
        dim, model_id = h["dim"], h["embedding_model"]
        if not isinstance(dim, int) or dim < 1 or not isinstance(model_id, str):
            raise ValueError("bad fields")
    except (ValueError, KeyError, TypeError) as e:
        raise JournalCorruptError(p, f"bad header body ({e})") from None
    pos = hdr_len + blen
    records: list[JournalRecord] = []
    torn = False
    while pos < len(data):
        rest = len(data) - pos
        if rest < _FRAME.size:
            torn = True
            break
        length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if length > MAX_RECORD_BYTES or end > len(data):
            # incomplete: only acceptable as the very last thing in the file — a complete,
            # checksummed frame further on means this length field was damaged instead
            if _complete_frame_after(data, pos):
                raise JournalCorruptError(
                    p, f"record {len(records) + 1} at byte {pos}: bad length {length} "
                    "followed by more records"
                )
            torn = True
            break
        payload = data[pos + _FRAME.size : end]
        if zlib.crc32(payload) != crc:
            if end == len(data):
                torn = True
                break
            raise JournalCorruptError(
                p, f"record {len(records) + 1} at byte {pos}: checksum mismatch"
            )
        rec = _decode(payload, dim, p, f"record {len(records) + 1} at byte {pos}")
        if records and rec.lsn != records[-1].lsn + 1:
            raise JournalCorruptError(
                p, f"record at byte {pos}: lsn {rec.lsn} does not follow {records[-1].lsn}"
            )
        records.append(rec)
        pos = end
    return JournalScan(tuple(records), dim, model_id, pos, torn)


def _complete_frame_after(data: bytes, pos: int) -> bool:
    """Whether a complete frame with a matching checksum starts anywhere after ``pos``.

    Run only when a torn tail is suspected (at open). Random bytes rarely decode to a
    length that fits the rest of the file, so few offsets cost a checksum.
    """
    last = len(data) - _FRAME.size
    for off in range(pos + 1, last + 1):
        length, crc = _FRAME.unpack_from(data, off)
        end = off + _FRAME.size + length
        if 4 <= length <= MAX_RECORD_BYTES and end <= len(data):
            if zlib.crc32(data[off + _FRAME.size : end]) == crc:
                return True
    return False


class Journal:
    """An open journal file for appending (not thread-safe: callers serialise appends,
    as :class:`~intercascade_core.service.Cascade` does under its lock)."""

    def __init__(
        self, path: str | os.PathLike[str], *, dim: int, model_id: str, fsync: Fsync = "always"
    ) -> None:
        if fsync not in ("always", "never"):
            raise InvalidArgumentError("fsync", f"must be 'always' or 'never', got {fsync!r}")
        self.path = Path(path)
        self.dim = dim
        self.model_id = model_id
        self.fsync = fsync
        if not self.path.exists():
            atomic_write_bytes(self.path, _header(dim, model_id))
        scan = read_journal(self.path)
        if scan.dim != dim or scan.model_id != model_id:
            raise IncompatibleStoreError(
                self.path,
                f"journal is for ({scan.model_id!r}, dim {scan.dim}), expected ({model_id!r}, dim {dim})",
            )
        if scan.torn:
            warnings.warn(
                f"{self.path}: dropped a torn last record (incomplete write at byte "
                f"{scan.valid_end}); the journal is truncated to its last complete record",
                TornJournalWarning,
                stacklevel=2,
            )
        self.records = scan.records
        self._broken: str | None = None
        self._fd = os.open(self.path, os.O_RDWR)
        if scan.torn:
            os.ftruncate(self._fd, scan.valid_end)
            os.fsync(self._fd)
        os.lseek(self._fd, 0, os.SEEK_END)

    def append(
        self, lsn: int, entries: Sequence[Entry], vectors: np.ndarray, uses: Sequence[int] = ()
    ) -> None:
        """Append one record (one write; fsynced when ``fsync="always"``).

        All or nothing: a record larger than :data:`MAX_RECORD_BYTES` is refused before
        anything is written, and a failed write or fsync is rolled back (the file is
        truncated to where the record began) before the error propagates. If even the
        rollback fails, the journal refuses further appends, so it never holds a record
        whose lsn a later append would repeat.
        """
        if self._broken is not None:
            raise JournalCorruptError(self.path, f"an earlier append failed and could not be undone: {self._broken}")
        buf = _encode(lsn, entries, vectors, uses)
        if len(buf) - _FRAME.size > MAX_RECORD_BYTES:
            raise InvalidArgumentError(
                "entries", f"one journal record would take {len(buf)} bytes, more than "
                f"MAX_RECORD_BYTES={MAX_RECORD_BYTES}; log the batch in smaller parts"
            )
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(buf)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self.fsync == "always":
                os.fsync(self._fd)
        except BaseException as exc:
            try:
                os.ftruncate(self._fd, start)
                os.fsync(self._fd)
            except OSError as undo:
                self._broken = f"{exc!r}; rollback failed: {undo!r}"
            raise

    def reset(self) -> None:
        """Atomically replace the journal by an empty one (after a checkpoint)."""
        os.close(self._fd)
        atomic_write_bytes(self.path, _header(self.dim, self.model_id))
        self._fd = os.open(self.path, os.O_RDWR)
        os.lseek(self._fd, 0, os.SEEK_END)
        self.records = ()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ----------------------------------------------------------------------------- durable store
CURRENT = "CURRENT"
JOURNAL = "journal.log"


def _extend_uses(uses: np.ndarray, n: int, rows: Sequence[int]) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    out[: len(uses)] = uses
    if len(rows):
        np.add.at(out, np.asarray(rows, dtype=np.int64), 1)
    out.flags.writeable = False
    return out


class DurableStore:
    """A repository directory that survives crashes: a snapshot plus a journal.

    Layout::

        <dir>/CURRENT            name of the live snapshot (replaced atomically)
        <dir>/snap-<lsn>/        a version saved by store.save (manifest lsn = <lsn>)
        <dir>/journal.log        records after the snapshot

    :meth:`open` recovers: opens the snapshot named by ``CURRENT``, replays the journal
    records with ``lsn`` greater than the snapshot's, and drops a torn last record with a
    warning. The recovered repository and usage counters are :attr:`repository` and
    :attr:`uses`. The store does not hold the live repository afterwards: the caller
    threads its repository value and calls :meth:`log` for each batch it adds (before it
    publishes the new version) and :meth:`checkpoint` to write a new snapshot.
    """

    def __init__(
        self,
        path: Path,
        journal: Journal,
        snapshot: StoredRepository,
        repository: Repository,
        uses: np.ndarray,
        lsn: int,
    ) -> None:
        self.path = path
        self.journal = journal
        self.snapshot_path = snapshot.path
        self.manifest = snapshot.manifest
        self.repository = repository
        self.uses = uses
        self.lsn = lsn
        self.model_id = snapshot.manifest.embedding_model
        self.dim = snapshot.manifest.dim
        self.replayed = 0  # journal records applied on open

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        dim: int,
        model_id: str,
        fsync: Fsync = "always",
        verify: Verify = "full",
    ) -> DurableStore:
        """Open (or create, when the directory has no ``CURRENT``) a durable store."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        cur = root / CURRENT
        if not cur.exists():
            if (root / JOURNAL).exists():
                raise CorruptStoreError(cur, f"missing while {JOURNAL} exists")
            name = "snap-000000000000"
            if not (root / name).exists():
                save(root / name, empty_repository(dim), model_id=model_id, lsn=0)
            atomic_write_bytes(cur, (name + "\n").encode())
        raw = cur.read_bytes()
        try:
            name = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            name = ""
        if not name.startswith("snap-") or "/" in name or not (root / name).is_dir():
            raise CorruptStoreError(cur, f"does not name a snapshot directory: {raw[:80]!r}")
        snap = open_repository(root / name, model_id=model_id, dim=dim, verify=verify)
        for stray in root.iterdir():  # leftovers of a checkpoint interrupted by a crash
            if (
                stray.is_dir()
                and stray.name != name
                and (stray.name.startswith("snap-") or stray.name.startswith(".snap-"))
            ):
                shutil.rmtree(stray, ignore_errors=True)
        journal = Journal(root / JOURNAL, dim=dim, model_id=model_id, fsync=fsync)
        repo, uses, lsn = snap.repository, np.asarray(snap.uses), snap.manifest.lsn
        applied = 0
        for rec in journal.records:
            if rec.lsn <= lsn:
                continue
            if rec.lsn != lsn + 1:
                journal.close()
                raise JournalCorruptError(
                    journal.path, f"record lsn {rec.lsn} does not follow the snapshot's lsn {lsn}"
                )
            n_before = len(repo)
            if rec.entries:
                try:
                    repo = append_exact(repo, list(rec.entries), rec.vectors)
                except InvalidArgumentError as e:
                    journal.close()
                    raise JournalCorruptError(journal.path, f"record lsn {rec.lsn}: {e}") from None
            if any(u >= n_before for u in rec.uses):
                journal.close()
                raise JournalCorruptError(
                    journal.path, f"record lsn {rec.lsn}: usage row out of range"
                )
            uses = _extend_uses(uses, len(repo), rec.uses)
            lsn = rec.lsn
            applied += 1
        if len(uses) != len(repo):  # pragma: no cover - defensive
            uses = _extend_uses(uses, len(repo), ())
        journal.records = ()  # free the replayed records
        store = cls(root, journal, snap, repo, uses, lsn)
        store.replayed = applied
        return store

    def log(self, entries: Sequence[Entry], vectors: np.ndarray, uses: Sequence[int] = ()) -> int:
        """Append a batch to the journal (durable per the fsync policy); return its lsn.
        Log the rows *as stored* in the repository (e.g. ``repo.vectors[-k:]`` after
        ``update``): replay appends entries and rows in order, bit-exactly
        (:func:`~intercascade_core.core.repository.append_exact`)."""
        if not entries and not uses:
            return self.lsn
        vec = np.asarray(vectors, dtype=np.float32).reshape(len(entries), self.dim)
        self.journal.append(self.lsn + 1, entries, vec, uses)
        self.lsn += 1
        return self.lsn

    def checkpoint(self, repository: Repository, uses: npt.ArrayLike | None = None) -> None:
        """Write ``repository`` (the caller's current version, which must include every
        logged batch — or be a pruned replacement of it) as a new snapshot, point
        ``CURRENT`` at it, reset the journal and delete the old snapshot."""
        name = f"snap-{self.lsn:012d}"
        target = self.path / name
        if target.exists():  # same lsn as the live snapshot (e.g. a prune): fresh name
            name = f"snap-{self.lsn:012d}-{uuid.uuid4().hex[:8]}"
            target = self.path / name
        save(target, repository, model_id=self.model_id, uses=uses, lsn=self.lsn)
        old = self.snapshot_path
        atomic_write_bytes(self.path / CURRENT, (name + "\n").encode())
        self.journal.reset()
        self.snapshot_path = target
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
            fsync_dir(self.path)

    def close(self) -> None:
        self.journal.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
