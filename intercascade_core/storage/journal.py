"""Online durability: an append-only journal of added entries, replayed on open.

File format (``journal.log``)::

    header  = b"ICJRNL01" | u32 len | u32 crc32(body) | body (JSON: dim, embedding_model)
    record  = u32 len | u32 crc32(payload) | payload
    payload = u32 json_len | JSON {lsn, entries, uses} | float32 vectors (n x dim, little endian)

Every record has a log sequence number (``lsn``), consecutive from 1. A snapshot written
by :func:`~intercascade_core.storage.store.save` records the ``lsn`` it includes; replay applies
only the records after it, so a crash between writing a snapshot and resetting the journal
never applies a record twice.

Torn tail or damage. A crash mid-append leaves a *prefix* of the last record: its frame
announces more bytes than the file holds. That, and only that, is a torn write: the
record was never acknowledged, so it is dropped with a :class:`TornJournalWarning` and
the file is truncated to the last good record before new appends. A *complete* frame
whose checksum does not match is damage to an acknowledged record and is
:class:`JournalCorruptError`, last record or not; so is an incomplete frame that cannot
be a prefix of one write (the rest of the file is a whole record whose length field was
damaged, a valid frame follows it, or its metadata implies another length), and a gap in
the lsn sequence or a wrong header. Damage that destroys a last record's length field,
checksum and metadata together is indistinguishable from a torn write.

fsync policy (``fsync=``):

* ``"always"`` (default) — every :meth:`Journal.append` is written and ``fsync``-ed before
  it returns: an acknowledged record survives a SIGKILL *and* a power loss.
* ``"never"`` — written with one ``write`` (to the OS page cache) but not fsynced: an
  acknowledged record survives a SIGKILL of the process (the kernel still holds it) but
  not a power loss or kernel crash. About 10-100x cheaper per append on real disks.

Either way a record is one ``os.write`` of a fully framed buffer, so a reader never sees
a record that is both complete and wrong.

One writer per directory: :meth:`DurableStore.open` takes an exclusive ``flock`` on
``<dir>/LOCK`` (it records the holder's pid and host) and holds it until
:meth:`~DurableStore.close`; a second writer, in this process or another, gets
:class:`~intercascade_core.errors.StoreLockedError` naming the holder. The kernel drops
the lock when the holder dies, so a crash never leaves a stale lock. Readers open with
``readonly=True`` beside the writer: they take no lock, write nothing and see the last
checkpoint plus the journal records acknowledged before they opened. Several processes
that all write share strategies through the PostgreSQL store
(:mod:`~intercascade_core.storage.pgvector`), not through one directory. ``flock`` is
advisory and local: a directory on a network file system that does not support it is
refused (:class:`~intercascade_core.errors.StoreError`) or, on some, not protected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
import struct
import time
import uuid
import warnings
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt

from ..core import untrusted_json
from ..core.repository import (
    Entry,
    Repository,
    append_exact,
    check_entries,
    empty_repository,
    unit_rows,
)
from ..errors import (
    CorruptStoreError,
    IncompatibleStoreError,
    InvalidArgumentError,
    JournalCorruptError,
    MalformedJSONError,
    StoreError,
    StoreLockedError,
)
from .store import (
    StoredRepository,
    Verify,
    _entry_line,
    atomic_write_bytes,
    embedding_model_mismatch,
    entry_from_json,
    fsync_dir,
    open_regular,
    open_repository,
    read_regular,
    save,
)

log = logging.getLogger(__name__)

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
#: a journal header body is two small fields
_MAX_HEADER_BODY = 1 << 16
#: a record's metadata: {entries: [{...}]}
_META_DEPTH = 3

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


def _meta(payload: bytes, path: Path, where: str) -> tuple[Any, int]:
    """The parsed metadata of a payload (or its prefix) and its JSON length."""
    if len(payload) < 4:
        raise JournalCorruptError(path, f"{where}: record too short")
    (jl,) = _U32.unpack_from(payload)
    if jl > len(payload) - 4:
        raise JournalCorruptError(path, f"{where}: metadata length exceeds the record")
    try:
        meta = untrusted_json.loads(
            payload[4 : 4 + jl], max_bytes=max(jl, 1), max_depth=_META_DEPTH
        )
    except MalformedJSONError as e:
        raise JournalCorruptError(path, f"{where}: metadata is not valid JSON ({e})") from None
    return meta, jl


def _decode(payload: bytes, dim: int, path: Path, where: str) -> JournalRecord:
    def bad(msg: str) -> JournalCorruptError:
        return JournalCorruptError(path, f"{where}: {msg}")

    meta, jl = _meta(payload, path, where)
    if not isinstance(meta, dict) or set(meta) != {"lsn", "entries", "uses"}:
        raise bad("metadata must be an object with lsn, entries, uses")
    lsn, ents, uses = meta["lsn"], meta["entries"], meta["uses"]
    if not isinstance(lsn, int) or isinstance(lsn, bool) or lsn < 1:
        raise bad(f"bad lsn {lsn!r:.40}")
    if not isinstance(ents, list) or not isinstance(uses, list):
        raise bad("entries and uses must be lists")
    if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uses):
        raise bad("uses must be row indices >= 0")
    entries = []
    for j, obj in enumerate(ents):
        try:
            entry, _ = entry_from_json(obj, path, f"entry {j}")
        except CorruptStoreError as err:
            raise bad(str(err).removeprefix(f"{path}: ")) from None
        entries.append(entry)
    vec = payload[4 + jl :]
    if len(vec) != len(entries) * dim * 4:
        raise bad(f"{len(vec)} vector bytes for {len(entries)} entries of dim {dim}")
    arr = np.frombuffer(vec, dtype="<f4").astype(np.float32).reshape(len(entries), dim)
    arr.flags.writeable = False
    return JournalRecord(lsn, tuple(entries), arr, tuple(uses))


def _pread_exact(fd: int, n: int, pos: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        chunk = os.pread(fd, min(n, 1 << 24), pos)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
        pos += len(chunk)
    return b"".join(parts)


def read_journal(path: str | os.PathLike[str]) -> JournalScan:
    """Parse a journal file (see the module docstring for the torn-tail rule). Does not
    warn or modify the file; :class:`Journal` does both. Reads record by record (a
    hostile size costs nothing before the first bad frame); a file that is not a
    regular file, or a symlink, is :class:`JournalCorruptError`."""
    p = Path(path)
    try:
        fd, st = open_regular(p)
    except JournalCorruptError:
        raise
    except CorruptStoreError as e:
        raise JournalCorruptError(p, str(e).removeprefix(f"{p}: ")) from None
    try:
        return _scan(fd, st.st_size, p)
    finally:
        os.close(fd)


def _scan(fd: int, size: int, p: Path) -> JournalScan:
    hdr_len = len(MAGIC) + _FRAME.size
    head = _pread_exact(fd, hdr_len, 0)
    if len(head) < hdr_len or head[: len(MAGIC)] != MAGIC:
        raise JournalCorruptError(p, "bad header (not an intercascade journal)")
    blen, bcrc = _FRAME.unpack_from(head, len(MAGIC))
    if blen > _MAX_HEADER_BODY:
        raise JournalCorruptError(p, f"bad header (body of {blen} bytes)")
    body = _pread_exact(fd, blen, hdr_len)
    if len(body) != blen or zlib.crc32(body) != bcrc:
        raise JournalCorruptError(p, "header checksum mismatch")
    try:
        h = untrusted_json.loads(body, max_bytes=_MAX_HEADER_BODY, max_depth=1)
        dim, model_id = h["dim"], h["embedding_model"]
        if (
            not isinstance(dim, int)
            or isinstance(dim, bool)
            or dim < 1
            or not isinstance(model_id, str)
        ):
            raise ValueError("bad fields")
    except (ValueError, KeyError, TypeError) as e:
        raise JournalCorruptError(p, f"bad header body ({e})") from None
    pos = hdr_len + blen
    records: list[JournalRecord] = []
    torn = False
    while pos < size:
        where = f"record {len(records) + 1} at byte {pos}"
        frame = _pread_exact(fd, _FRAME.size, pos)
        if len(frame) < _FRAME.size:
            torn = True  # not even a whole frame header: a write cut short
            break
        length, crc = _FRAME.unpack(frame)
        end = pos + _FRAME.size + length
        if length > MAX_RECORD_BYTES or end > size:
            prev = records[-1].lsn if records else None
            _judge_incomplete(fd, p, where, pos, size, length, crc, prev, dim)
            torn = True
            break
        payload = _pread_exact(fd, length, pos + _FRAME.size)
        if len(payload) < length:  # the file shrank while being read
            torn = True
            break
        if zlib.crc32(payload) != crc:
            raise JournalCorruptError(
                p,
                f"{where}: checksum mismatch on a complete record (damage, not a torn "
                f"write; the records from byte {pos} on cannot be trusted)",
            )
        rec = _decode(payload, dim, p, where)
        if records and rec.lsn != records[-1].lsn + 1:
            raise JournalCorruptError(
                p, f"record at byte {pos}: lsn {rec.lsn} does not follow {records[-1].lsn}"
            )
        records.append(rec)
        pos = end
    return JournalScan(tuple(records), dim, model_id, pos, torn)


def _judge_incomplete(
    fd: int,
    p: Path,
    where: str,
    pos: int,
    size: int,
    length: int,
    crc: int,
    prev_lsn: int | None,
    dim: int,
) -> None:
    """A frame that announces more bytes than the file holds is a torn write only if
    the rest of the file can be a prefix of that one record; raise otherwise."""
    rest = size - pos - _FRAME.size
    if rest > MAX_RECORD_BYTES:
        raise JournalCorruptError(
            p, f"{where}: bad length {length} with more data after it than one record holds"
        )
    tail = _pread_exact(fd, rest, pos + _FRAME.size)
    if zlib.crc32(tail) == crc:
        raise JournalCorruptError(
            p,
            f"{where}: the length field is damaged (the rest of the file is the whole "
            f"record, {rest} bytes, and matches its checksum)",
        )
    if _complete_frame_after(tail):
        raise JournalCorruptError(p, f"{where}: bad length {length} followed by more records")
    # a prefix that holds the whole metadata must agree with the announced length
    try:
        meta, jl = _meta(tail, p, where)
    except JournalCorruptError:
        return  # too short to judge (or garbage a power loss left): a torn write
    if 4 + jl > length:
        raise JournalCorruptError(p, f"{where}: metadata of {jl} bytes in a record of {length}")
    if isinstance(meta, dict) and isinstance(meta.get("entries"), list):
        implied = 4 + jl + len(meta["entries"]) * dim * 4
        lsn = meta.get("lsn")
        if implied != length or (prev_lsn is not None and lsn != prev_lsn + 1):
            raise JournalCorruptError(
                p,
                f"{where}: its metadata implies {implied} bytes (lsn {lsn!r:.20}), the "
                f"frame announces {length}: damage, not a torn write",
            )


def _complete_frame_after(data: bytes) -> bool:
    """Whether a complete frame with a matching checksum starts anywhere in ``data``
    (the rest of the file after a suspect frame's header).

    Run only when a torn tail is suspected (at open). Random bytes rarely decode to a
    length that fits the rest of the file, so few offsets cost a checksum.
    """
    last = len(data) - _FRAME.size
    for off in range(last + 1):
        length, crc = _FRAME.unpack_from(data, off)
        end = off + _FRAME.size + length
        if 4 <= length <= MAX_RECORD_BYTES and end <= len(data):
            if zlib.crc32(data[off + _FRAME.size : end]) == crc:
                return True
    return False


def _check_header(path: Path, scan: JournalScan, dim: int, model_id: str) -> JournalScan:
    """``scan`` if its journal was written for this embedder and dimension, else
    :class:`IncompatibleStoreError` (naming, for a packaged MiniLM, the precision that opens it)."""
    if scan.model_id != model_id:
        raise IncompatibleStoreError(path, embedding_model_mismatch(scan.model_id, model_id))
    if scan.dim != dim:
        raise IncompatibleStoreError(
            path, f"journal is for ({scan.model_id!r}, dim {scan.dim}), expected ({model_id!r}, dim {dim})"
        )
    return scan


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
        if not os.path.lexists(self.path):
            atomic_write_bytes(self.path, _header(dim, model_id))
        scan = _check_header(self.path, read_journal(self.path), dim, model_id)
        if scan.torn:
            warnings.warn(
                f"{self.path}: dropped a torn last record (incomplete write at byte "
                f"{scan.valid_end}); the journal is truncated to its last complete record",
                TornJournalWarning,
                stacklevel=2,
            )
        self.records = scan.records
        self._broken: str | None = None
        self._fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
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
            raise JournalCorruptError(
                self.path, f"an earlier append failed and could not be undone: {self._broken}"
            )
        buf = _encode(lsn, entries, vectors, uses)
        if len(buf) - _FRAME.size > MAX_RECORD_BYTES:
            raise InvalidArgumentError(
                "entries",
                f"one journal record would take {len(buf)} bytes, more than "
                f"MAX_RECORD_BYTES={MAX_RECORD_BYTES}; log the batch in smaller parts",
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
        # the new file first, then the swap: a failed write leaves the old journal open and
        # usable, never a closed (and possibly reused) descriptor number in self._fd
        atomic_write_bytes(self.path, _header(self.dim, self.model_id))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            self.close()  # the old file is replaced: appending to it would lose records
            raise
        old, self._fd = self._fd, fd
        os.close(old)
        self.records = ()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ----------------------------------------------------------------------------- durable store
CURRENT = "CURRENT"
JOURNAL = "journal.log"
LOCK = "LOCK"
_SNAPSHOT = re.compile(r"snap-([0-9]{12})(?:-[0-9a-f]{8})?")
#: a reader retries this often when a writer checkpoints while it opens
READ_RACES = 5
_MAX_LOCK_INFO = 4096


def _extend_uses(uses: np.ndarray, n: int, rows: Sequence[int]) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    out[: len(uses)] = uses
    if len(rows):
        np.add.at(out, np.asarray(rows, dtype=np.int64), 1)
    out.flags.writeable = False
    return out


class _DirLock:
    """The exclusive ``flock`` on ``<dir>/LOCK`` that makes a process the directory's
    one writer. The holder records its pid and host in the file and clears them when it
    lets go. Released by :meth:`release`, by garbage collection, or by the kernel when
    the process dies (then its record stays behind, and a reader that finds a dead pid
    on this host waits for the next holder's record)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._release = weakref.finalize(self, _unlock, fd)

    @classmethod
    def acquire(cls, root: Path) -> _DirLock:
        path = root / LOCK
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CorruptStoreError(
                    path, "is a symbolic link; store files must be regular files"
                ) from None
            if e.errno in (errno.EISDIR, errno.ENXIO):
                raise CorruptStoreError(path, f"not a regular file ({e.strerror})") from None
            raise StoreError(path, f"cannot open the lock file ({e.strerror or e})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CorruptStoreError(
                    path, "not a regular file; store files must be regular files"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, host = _holder(fd)
                who = (
                    f"pid {pid} on host {host}"
                    if pid is not None
                    else "another process (its pid and host are not recorded)"
                )
                raise StoreLockedError(
                    path,
                    f"the store is locked for writing by {who}: one writer per directory; "
                    "open it with readonly=True to read beside the writer",
                    pid=pid,
                    host=host,
                ) from None
            except OSError as e:  # ENOLCK: a file system without flock support
                raise StoreError(path, f"cannot lock ({e.strerror or e})") from None
            info = json.dumps(
                {"host": socket.gethostname(), "pid": os.getpid()}, sort_keys=True
            ).encode("utf-8")
            os.ftruncate(fd, 0)  # a crashed holder's record, if any
            os.pwrite(fd, info, 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        self._release()


def _unlock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # no stale record for the next reader of the file
    finally:
        os.close(fd)


#: how long a refused writer waits for the holder's record (written just after its flock)
_HOLDER_WAIT_S = 0.5


def _holder(fd: int) -> tuple[int | None, str | None]:
    """The pid and host the lock holder recorded. The record is written just after the
    flock and a crashed holder's stays behind, so an empty record, or one naming a dead
    pid on this host, is re-read for a moment; (None, None) if none turns up."""
    me = socket.gethostname()
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        try:
            raw = os.pread(fd, _MAX_LOCK_INFO, 0)
            info = untrusted_json.loads(raw, max_bytes=_MAX_LOCK_INFO, max_depth=1)
        except (OSError, MalformedJSONError):
            info = None
        if isinstance(info, dict):
            pid, host = info.get("pid"), info.get("host")
            if isinstance(pid, int) and not isinstance(pid, bool) and isinstance(host, str):
                if host != me or _alive(pid):
                    return pid, host[:255]
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists (another user's), or cannot be asked: take the record
    return True


def _current(root: Path) -> str:
    """The snapshot name in ``CURRENT`` (a bounded read of a regular file)."""
    cur = root / CURRENT
    raw = read_regular(cur, 256)
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = ""
    if _SNAPSHOT.fullmatch(name) is None:
        raise CorruptStoreError(cur, f"does not name a snapshot directory: {raw[:80]!r}")
    snap = root / name
    try:
        st = os.lstat(snap)
    except FileNotFoundError:
        raise CorruptStoreError(cur, f"names {name}, which does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CorruptStoreError(
            snap, "is not a directory (a snapshot is a real directory, not a link)"
        )
    return name


def _open_snapshot(
    root: Path, name: str, dim: int, model_id: str, verify: Verify
) -> StoredRepository:
    snap = open_repository(root / name, model_id=model_id, dim=dim, verify=verify)
    m = _SNAPSHOT.fullmatch(name)
    assert m is not None
    if int(m.group(1)) != snap.manifest.lsn:
        raise CorruptStoreError(
            root / name, f"the manifest's lsn {snap.manifest.lsn} disagrees with the directory name"
        )
    return snap


def _replay(
    records: Sequence[JournalRecord], repo: Repository, uses: np.ndarray, lsn: int, path: Path
) -> tuple[Repository, np.ndarray, int, int]:
    """Apply the records after ``lsn`` (they must follow it without a gap)."""
    applied = 0
    for rec in records:
        if rec.lsn <= lsn:
            continue
        if rec.lsn != lsn + 1:
            raise JournalCorruptError(
                path, f"record lsn {rec.lsn} does not follow the snapshot's lsn {lsn}"
            )
        n_before = len(repo)
        if rec.entries:
            try:
                repo = append_exact(repo, list(rec.entries), rec.vectors)
            except InvalidArgumentError as e:
                raise JournalCorruptError(path, f"record lsn {rec.lsn}: {e}") from None
        if any(u >= n_before for u in rec.uses):
            raise JournalCorruptError(path, f"record lsn {rec.lsn}: usage row out of range")
        uses = _extend_uses(uses, len(repo), rec.uses)
        lsn = rec.lsn
        applied += 1
    if len(uses) != len(repo):  # pragma: no cover - defensive
        uses = _extend_uses(uses, len(repo), ())
    return repo, uses, lsn, applied


class DurableStore:
    """A repository directory that survives crashes: a snapshot plus a journal.

    Layout::

        <dir>/CURRENT            name of the live snapshot (replaced atomically)
        <dir>/snap-<lsn>/        a version saved by store.save (manifest lsn = <lsn>)
        <dir>/journal.log        records after the snapshot
        <dir>/LOCK               flock'ed by the one writer; holds its pid and host

    :meth:`open` recovers: opens the snapshot named by ``CURRENT``, replays the journal
    records with ``lsn`` greater than the snapshot's, and drops a torn last record with a
    warning. The recovered repository and usage counters are :attr:`repository` and
    :attr:`uses`. The store does not hold the live repository afterwards: the caller
    threads its repository value and calls :meth:`log` for each batch it adds (before it
    publishes the new version) and :meth:`checkpoint` to write a new snapshot, which
    also persists the int8 scan copy and an hnsw index (see :mod:`.store`).

    One writer per directory, any number of read-only opens beside it (see the module
    docstring).
    """

    def __init__(
        self,
        path: Path,
        journal: Journal | None,
        snapshot: StoredRepository,
        repository: Repository,
        uses: np.ndarray,
        lsn: int,
        lock: _DirLock | None = None,
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
        self.readonly = journal is None
        self._lock = lock

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        dim: int,
        model_id: str,
        fsync: Fsync = "always",
        verify: Verify = "full",
        readonly: bool = False,
    ) -> DurableStore:
        """Open (or create, when the directory has no ``CURRENT``) a durable store for
        writing, holding its lock until :meth:`close`; a second writer gets
        :class:`~intercascade_core.errors.StoreLockedError`.

        ``readonly=True`` opens beside a writer instead: no lock, nothing created,
        written, truncated or removed; the result is the last checkpoint plus the
        journal records complete when it was read (a torn tail is left out silently: a
        live writer may be mid-append). A checkpoint that lands while it reads is
        noticed (``CURRENT`` re-read) and the read retried, up to :data:`READ_RACES`
        times. :meth:`log` and :meth:`checkpoint` then raise :class:`StoreError`.
        """
        root = Path(path)
        if readonly:
            return cls._open_readonly(root, dim, model_id, verify)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StoreError(root, "exists and is not a directory") from None
        except OSError as e:
            raise StoreError(
                root, f"cannot create the store directory ({e.strerror or e})"
            ) from None
        if not root.is_dir():
            raise StoreError(root, "not a directory")
        lock = _DirLock.acquire(root)
        try:
            return cls._recover(root, dim, model_id, fsync, verify, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _recover(
        cls, root: Path, dim: int, model_id: str, fsync: Fsync, verify: Verify, lock: _DirLock
    ) -> DurableStore:
        cur = root / CURRENT
        jpath = root / JOURNAL
        if not os.path.lexists(cur):
            if os.path.lexists(jpath):
                raise CorruptStoreError(cur, f"missing while {JOURNAL} exists")
            if os.path.lexists(root / "manifest.json"):  # never start empty beside old strategies
                raise IncompatibleStoreError(
                    root, "holds a saved repository (manifest.json), not a durable store; "
                    "move it aside or open it with storage.store.open_repository"
                )
            name = "snap-000000000000"
            if not os.path.lexists(root / name):
                save(root / name, empty_repository(dim), model_id=model_id, lsn=0)
            atomic_write_bytes(cur, (name + "\n").encode())
        name = _current(root)
        snap = _open_snapshot(root, name, dim, model_id, verify)
        if not os.path.lexists(jpath) and snap.manifest.lsn > 0:
            # every checkpoint replaces the journal atomically: it is never absent
            raise JournalCorruptError(
                jpath,
                f"missing, while the snapshot is at lsn {snap.manifest.lsn}: records "
                "acknowledged after it would be lost",
            )
        for stray in root.iterdir():  # leftovers of a checkpoint interrupted by a crash
            if (
                stray.is_dir()
                and not stray.is_symlink()
                and stray.name != name
                and (stray.name.startswith("snap-") or stray.name.startswith(".snap-"))
            ):
                shutil.rmtree(stray, ignore_errors=True)
        journal = Journal(jpath, dim=dim, model_id=model_id, fsync=fsync)
        try:
            repo, uses, lsn, applied = _replay(
                journal.records, snap.repository, np.asarray(snap.uses), snap.manifest.lsn, jpath
            )
        except BaseException:
            journal.close()
            raise
        journal.records = ()  # free the replayed records
        store = cls(root, journal, snap, repo, uses, lsn, lock)
        store.replayed = applied
        return store

    @classmethod
    def _open_readonly(cls, root: Path, dim: int, model_id: str, verify: Verify) -> DurableStore:
        if not root.is_dir():
            raise StoreError(root, "not a directory (no durable store here)")
        if not os.path.lexists(root / CURRENT):
            raise StoreError(root / CURRENT, "missing: not a durable store (nothing to read)")
        jpath = root / JOURNAL
        for attempt in range(READ_RACES):
            name = _current(root)
            try:
                snap = _open_snapshot(root, name, dim, model_id, verify)
                lsn = snap.manifest.lsn
                records: Sequence[JournalRecord] = ()
                if os.path.lexists(jpath):
                    records = _check_header(jpath, read_journal(jpath), dim, model_id).records
                elif lsn > 0:
                    raise JournalCorruptError(jpath, f"missing, while the snapshot is at lsn {lsn}")
                repo, uses, lsn, applied = _replay(
                    records, snap.repository, np.asarray(snap.uses), lsn, jpath
                )
            except StoreError:
                if attempt + 1 < READ_RACES and _current_or_none(root) != name:
                    continue  # a checkpoint replaced what we were reading
                raise
            if _current_or_none(root) != name:
                continue  # the journal read may belong to a newer snapshot
            store = cls(root, None, snap, repo, uses, lsn)
            store.replayed = applied
            return store
        raise StoreError(
            root,
            f"a writer checkpointed {READ_RACES} times while this read-only open read the "
            "store; retry, or checkpoint less often",
        )

    def _writable(self) -> Journal:
        if self.journal is None:
            raise StoreError(
                self.path, "opened read-only (readonly=True): it cannot log or checkpoint"
            )
        if self._lock is None:
            raise StoreError(self.path, "closed")
        return self.journal

    def log(self, entries: Sequence[Entry], vectors: np.ndarray, uses: Sequence[int] = ()) -> int:
        """Append a batch to the journal (durable per the fsync policy); return its lsn.
        Log the rows *as stored* in the repository (e.g. ``repo.vectors[-k:]`` after
        ``update``): replay appends entries and rows in order, bit-exactly
        (:func:`~intercascade_core.core.repository.append_exact`)."""
        journal = self._writable()
        if not entries and not uses:
            return self.lsn
        # refuse here what replay would refuse later: an acknowledged record must reopen
        check_entries(entries)
        vec = unit_rows(
            np.asarray(vectors, dtype=np.float32), self.dim, count=len(entries), renormalise=False
        )
        journal.append(self.lsn + 1, entries, vec, uses)
        self.lsn += 1
        return self.lsn

    def checkpoint(
        self,
        repository: Repository,
        uses: npt.ArrayLike | None = None,
        *,
        scan_copy: bool | None = None,
    ) -> None:
        """Write ``repository`` (the caller's current version, which must include every
        logged batch — or be a pruned replacement of it) as a new snapshot, point
        ``CURRENT`` at it, reset the journal and delete the old snapshot.

        The snapshot carries the int8 scan copy (``scan_copy``: default from
        :data:`~intercascade_core.core.retrieve.INT8_MIN_ROWS` rows on; it is extended,
        not rebuilt, from the one mapped at open) and the arena's hnsw index if it has
        one, so the next open needs to rebuild neither."""
        journal = self._writable()
        name = f"snap-{self.lsn:012d}"
        target = self.path / name
        if os.path.lexists(target):  # same lsn as the live snapshot (e.g. a prune): fresh name
            name = f"snap-{self.lsn:012d}-{uuid.uuid4().hex[:8]}"
            target = self.path / name
        save(
            target, repository, model_id=self.model_id, uses=uses, lsn=self.lsn, scan_copy=scan_copy
        )
        old = self.snapshot_path
        atomic_write_bytes(self.path / CURRENT, (name + "\n").encode())
        journal.reset()
        self.snapshot_path = target
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
            fsync_dir(self.path)
        log.info("checkpoint %s: %d rows at lsn %d", target, len(repository), self.lsn)

    def close(self) -> None:
        """Close the journal and release the writer's lock (idempotent)."""
        if self.journal is not None:
            self.journal.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _current_or_none(root: Path) -> str | None:
    try:
        return _current(root)
    except StoreError:
        return None
