"""Save and open a repository version as a directory (no pickle anywhere).

Layout of a saved version (format version :data:`FORMAT_VERSION`)::

    <dir>/manifest.json        format, format_version, embedding_model, dim, count, lsn,
                               tenants (code -> name), per-file byte size and sha256
    <dir>/vectors.npy          float32 (count, dim), C order, unit-norm rows
    <dir>/tenants.npy          int32 (count,), the tenant code of each row
    <dir>/uses.npy             int64 (count,), usage counters (see below)
    <dir>/entries.jsonl        one JSON object per row: id, query, answer, strategy,
                               source_level, source_model, created_at, tenant, uses
    <dir>/entries.offsets.npy  int64 (count + 1,), byte offset of each line (last = size)

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

import hashlib
import json
import mmap
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from ..core.repository import Entry, Repository, from_arrays, unit_rows
from ..errors import (
    CorruptStoreError,
    IncompatibleStoreError,
    InvalidArgumentError,
    StoreError,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Manifest",
    "StoredRepository",
    "atomic_write_bytes",
    "fsync_dir",
    "open_repository",
    "save",
]

FORMAT = "intercascade-repository"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
VECTORS = "vectors.npy"
TENANTS = "tenants.npy"
USES = "uses.npy"
ENTRIES = "entries.jsonl"
OFFSETS = "entries.offsets.npy"
DATA_FILES = (VECTORS, TENANTS, USES, ENTRIES, OFFSETS)

#: largest manifest we read (a manifest is small; a huge one is hostile)
MAX_MANIFEST_BYTES = 64 << 20

Verify = Literal["full", "size"]


# ----------------------------------------------------------------------------- errors
# ----------------------------------------------------------------------------- fs helpers
def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- manifest
@dataclass(frozen=True, slots=True)
class Manifest:
    """The parsed ``manifest.json`` of a saved version."""

    embedding_model: str
    dim: int
    count: int
    lsn: int
    tenants: tuple[str, ...]
    files: Mapping[str, Mapping[str, Any]]
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "embedding_model": self.embedding_model,
            "dim": self.dim,
            "count": self.count,
            "lsn": self.lsn,
            "tenants": list(self.tenants),
            "files": {k: dict(v) for k, v in self.files.items()},
        }


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_manifest(path: Path) -> Manifest:
    mpath = path / MANIFEST
    try:
        size = mpath.stat().st_size
    except FileNotFoundError:
        raise CorruptStoreError(
            mpath, "missing (not a saved repository, or a partial copy)"
        ) from None
    if size > MAX_MANIFEST_BYTES:
        raise CorruptStoreError(mpath, f"implausibly large ({size} bytes)")
    raw = mpath.read_bytes()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptStoreError(mpath, f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CorruptStoreError(mpath, "not a JSON object")
    if obj.get("format") != FORMAT:
        raise CorruptStoreError(mpath, f"'format' must be {FORMAT!r}, got {obj.get('format')!r}")
    ver: Any = obj.get("format_version")
    if not _is_int(ver) or ver < 1:
        raise CorruptStoreError(mpath, f"'format_version' must be a positive int, got {ver!r}")
    if ver > FORMAT_VERSION:
        raise IncompatibleStoreError(
            mpath,
            f"format version {ver} was written by a newer intercascade; this one reads "
            f"versions up to {FORMAT_VERSION}",
        )
    model: Any = obj.get("embedding_model")
    dim: Any = obj.get("dim")
    count: Any = obj.get("count")
    lsn: Any = obj.get("lsn")
    tenants: Any = obj.get("tenants")
    files: Any = obj.get("files")
    if not isinstance(model, str):
        raise CorruptStoreError(mpath, f"'embedding_model' must be a string, got {model!r}")
    for name, v, lo in (("dim", dim, 1), ("count", count, 0), ("lsn", lsn, 0)):
        if not _is_int(v) or v < lo:
            raise CorruptStoreError(mpath, f"{name!r} must be an int >= {lo}, got {v!r}")
    if (
        not isinstance(tenants, list)
        or not all(isinstance(t, str) for t in tenants)
        or len(set(tenants)) != len(tenants)
    ):
        raise CorruptStoreError(mpath, "'tenants' must be a list of distinct strings")
    if not isinstance(files, dict) or set(files) != set(DATA_FILES):
        raise CorruptStoreError(mpath, f"'files' must describe exactly {sorted(DATA_FILES)}")
    for fname, meta in files.items():
        if (
            not isinstance(meta, dict)
            or not _is_int(meta.get("bytes"))
            or meta["bytes"] < 0
            or not isinstance(meta.get("sha256"), str)
            or len(meta["sha256"]) != 64
        ):
            raise CorruptStoreError(mpath, f"bad file record for {fname!r}: {meta!r}")
    return Manifest(model, dim, count, lsn, tuple(tenants), files, ver)


# ----------------------------------------------------------------------------- npy I/O
def _write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _npy_layout(path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> int:
    """Validate a ``.npy`` header (dtype, shape, C order, exact size); return the data
    offset. Raises :class:`CorruptStoreError` naming the file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                hshape, fortran, hdtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                hshape, fortran, hdtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise CorruptStoreError(path, f"unsupported .npy version {version}")
            offset = f.tell()
    except FileNotFoundError:
        raise CorruptStoreError(path, "missing") from None
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
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != want:
        raise CorruptStoreError(path, f"size {size} bytes, expected {want} (truncated or padded)")
    return offset


def _map_npy(path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of a validated ``.npy`` file (no copy)."""
    offset = _npy_layout(path, dtype, shape)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        arr = np.empty(shape, dtype=dtype)
        arr.flags.writeable = False
        return arr
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
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


def _entry_line(e: Entry, uses: int) -> bytes:
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


def _parse_line(raw: bytes, path: Path, row: int) -> tuple[Entry, int]:
    where = f"line {row + 1}"
    try:
        obj = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptStoreError(path, f"{where}: not valid JSON ({e})") from None
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


_FIELD_SET = frozenset(_ENTRY_FIELDS)


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
    per-line parser runs to name the first bad line."""
    n = len(offsets) - 1
    lines = data.split(b"\n")
    if lines[-1] != b"" or len(lines) != n + 1:
        raise CorruptStoreError(path, f"{len(lines) - 1} lines, expected {n} (bad line framing)")
    lens = np.fromiter((len(x) for x in lines[:-1]), dtype=np.int64, count=n) + 1
    if not np.array_equal(lens, np.diff(offsets)):
        raise CorruptStoreError(path, "line lengths disagree with entries.offsets.npy")
    try:
        objs = json.loads(b"[" + b",".join(lines[:-1]) + b"]")
        ok = isinstance(objs, list) and len(objs) == n
    except (UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        for j in range(n):  # locate the first bad line (raises)
            _parse_line(lines[j], path, j)
        raise CorruptStoreError(path, "lines do not form one JSON object each")
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
) -> Manifest:
    """Write ``repo`` (one version) to the directory ``path``; return its manifest.

    ``model_id`` names the embedding model (e.g. ``embedder.model_id``) and is checked on
    open. ``uses`` are the usage counters aligned with the rows (default zeros). ``lsn``
    is the journal position this version includes (see :mod:`.journal`). The target must
    not exist unless ``overwrite`` (see the module docstring for atomicity).
    """
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    if not isinstance(model_id, str):
        raise InvalidArgumentError("model_id", f"must be a str, got {type(model_id).__name__}")
    if not _is_int(lsn) or lsn < 0:
        raise InvalidArgumentError("lsn", f"must be an int >= 0, got {lsn!r}")
    n = len(repo)
    use = _check_uses(uses, n)
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
        _write_npy(tmp / VECTORS, np.asarray(repo.vectors, dtype=np.float32))
        _write_npy(tmp / TENANTS, codes)
        _write_npy(tmp / USES, use)
        offsets = np.zeros(n + 1, dtype=np.int64)
        with open(tmp / ENTRIES, "wb") as f:
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
        _write_npy(tmp / OFFSETS, offsets)
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256_file(tmp / name)}
            for name in DATA_FILES
        }
        manifest = Manifest(model_id, repo.dim, n, lsn, tuple(tenants), files)
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
) -> StoredRepository:
    """Open a version written by :func:`save`.

    ``model_id``/``dim``, when given, must match the manifest
    (:class:`IncompatibleStoreError` otherwise). ``verify`` is ``"full"`` (default:
    checksums and every line) or ``"size"`` (structure only, lazy entries); see the
    module docstring. Every problem raises a :class:`StoreError` subclass naming the
    file; nothing is returned half-loaded.
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
        raise IncompatibleStoreError(
            mpath, f"embedding model is {m.embedding_model!r}, expected {model_id!r}"
        )
    for name in DATA_FILES:
        fp = root / name
        try:
            size = fp.stat().st_size
        except FileNotFoundError:
            raise CorruptStoreError(fp, "missing") from None
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
    esize = epath.stat().st_size
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
        with open(epath, "rb") as f:
            emm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
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
    return StoredRepository(repo, uses, m, root)
