"""Save and open a repository version as a directory (no pickle anywhere).

Layout of a saved version (format version :data:`FORMAT_VERSION`)::

    <dir>/manifest.json        format, format_version, embedding_model, dim, count, lsn,
                               tenants (code -> name), per-file byte size and sha256,
                               derived (below), and sha256: the checksum of the manifest
    <dir>/vectors.npy          float32 (count, dim), C order, unit-norm rows
    <dir>/tenants.npy          int32 (count,), the tenant code of each row
    <dir>/uses.npy             int64 (count,), usage counters (see below)
    <dir>/entries.jsonl        one JSON object per row: id, query, answer, strategy,
                               source_level, source_model, created_at, tenant, uses
    <dir>/entries.offsets.npy  int64 (count + 1,), byte offset of each line (last = size)
    <dir>/scan.*.npy           optional: the int8 scan copy of the vectors (packed codes,
                               scales, error bounds; :func:`~intercascade_core.core.retrieve.int8_scan_copy`)
    <dir>/hnsw.bin             optional: the hnswlib index over the rows (:mod:`.hnsw`)

The manifest's own ``sha256`` covers its other fields (canonical JSON: sorted keys, no
spaces, ASCII), so a damaged or hand-edited manifest (say, its ``lsn``, which decides
which journal records a reopen replays) is :class:`CorruptStoreError`, never a silent
change. Version 1 manifests (no checksum) are still read.

Derived data (the scan copy, the hnsw index) is what a reopen would otherwise rebuild:
9-26 s for the int8 copy of 1M rows, minutes for an hnsw index. It is written with the
version (``save(scan_copy=..., hnsw=...)``), memory-mapped (scan copy) or loaded (index)
on open, and never trusted: a file that is missing, damaged (checksum with
``verify="full"``; the index always, as hnswlib trusts its input), or that does not
match the rows (row count, dimension, parameters, sampled rows re-derived and compared)
is dropped with a :class:`DerivedDataWarning` and rebuilt on first use.

Hostile files: every file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and must be a
regular file (``fstat``), small files are read with a size bound and JSON is parsed by
the bounded reader (:mod:`~intercascade_core.core.untrusted_json`). A symlink, FIFO,
device, directory or over-deep document is a :class:`CorruptStoreError` naming the path.

Opening (:func:`open_repository`) memory-maps ``vectors.npy`` read-only and builds a
:class:`~intercascade_core.core.repository.Repository` over the mapping: nothing is copied
until the first :func:`~intercascade_core.core.repository.update` of the opened version (which
copies the arena into memory once, as any capacity growth does).

``verify`` (default ``"full"``):

* ``"full"`` — sha256 of every file against the manifest, then every JSONL line parsed
  and cross-checked (ids, tenants, usage counters). Nothing is returned unless all of it
  is intact. Costs about one read of the files: ~1 s per GB on one core.
* ``"size"`` — file sizes, ``.npy`` headers, the line-offset index and the manifest only
  (O(1) in the repository's size; a 1M x 384 repository opens in milliseconds). Entries
  are parsed lazily on first access; a corrupted line then raises
  :class:`CorruptStoreError` at that access. Use it when the files are trusted (e.g. just
  written by this process) and open time matters.

Usage counters (for least-used eviction, :mod:`.prune`) are not part of the immutable
:class:`~intercascade_core.core.repository.Entry`: they are a separate int64 array aligned with
the rows, threaded by the caller and persisted here (``uses.npy``, mirrored in each JSONL
line's ``"uses"`` for readers of the JSONL).

Writes are atomic: a version is written into a fresh sibling directory (each file written,
flushed and fsynced, the directory fsynced) which is then renamed into place and the
parent directory fsynced. ``overwrite=True`` moves an existing target aside first (a crash
between the two renames leaves the old version in ``.<name>.old-*``, never a mix);
:class:`~intercascade_core.storage.journal.DurableStore` never overwrites (it writes new snapshot
directories and flips a pointer file atomically).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import shutil
import stat
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from ..core import untrusted_json
from ..core.repository import Entry, Repository, from_arrays, unit_rows
from ..core.retrieve import (
    INT8_MAX_DIM,
    INT8_MIN_ROWS,
    attach_int8_scan_copy,
    int8_scan_copy,
)
from ..errors import (
    CorruptStoreError,
    IncompatibleStoreError,
    InvalidArgumentError,
    MalformedJSONError,
    StoreError,
)
from . import hnsw as _hnsw

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DerivedDataWarning",
    "Manifest",
    "StoredRepository",
    "atomic_write_bytes",
    "embedding_model_mismatch",
    "fsync_dir",
    "open_repository",
    "save",
]

FORMAT = "intercascade-repository"
FORMAT_VERSION = 2  # 2: the manifest's own sha256, derived data

MANIFEST = "manifest.json"
VECTORS = "vectors.npy"
TENANTS = "tenants.npy"
USES = "uses.npy"
ENTRIES = "entries.jsonl"
OFFSETS = "entries.offsets.npy"
DATA_FILES = (VECTORS, TENANTS, USES, ENTRIES, OFFSETS)
SCAN_PACKED = "scan.packed.npy"
SCAN_SCALES = "scan.scales.npy"
SCAN_ERRS = "scan.errs.npy"
SCAN_FILES = (SCAN_PACKED, SCAN_SCALES, SCAN_ERRS)
HNSW_INDEX = "hnsw.bin"
#: layout of the persisted scan copy (retrieve's packing of 16 rows x 4 dimensions)
SCAN_LAYOUT = 1

#: largest manifest we read (a manifest is small; a huge one is hostile)
MAX_MANIFEST_BYTES = 64 << 20
#: nesting of a manifest: {derived: {hnsw: {files: {name: {...}}}}}
_MANIFEST_DEPTH = 8
#: an entry line is one flat object; a journal record's metadata nests entries in a list
_ENTRY_DEPTH = 1

Verify = Literal["full", "size"]


class DerivedDataWarning(UserWarning):
    """A persisted scan copy or hnsw index was missing, damaged or did not match its
    rows: it was dropped and is rebuilt on first use."""


# ----------------------------------------------------------------------------- fs helpers
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open a store file for reading: ``O_NOFOLLOW`` (a symlink is refused, not
    followed to a device), ``O_NONBLOCK`` (a FIFO cannot hang the open) and a regular
    file by ``fstat``. Returns the descriptor (the caller closes it) and its stat.
    Raises :class:`CorruptStoreError` naming the path (or :class:`StoreError` for an
    OS refusal such as a permission)."""
    p = os.fspath(path)
    try:
        fd = os.open(p, _OPEN_FLAGS)
    except FileNotFoundError:
        raise CorruptStoreError(p, "missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptStoreError(
                p, "is a symbolic link; store files must be regular files"
            ) from None
        if e.errno in (errno.ENXIO, errno.ENOTDIR):
            raise CorruptStoreError(p, f"not a regular file ({e.strerror})") from None
        raise StoreError(p, f"cannot open ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptStoreError(p, f"is {_kind(st.st_mode)}; store files must be regular files")
    return fd, st


def read_regular(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The whole of a small store file, opened by :func:`open_regular`; one larger
    than ``max_bytes`` is :class:`CorruptStoreError` (nothing is read)."""
    fd, st = open_regular(path)
    try:
        if st.st_size > max_bytes:
            raise CorruptStoreError(
                os.fspath(path), f"implausibly large ({st.st_size} bytes, at most {max_bytes})"
            )
        return _read_fd(fd, st.st_size)
    finally:
        os.close(fd)


def _read_fd(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from offset 0 (fewer if the file shrank meanwhile)."""
    parts: list[bytes] = []
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(size - pos, 1 << 24), pos)
        if not chunk:
            break
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts)


def _regular_size(path: Path) -> int:
    """The size of a store file that must be a regular file (not followed if a link)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CorruptStoreError(path, "missing") from None
    except OSError as e:
        raise StoreError(path, f"cannot stat ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CorruptStoreError(path, f"is {_kind(st.st_mode)}; store files must be regular files")
    return st.st_size


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, write,
    fsync, ``os.replace``, fsync of the directory. Readers see the old or the new file,
    never a mix; after return the new content survives a power loss."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def _sha256_file(path: Path) -> str:
    fd, st = open_regular(path)
    h = hashlib.sha256()
    try:
        pos = 0
        while pos < st.st_size:
            chunk = os.pread(fd, min(st.st_size - pos, 1 << 22), pos)
            if not chunk:
                break
            h.update(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256_file(path)}


# ----------------------------------------------------------------------------- manifest
@dataclass(frozen=True, slots=True)
class Manifest:
    """The parsed ``manifest.json`` of a saved version. ``derived`` describes the
    persisted derived data (``"int8"``, ``"hnsw"``): parameters and file records."""

    embedding_model: str
    dim: int
    count: int
    lsn: int
    tenants: tuple[str, ...]
    files: Mapping[str, Mapping[str, Any]]
    format_version: int = FORMAT_VERSION
    derived: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The manifest document, with its own ``sha256`` (see :func:`manifest_digest`)."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "format_version": self.format_version,
            "embedding_model": self.embedding_model,
            "dim": self.dim,
            "count": self.count,
            "lsn": self.lsn,
            "tenants": list(self.tenants),
            "files": {k: dict(v) for k, v in self.files.items()},
        }
        if self.format_version >= 2:
            doc["derived"] = _plain(self.derived)
            doc["sha256"] = manifest_digest(doc)
        return doc


def _plain(x: Any) -> Any:
    return {k: _plain(v) for k, v in x.items()} if isinstance(x, Mapping) else x


def manifest_digest(doc: Mapping[str, Any]) -> str:
    """sha256 of a manifest's fields other than ``sha256``, as canonical JSON (sorted
    keys, no spaces, ASCII): what the manifest's ``sha256`` field holds."""
    rest = {k: v for k, v in doc.items() if k != "sha256"}
    canon = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


_MANIFEST_KEYS = frozenset(
    ("format", "format_version", "embedding_model", "dim", "count", "lsn", "tenants", "files")
)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_file_record(meta: Any) -> bool:
    return (
        isinstance(meta, dict)
        and set(meta) == {"bytes", "sha256"}
        and _is_int(meta["bytes"])
        and meta["bytes"] >= 0
        and isinstance(meta["sha256"], str)
        and len(meta["sha256"]) == 64
    )


def _read_manifest(path: Path) -> Manifest:
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):
        raise CorruptStoreError(mpath, "missing (not a saved repository, or a partial copy)")
    raw = read_regular(mpath, MAX_MANIFEST_BYTES)
    try:
        obj = untrusted_json.loads(raw, max_bytes=MAX_MANIFEST_BYTES, max_depth=_MANIFEST_DEPTH)
    except MalformedJSONError as e:
        raise CorruptStoreError(mpath, f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CorruptStoreError(mpath, "not a JSON object")
    # the checksum first: whatever else a damaged manifest says is not to be believed
    digest: Any = obj.get("sha256")
    if digest is not None and digest != manifest_digest(obj):
        raise CorruptStoreError(
            mpath, "sha256 checksum mismatch (the manifest is damaged or was edited)"
        )
    if obj.get("format") != FORMAT:
        raise CorruptStoreError(
            mpath, f"'format' must be {FORMAT!r}, got {obj.get('format')!r:.80}"
        )
    ver: Any = obj.get("format_version")
    if not _is_int(ver) or ver < 1:
        raise CorruptStoreError(mpath, f"'format_version' must be a positive int, got {ver!r:.40}")
    if ver > FORMAT_VERSION:
        raise IncompatibleStoreError(
            mpath,
            f"format version {ver} was written by a newer intercascade; this one reads "
            f"versions up to {FORMAT_VERSION}",
        )
    # version 1 had no checksum and no derived data; from 2 on the checksum is required
    keys = _MANIFEST_KEYS | ({"derived", "sha256"} if ver >= 2 else set())
    if set(obj) != keys:
        raise CorruptStoreError(mpath, f"fields must be {sorted(keys)}, got {sorted(obj)!r:.200}")
    model: Any = obj.get("embedding_model")
    dim: Any = obj.get("dim")
    count: Any = obj.get("count")
    lsn: Any = obj.get("lsn")
    tenants: Any = obj.get("tenants")
    files: Any = obj.get("files")
    derived: Any = obj.get("derived", {})
    if not isinstance(model, str):
        raise CorruptStoreError(mpath, f"'embedding_model' must be a string, got {model!r:.80}")
    for name, v, lo in (("dim", dim, 1), ("count", count, 0), ("lsn", lsn, 0)):
        if not _is_int(v) or v < lo:
            raise CorruptStoreError(mpath, f"{name!r} must be an int >= {lo}, got {v!r:.40}")
    if (
        not isinstance(tenants, list)
        or not all(isinstance(t, str) for t in tenants)
        or len(set(tenants)) != len(tenants)
    ):
        raise CorruptStoreError(mpath, "'tenants' must be a list of distinct strings")
    if not isinstance(files, dict) or set(files) != set(DATA_FILES):
        raise CorruptStoreError(mpath, f"'files' must describe exactly {sorted(DATA_FILES)}")
    for fname, meta in files.items():
        if not _is_file_record(meta):
            raise CorruptStoreError(mpath, f"bad file record for {fname!r}: {meta!r:.200}")
    if not isinstance(derived, dict) or not all(isinstance(v, dict) for v in derived.values()):
        raise CorruptStoreError(mpath, "'derived' must be an object of objects")
    return Manifest(model, dim, count, lsn, tuple(tenants), files, ver, derived)


# ----------------------------------------------------------------------------- npy I/O
def _write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _npy_offset(f: Any, path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> int:
    """Validate a ``.npy`` header (dtype, shape, C order); return the data offset."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            hshape, fortran, hdtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            hshape, fortran, hdtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise CorruptStoreError(path, f"unsupported .npy version {version}")
        offset: int = f.tell()
    except CorruptStoreError:
        raise
    except Exception as e:  # numpy raises ValueError/SyntaxError/... on a bad header
        raise CorruptStoreError(path, f"bad .npy header: {type(e).__name__}: {e}") from None
    if hdtype != dtype or hdtype.hasobject:
        raise CorruptStoreError(path, f"dtype must be {dtype.str}, got {hdtype!r}")
    if tuple(hshape) != shape:
        raise CorruptStoreError(path, f"shape must be {shape}, got {hshape}")
    if fortran and len(shape) > 1 and min(shape) > 1:
        raise CorruptStoreError(path, "Fortran order is not supported")
    return offset


def _map_npy(path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of a ``.npy`` file whose header (dtype, shape, C order)
    and exact size are checked (no copy). Raises :class:`CorruptStoreError` naming it."""
    fd, st = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            offset = _npy_offset(f, path, dtype, shape)
        count = int(np.prod(shape, dtype=np.int64))
        want = offset + count * dtype.itemsize
        if st.st_size != want:
            raise CorruptStoreError(
                path, f"size {st.st_size} bytes, expected {want} (truncated or padded)"
            )
        if count == 0:
            arr = np.empty(shape, dtype=dtype)
            arr.flags.writeable = False
            return arr
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    # built on a read-only buffer: no view of it can be made writeable
    return np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)


# ----------------------------------------------------------------------------- entries
_ENTRY_FIELDS = (
    "id",
    "query",
    "answer",
    "strategy",
    "source_level",
    "source_model",
    "created_at",
    "tenant",
    "uses",
)


_INT64 = 1 << 63


def _entry_line(e: Entry, uses: int) -> bytes:
    """One JSONL line. Refuses what the bounded reader would refuse on the way back:
    a non-finite ``created_at`` (not JSON) and integers beyond int64."""
    if not math.isfinite(e.created_at):
        raise InvalidArgumentError("entries", f"created_at must be finite, got {e.created_at!r}")
    if not (-_INT64 <= e.id < _INT64 and -_INT64 <= e.source_level < _INT64):
        raise InvalidArgumentError("entries", "id and source_level must fit in 64 bits")
    obj = {
        "id": e.id,
        "query": e.query,
        "answer": e.answer,
        "strategy": e.strategy,
        "source_level": e.source_level,
        "source_model": e.source_model,
        "created_at": e.created_at,
        "tenant": e.tenant,
        "uses": uses,
    }
    # ensure_ascii: lone surrogates and any code point round-trip through pure ASCII
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


#: longest number literal in an entry line (int64: 20 characters; a float's repr: 24)
_ENTRY_NUMBER_CHARS = 32


def entry_from_json(obj: Any, path: str | os.PathLike[str], where: str) -> tuple[Entry, int]:
    """An entry and its usage counter from a parsed JSON object (a JSONL line, a journal
    record's entry), checked field by field; :class:`CorruptStoreError` otherwise."""
    if not isinstance(obj, dict) or set(obj) != set(_ENTRY_FIELDS):
        raise CorruptStoreError(
            path, f"{where}: expected an object with fields {list(_ENTRY_FIELDS)}"
        )
    for f in ("query", "answer", "strategy", "source_model", "tenant"):
        if not isinstance(obj[f], str):
            raise CorruptStoreError(path, f"{where}: {f!r} must be a string")
    for f in ("id", "source_level", "uses"):
        if not _is_int(obj[f]):
            raise CorruptStoreError(path, f"{where}: {f!r} must be an int")
    if obj["uses"] < 0:
        raise CorruptStoreError(path, f"{where}: 'uses' must be >= 0")
    ca = obj["created_at"]
    if isinstance(ca, bool) or not isinstance(ca, (int, float)):
        raise CorruptStoreError(path, f"{where}: 'created_at' must be a number")
    entry = Entry(
        query=obj["query"],
        answer=obj["answer"],
        strategy=obj["strategy"],
        source_level=obj["source_level"],
        source_model=obj["source_model"],
        created_at=float(ca),
        tenant=obj["tenant"],
        id=obj["id"],
    )
    return entry, obj["uses"]


def _parse_line(raw: bytes, path: Path, row: int) -> tuple[Entry, int]:
    where = f"line {row + 1}"
    if not raw.isascii():
        raise CorruptStoreError(path, f"{where}: not ASCII (lines are written ASCII-escaped)")
    try:
        obj = untrusted_json.loads(
            raw,
            max_bytes=max(len(raw), 1),
            max_depth=_ENTRY_DEPTH,
            max_number_chars=_ENTRY_NUMBER_CHARS,
        )
    except MalformedJSONError as e:
        raise CorruptStoreError(path, f"{where}: not valid JSON ({e})") from None
    return entry_from_json(obj, path, where)


_FIELD_SET = frozenset(_ENTRY_FIELDS)
_INF = float("inf")


def _parse_all(
    data: bytes,
    offsets: np.ndarray,
    path: Path,
    tenants: tuple[str, ...],
    codes: np.ndarray,
    uses: np.ndarray,
) -> list[Entry]:
    """Parse and cross-check every line (the ``verify="full"`` path): one C-level JSON
    parse of the whole file, then a tight validation loop. On any problem the slow
    per-line parser (the bounded reader) runs to name the first bad line.

    Why not the bounded reader for the bulk: it costs 3.5x the C parse (14 s more for
    1M lines). The fast path accepts only what it would: ASCII, one flat object per line
    (anything nested fails the type checks; nesting deep enough to exhaust the C
    parser's recursion guard raises RecursionError, caught), finite numbers, int64."""
    n = len(offsets) - 1
    lines = data.split(b"\n")
    if lines[-1] != b"" or len(lines) != n + 1:
        raise CorruptStoreError(path, f"{len(lines) - 1} lines, expected {n} (bad line framing)")
    lens = np.fromiter((len(x) for x in lines[:-1]), dtype=np.int64, count=n) + 1
    if not np.array_equal(lens, np.diff(offsets)):
        raise CorruptStoreError(path, "line lengths disagree with entries.offsets.npy")
    try:
        objs = json.loads(b"[" + b",".join(lines[:-1]) + b"]") if data.isascii() else None
        ok = isinstance(objs, list) and len(objs) == n
    except (UnicodeDecodeError, ValueError, RecursionError):
        objs, ok = None, False
    if not ok:
        for j in range(n):  # locate the first bad line (raises)
            _parse_line(lines[j], path, j)
        raise CorruptStoreError(path, "lines do not form one JSON object each")
    assert objs is not None
    use_list = uses.tolist()
    code_list = codes.tolist()
    out: list[Entry] = []
    append = out.append
    for j, o in enumerate(objs):
        if (
            type(o) is not dict
            or o.keys() != _FIELD_SET
            or type(o["query"]) is not str
            or type(o["answer"]) is not str
            or type(o["strategy"]) is not str
            or type(o["source_model"]) is not str
            or type(o["tenant"]) is not str
            or type(o["id"]) is not int
            or type(o["source_level"]) is not int
            or type(o["uses"]) is not int
            or type(o["created_at"]) not in (float, int)
            or not -_INF < o["created_at"] < _INF
            or not -_INT64 <= o["id"] < _INT64
            or not -_INT64 <= o["source_level"] < _INT64
        ):
            _parse_line(lines[j], path, j)  # names the problem
            raise CorruptStoreError(path, f"line {j + 1}: malformed entry")
        if o["tenant"] != tenants[code_list[j]]:
            raise CorruptStoreError(path, f"line {j + 1}: tenant disagrees with {TENANTS}")
        if o["uses"] != use_list[j]:
            raise CorruptStoreError(path, f"line {j + 1}: 'uses' disagrees with {USES}")
        append(
            Entry(
                o["query"],
                o["answer"],
                o["strategy"],
                o["source_level"],
                o["source_model"],
                float(o["created_at"]),
                o["tenant"],
                o["id"],
            )
        )
    return out


class _LazyEntries:
    """The arena's entry list for a version opened with ``verify="size"``: rows of the
    memory-mapped JSONL are parsed on first access (and cached); rows appended later
    are ordinary Python objects. Supports what the arena needs: len, index, slice,
    iteration and append."""

    __slots__ = ("_cache", "_extra", "_lock", "_mm", "_n", "_offsets", "_path")

    def __init__(self, mm: Any, offsets: np.ndarray, path: Path) -> None:
        self._mm = mm
        self._offsets = offsets
        self._n = len(offsets) - 1
        self._cache: list[Entry | None] = [None] * self._n
        self._path = path
        self._extra: list[Entry] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n + len(self._extra)

    def _get(self, j: int) -> Entry:
        if j >= self._n:
            return self._extra[j - self._n]
        e = self._cache[j]
        if e is None:
            a, b = int(self._offsets[j]), int(self._offsets[j + 1])
            e, _ = _parse_line(bytes(self._mm[a:b]), self._path, j)
            self._cache[j] = e
        return e

    @overload
    def __getitem__(self, i: int) -> Entry: ...
    @overload
    def __getitem__(self, i: slice) -> list[Entry]: ...
    def __getitem__(self, i: int | slice) -> Entry | list[Entry]:
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        j = int(i)
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError("entry index out of range")
        return self._get(j)

    def __iter__(self) -> Iterator[Entry]:
        for j in range(len(self)):
            yield self._get(j)

    def append(self, e: Entry) -> None:
        with self._lock:
            self._extra.append(e)

    def extend(self, items: Iterable[Entry]) -> None:
        with self._lock:
            self._extra.extend(items)


# ----------------------------------------------------------------------------- save
def _check_uses(uses: Any, n: int) -> np.ndarray:
    if uses is None:
        return np.zeros(n, dtype=np.int64)
    arr = np.asarray(uses)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise InvalidArgumentError(
            "uses", f"must be an integer array of shape ({n},), got {arr.dtype} {arr.shape}"
        )
    if n and arr.min() < 0:
        raise InvalidArgumentError("uses", "usage counters must be >= 0")
    return arr.astype(np.int64)


def save(
    path: str | os.PathLike[str],
    repo: Repository,
    *,
    model_id: str,
    uses: npt.ArrayLike | None = None,
    lsn: int = 0,
    overwrite: bool = False,
    scan_copy: bool | None = None,
    hnsw: bool | None = None,
) -> Manifest:
    """Write ``repo`` (one version) to the directory ``path``; return its manifest.

    ``model_id`` names the embedding model (e.g. ``embedder.model_id``) and is checked on
    open. ``uses`` are the usage counters aligned with the rows (default zeros). ``lsn``
    is the journal position this version includes (see :mod:`.journal`). The target must
    not exist unless ``overwrite`` (see the module docstring for atomicity).

    Derived data: ``scan_copy`` writes the int8 scan copy (built first if the arena has
    none; default: from :data:`~intercascade_core.core.retrieve.INT8_MIN_ROWS` rows on,
    where ``scan="auto"`` uses it); ``hnsw`` writes the arena's hnsw index (default:
    when it has one that holds no row newer than ``repo``).
    """
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    if not isinstance(model_id, str):
        raise InvalidArgumentError("model_id", f"must be a str, got {type(model_id).__name__}")
    if not _is_int(lsn) or lsn < 0:
        raise InvalidArgumentError("lsn", f"must be an int >= 0, got {lsn!r}")
    for name, flag in (("scan_copy", scan_copy), ("hnsw", hnsw)):
        if flag not in (None, True, False):
            raise InvalidArgumentError(name, f"must be None, True or False, got {flag!r}")
    n = len(repo)
    use = _check_uses(uses, n)
    if scan_copy is None:
        scan_copy = n >= INT8_MIN_ROWS and repo.dim <= INT8_MAX_DIM
    elif scan_copy and repo.dim > INT8_MAX_DIM:
        raise InvalidArgumentError("scan_copy", f"the int8 scan supports dim <= {INT8_MAX_DIM}")
    if hnsw is None:
        hnsw = _hnsw.has_index(repo) and _hnsw.index_stats(repo)["count"] <= n
    target = Path(path)
    if target.exists() and not overwrite:
        raise InvalidArgumentError("path", f"{target} exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        # tenant codes renumbered by first appearance in this version (what update()
        # would assign when the rows are replayed in order)
        codes = np.asarray(repo.tenant_codes, dtype=np.int32)
        names_by_code = repo.tenant_names
        tenants: list[str] = []
        if n:
            uniq, first = np.unique(codes, return_index=True)
            order = uniq[np.argsort(first, kind="stable")]
            remap = np.full(int(uniq.max()) + 1, -1, dtype=np.int32)
            remap[order] = np.arange(len(order), dtype=np.int32)
            codes = remap[codes]
            tenants = [names_by_code[int(c)] for c in order]
        offsets = np.zeros(n + 1, dtype=np.int64)
        with open(tmp / ENTRIES, "wb") as f:  # first: it refuses what cannot be read back
            pos = 0
            buf: list[bytes] = []
            for j, e in enumerate(repo.entries):
                line = _entry_line(e, int(use[j]))
                buf.append(line)
                pos += len(line)
                offsets[j + 1] = pos
                if len(buf) >= 8192:
                    f.write(b"".join(buf))
                    buf.clear()
            f.write(b"".join(buf))
            f.flush()
            os.fsync(f.fileno())
        _write_npy(tmp / VECTORS, np.asarray(repo.vectors, dtype=np.float32))
        _write_npy(tmp / TENANTS, codes)
        _write_npy(tmp / USES, use)
        _write_npy(tmp / OFFSETS, offsets)
        files = {name: _file_record(tmp / name) for name in DATA_FILES}
        derived: dict[str, dict[str, Any]] = {}
        if scan_copy and n:
            packed, scales, errs = int8_scan_copy(repo)
            _write_npy(tmp / SCAN_PACKED, packed)
            _write_npy(tmp / SCAN_SCALES, scales)
            _write_npy(tmp / SCAN_ERRS, errs)
            derived["int8"] = {
                "rows": n,
                "dim": repo.dim,
                "layout": SCAN_LAYOUT,
                "files": {name: _file_record(tmp / name) for name in SCAN_FILES},
            }
        if hnsw and n:
            meta: dict[str, Any] = dict(_hnsw.save_index(repo, tmp / HNSW_INDEX))
            meta["files"] = {HNSW_INDEX: _file_record(tmp / HNSW_INDEX)}
            derived["hnsw"] = meta
        manifest = Manifest(model_id, repo.dim, n, lsn, tuple(tenants), files, derived=derived)
        data = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode("utf-8") + b"\n"
        with open(tmp / MANIFEST, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if target.exists():
            aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, aside)
            os.rename(tmp, target)
            fsync_dir(target.parent)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, target)
            fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------- open
#: ``model_id`` prefixes of the two packaged MiniLM models (models.minilm; a test pins them to
#: the embedder's): a store written with one is opened with the other after the default moved
#: from int8 to fp32, so the error says which flag opens it.
_MINILM_HINTS = (
    ("all-MiniLM-L6-v2/onnx-sha256:8199be6f699a395f/", "int8"),
    ("all-MiniLM-L6-v2/fp32-", "fp32"),
)


def embedding_model_mismatch(found: str, expected: str) -> str:
    """The message for vectors of embedder ``found`` opened with embedder ``expected``:
    both ids, that the vectors cannot be mixed, and for a packaged MiniLM the flag to use."""
    msg = (
        f"embedding model is {found!r}, expected {expected!r}: its vectors were made by another "
        "embedder and cannot be searched with this one's; open it with the embedder that wrote it"
    )
    for prefix, precision in _MINILM_HINTS:
        # not when it is already that precision (another graph version or tokenizer)
        if found.startswith(prefix) and not expected.startswith(prefix):
            msg += (
                f" (MiniLMEmbedder(precision={precision!r}), precision = \"{precision}\" under "
                f"[embedder] in a config, or INTERCASCADE_MINILM_PRECISION={precision})"
            )
    return msg


@dataclass(frozen=True, slots=True, eq=False)
class StoredRepository:
    """An opened version: the repository, its usage counters (read-only int64, aligned
    with the rows), the manifest and the directory it came from."""

    repository: Repository
    uses: npt.NDArray[np.int64]
    manifest: Manifest
    path: Path


def open_repository(
    path: str | os.PathLike[str],
    *,
    model_id: str | None = None,
    dim: int | None = None,
    verify: Verify = "full",
    derived: bool = True,
) -> StoredRepository:
    """Open a version written by :func:`save`.

    ``model_id``/``dim``, when given, must match the manifest
    (:class:`IncompatibleStoreError` otherwise). ``verify`` is ``"full"`` (default:
    checksums and every line) or ``"size"`` (structure only, lazy entries); see the
    module docstring. Every problem raises a :class:`StoreError` subclass naming the
    file; nothing is returned half-loaded. ``derived`` (default) attaches the persisted
    scan copy and hnsw index, each only after its checks pass (otherwise a
    :class:`DerivedDataWarning` and a rebuild on first use).
    """
    if verify not in ("full", "size"):
        raise InvalidArgumentError("verify", f"must be 'full' or 'size', got {verify!r}")
    root = Path(path)
    if not root.is_dir():
        raise StoreError(root, "not a directory (no saved repository here)")
    m = _read_manifest(root)
    mpath = root / MANIFEST
    if dim is not None and m.dim != dim:
        raise IncompatibleStoreError(mpath, f"embedding dimension is {m.dim}, expected {dim}")
    if model_id is not None and m.embedding_model != model_id:
        raise IncompatibleStoreError(mpath, embedding_model_mismatch(m.embedding_model, model_id))
    for name in DATA_FILES:
        fp = root / name
        size = _regular_size(fp)
        if size != m.files[name]["bytes"]:
            raise CorruptStoreError(
                fp,
                f"size {size} bytes, the manifest says {m.files[name]['bytes']} (truncated or modified)",
            )
        if verify == "full":
            digest = _sha256_file(fp)
            if digest != m.files[name]["sha256"]:
                raise CorruptStoreError(
                    fp, "sha256 checksum mismatch (the file is corrupted or was modified)"
                )
    n, d = m.count, m.dim
    vectors = _map_npy(root / VECTORS, np.dtype("<f4"), (n, d))
    codes = _map_npy(root / TENANTS, np.dtype("<i4"), (n,))
    uses = _map_npy(root / USES, np.dtype("<i8"), (n,))
    offsets = _map_npy(root / OFFSETS, np.dtype("<i8"), (n + 1,))
    epath = root / ENTRIES
    esize = m.files[ENTRIES]["bytes"]
    if offsets[0] != 0 or offsets[-1] != esize or (n and np.any(np.diff(offsets) <= 0)):
        raise CorruptStoreError(
            root / OFFSETS, f"line offsets do not index {ENTRIES} ({esize} bytes)"
        )
    if n and (codes.min() < 0 or codes.max() >= len(m.tenants)):
        raise CorruptStoreError(root / TENANTS, f"tenant codes outside 0..{len(m.tenants) - 1}")
    if n and len(m.tenants) != int(codes.max()) + 1:
        raise CorruptStoreError(root / TENANTS, "manifest lists tenants that no row uses")
    if n and uses.min() < 0:
        raise CorruptStoreError(root / USES, "negative usage counter")

    entries: Any
    if n == 0:
        entries = []
    else:
        fd, st = open_regular(epath)
        try:
            if st.st_size != esize:
                raise CorruptStoreError(
                    epath, f"size {st.st_size} bytes, the manifest says {esize}"
                )
            emm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        if verify == "full":
            entries = _parse_all(bytes(emm), offsets, epath, m.tenants, codes, uses)
            try:  # update()'s own check, without the renormalising copy
                unit_rows(vectors, d, count=n, argument="rows", renormalise=False)
            except InvalidArgumentError as e:
                raise CorruptStoreError(root / VECTORS, str(e)) from None
            emm.close()
        else:
            entries = _LazyEntries(emm, offsets, epath)

    # the memory maps are read-only: shared as they are, copied by the first update
    repo = from_arrays(vectors, codes, m.tenants, entries)
    if derived and n:
        _attach_derived(root, m, repo, verify)
    return StoredRepository(repo, uses, m, root)


def _drop(path: Path, why: str) -> None:
    warnings.warn(
        f"{path}: {why}; not used, rebuilt on first use", DerivedDataWarning, stacklevel=4
    )


def _derived_files(
    root: Path, record: Mapping[str, Any], names: tuple[str, ...], checksum: bool
) -> str | None:
    """Why the files of a derived record cannot be used, or None if they can."""
    files = record.get("files")
    if not isinstance(files, dict) or set(files) != set(names):
        return f"the manifest's record of {', '.join(names)} is malformed"
    for name in names:
        meta = files[name]
        if not _is_file_record(meta):
            return f"the manifest's record of {name} is malformed"
        try:
            size = _regular_size(root / name)
            if size != meta["bytes"]:
                return f"{name} has {size} bytes, the manifest says {meta['bytes']}"
            if checksum and _sha256_file(root / name) != meta["sha256"]:
                return f"{name}: sha256 checksum mismatch"
        except StoreError as e:
            return str(e)
    return None


def _attach_derived(root: Path, m: Manifest, repo: Repository, verify: Verify) -> None:
    """Attach the persisted scan copy and hnsw index when every check passes; warn and
    leave them to be rebuilt otherwise (see the module docstring)."""
    n, d = m.count, m.dim
    rec = m.derived.get("int8")
    if rec is not None:
        if (rec.get("rows"), rec.get("dim"), rec.get("layout")) != (n, d, SCAN_LAYOUT):
            _drop(
                root / SCAN_PACKED,
                f"scan copy record {dict(rec)!r:.120} does not match "
                f"{n} rows of dim {d}, layout {SCAN_LAYOUT}",
            )
        elif (why := _derived_files(root, rec, SCAN_FILES, verify == "full")) is not None:
            _drop(root / SCAN_PACKED, why)
        else:
            nb, d4 = -(-n // 16), -(-d // 4)
            try:
                packed = _map_npy(root / SCAN_PACKED, np.dtype("u1"), (nb, d4, 16, 4))
                scales = _map_npy(root / SCAN_SCALES, np.dtype("<f4"), (nb * 16,))
                errs = _map_npy(root / SCAN_ERRS, np.dtype("<f4"), (nb * 16,))
                attach_int8_scan_copy(repo, packed, scales, errs)
            except (StoreError, InvalidArgumentError) as e:
                _drop(root / SCAN_PACKED, str(e))
    rec = m.derived.get("hnsw")
    if rec is not None:
        params = _hnsw.DEFAULT_PARAMS
        if (rec.get("rows"), rec.get("dim")) != (n, d):
            _drop(
                root / HNSW_INDEX,
                f"index of {rec.get('rows')!r:.20} rows of dim "
                f"{rec.get('dim')!r:.20}, the repository has {n} of dim {d}",
            )
        elif (rec.get("M"), rec.get("ef_construction")) != (params.M, params.ef_construction):
            _drop(
                root / HNSW_INDEX,
                f"built with M={rec.get('M')!r:.20}, ef_construction="
                f"{rec.get('ef_construction')!r:.20}; search builds with M={params.M}, "
                f"ef_construction={params.ef_construction}",
            )
        # always checksummed: hnswlib trusts its file (a damaged one can crash the process)
        elif (why := _derived_files(root, rec, (HNSW_INDEX,), True)) is not None:
            _drop(root / HNSW_INDEX, why)
        else:
            try:
                _hnsw.load_index(repo, root / HNSW_INDEX, params, rows=n)
            except (InvalidArgumentError, OSError) as e:
                _drop(root / HNSW_INDEX, str(e))
