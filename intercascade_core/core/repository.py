"""The strategy repository: an immutable value of entries and unit-norm embeddings.

A :class:`Repository` is a *version*: a shared append-only arena plus a length.
:func:`update` returns a new version and never changes the one it was given:

* appending to the **newest** version of an arena writes the new rows past the old
  length, in place, and returns a version with a longer length (amortised O(d) per
  entry, capacity doubling); the old version still sees only its first ``n`` rows;
* appending to an **older** version (one that a later update already extended)
  copies its first ``n`` rows into a fresh arena first (O(n·d)), so both branches
  stay independent.

Vectors: ``update`` accepts float32 rows whose L2 norm is within ``1e-3`` of 1 and
renormalises them to unit norm in float32; a row with any other norm (e.g. an
unnormalised embedding or a zero vector) is rejected with
:class:`~intercascade_core.errors.InvalidArgumentError`, because silently
normalising a wrong vector would hide an embedding bug. NaN/inf are rejected too.

Ids: an entry given with ``id=-1`` (the default) gets ``id`` = its index in the
repository; an explicit id is kept as given.

Arrays exposed to users (:attr:`Repository.vectors`) are read-only views that cannot
be made writeable (they are built over a read-only memoryview of the arena).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError

__all__ = ["Entry", "Repository", "append_exact", "empty_repository", "update", "NORM_TOLERANCE"]

#: rows whose L2 norm differs from 1 by more than this are rejected by :func:`update`.
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True, slots=True)
class Entry:
    """One strategy: the query that produced it, the strong model's answer and the
    distilled reusable strategy text, plus provenance."""

    query: str
    answer: str
    strategy: str
    source_level: int = 0
    source_model: str = ""
    created_at: float = 0.0
    tenant: str = "default"
    id: int = -1


def _alloc(capacity: int, dim: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """A writeable array and a read-only twin over the same memory. The twin is
    built on a read-only memoryview, so no view of it can be flipped writeable."""
    itemsize = np.dtype(dtype).itemsize
    count = capacity * max(dim, 1)
    raw = bytearray(max(count * itemsize, 1))
    shape = (capacity, dim) if dim else (capacity,)
    rw = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
    ro = np.frombuffer(memoryview(raw).toreadonly(), dtype=dtype, count=count).reshape(shape)
    return rw, ro


class _Arena:
    """Append-only storage shared by the versions built from one another.

    Invariant: rows ``[0, length)`` are never written again; every version ``v`` of
    this arena has ``v._n <= length``. Only the holder of ``length`` (the newest
    version) may append in place; the lock makes "am I the newest?" + append atomic.
    """

    __slots__ = (
        "dim",
        "capacity",
        "length",
        "rw",
        "ro",
        "entries",
        "tenants",
        "tenant_codes",
        "tenant_codes_ro",
        "lock",
        "cache",
        "__weakref__",
    )

    def __init__(self, dim: int, capacity: int) -> None:
        self.dim = dim
        self.capacity = capacity
        self.length = 0
        self.rw, self.ro = _alloc(capacity, dim, np.float32)
        self.entries: list[Entry] = []
        self.tenants: dict[str, int] = {}
        self.tenant_codes, self.tenant_codes_ro = _alloc(capacity, 0, np.int32)
        self.lock = threading.Lock()
        # derived per-arena data (int8 scan copy, hnsw index), grown lazily and
        # append-only like the arena itself; see retrieve.py / _ann.py
        self.cache: dict[str, Any] = {}

    def grow(self, needed: int) -> None:
        """Make room for ``needed`` rows (capacity doubling, rounded to a power of 2)."""
        capacity = max(2 * self.capacity, 1 << max(needed - 1, 0).bit_length(), 16)
        rw, ro = _alloc(capacity, self.dim, np.float32)
        rw[: self.length] = self.rw[: self.length]
        codes, codes_ro = _alloc(capacity, 0, np.int32)
        codes[: self.length] = self.tenant_codes[: self.length]
        # old versions keep references to the old buffers through their own views;
        # the data in rows [0, length) is identical in both.
        self.rw, self.ro, self.tenant_codes, self.tenant_codes_ro = rw, ro, codes, codes_ro
        self.capacity = capacity


class _EntriesView(Sequence[Entry]):
    """Read-only sequence of the first ``n`` entries of an arena (O(1) to build)."""

    __slots__ = ("_entries", "_n")

    def __init__(self, entries: list[Entry], n: int) -> None:
        self._entries = entries
        self._n = n

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Entry: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Entry, ...]: ...
    def __getitem__(self, i: int | slice) -> Entry | tuple[Entry, ...]:
        if isinstance(i, slice):
            return tuple(self._entries[j] for j in range(*i.indices(self._n)))
        j = int(i)
        if j < 0:
            j += self._n
        if not 0 <= j < self._n:
            raise IndexError("repository entry index out of range")
        return self._entries[j]

    def __iter__(self) -> Iterator[Entry]:
        entries = self._entries
        for j in range(self._n):
            yield entries[j]

    def __repr__(self) -> str:
        return f"<{self._n} entries>"


@dataclass(frozen=True, slots=True, eq=False)
class Repository:
    """An immutable version of the strategy repository (see the module docstring).

    Equality is identity (``eq=False``): two versions are "the same" only when they
    are the same object; compare ``entries``/``vectors`` explicitly otherwise.
    """

    dim: int
    _arena: _Arena = dataclasses.field(repr=False)
    _n: int = 0

    def __len__(self) -> int:
        return self._n

    @property
    def entries(self) -> Sequence[Entry]:
        """The entries of this version, in insertion order (index = row)."""
        return _EntriesView(self._arena.entries, self._n)

    @property
    def vectors(self) -> npt.NDArray[np.float32]:
        """Read-only ``(len(self), dim)`` float32 view of the unit-norm embeddings."""
        return self._arena.ro[: self._n]

    @property
    def tenant_codes(self) -> npt.NDArray[np.int32]:
        """Read-only ``(len(self),)`` int32 code of each row's tenant (see tenant_code)."""
        return self._arena.tenant_codes_ro[: self._n]

    def tenant_code(self, tenant: str) -> int:
        """The int32 code of ``tenant`` in this repository's arena, or -1 if unseen."""
        return self._arena.tenants.get(tenant, -1)

    def tenant_size(self, tenant: str) -> int:
        """Number of rows of this version that belong to ``tenant``."""
        code = self.tenant_code(tenant)
        if code < 0:
            return 0
        return int(np.count_nonzero(self.tenant_codes == code))

    def __repr__(self) -> str:
        return f"Repository(dim={self.dim}, len={self._n})"


def empty_repository(dim: int) -> Repository:
    """An empty repository of ``dim``-dimensional embeddings."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidArgumentError("dim", f"must be a positive int, got {dim!r}")
    return Repository(int(dim), _Arena(int(dim), 0), 0)


def _check_vectors(vectors: Any, count: int, dim: int) -> np.ndarray:
    if not isinstance(vectors, np.ndarray):
        raise InvalidArgumentError(
            "vectors", f"must be a numpy float32 array, got {type(vectors).__name__}"
        )
    if vectors.dtype != np.float32:
        raise InvalidArgumentError("vectors", f"must have dtype float32, got {vectors.dtype}")
    if vectors.ndim == 1 and count == 1:
        vectors = vectors.reshape(1, -1)
    if vectors.ndim != 2 or vectors.shape != (count, dim):
        raise InvalidArgumentError(
            "vectors", f"must have shape ({count}, {dim}) (one row per entry), got {vectors.shape}"
        )
    if count == 0:
        return vectors
    # a row holds NaN/inf iff its float64 sum of squares does (float32 squares cannot overflow it)
    sq = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    if not np.isfinite(sq).all():
        raise InvalidArgumentError("vectors", "contains NaN or infinite values")
    norms = np.sqrt(sq)
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgumentError(
            "vectors",
            f"row {i} has L2 norm {norms[i]:.6g}; rows must be unit-norm (within {NORM_TOLERANCE})",
        )
    return vectors * (1.0 / norms).astype(np.float32)[:, None]


def update(repo: Repository, entries: Sequence[Entry], vectors: np.ndarray) -> Repository:
    """Return a new version of ``repo`` with ``entries`` appended (``repo`` is unchanged).

    ``vectors`` has shape ``(len(entries), repo.dim)`` (a 1-D row is accepted for a
    single entry), dtype float32, finite, with unit L2 norm (within
    :data:`NORM_TOLERANCE`; renormalised exactly). Entries with ``id == -1`` get
    their row index as id.
    """
    _check_update_args(repo, entries)
    count = len(entries)
    rows = _check_vectors(vectors, count, repo.dim)
    if count == 0:
        return repo
    return _append_rows(repo, entries, rows)


def append_exact(repo: Repository, entries: Sequence[Entry], vectors: np.ndarray) -> Repository:
    """:func:`update` for rows that already come from a repository (a journal replay, a
    rebased commit): validated the same way (float32, finite, unit norm within the
    tolerance) but stored **bit-exactly**, without the float32 renormalisation that
    ``update`` applies (which is not idempotent to the last ulp). Replaying a journal
    therefore reproduces the logged rows exactly."""
    _check_update_args(repo, entries)
    count = len(entries)
    _check_vectors(vectors, count, repo.dim)  # validation only
    if count == 0:
        return repo
    rows = np.ascontiguousarray(vectors, dtype=np.float32).reshape(count, repo.dim)
    return _append_rows(repo, entries, rows)


def _check_update_args(repo: Any, entries: Any) -> None:
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    if isinstance(entries, (str, bytes, Entry)) or not isinstance(entries, Sequence):
        raise InvalidArgumentError("entries", "must be a sequence of Entry")
    for e in entries:
        if not isinstance(e, Entry):
            raise InvalidArgumentError(
                "entries", f"must contain Entry objects, got {type(e).__name__}"
            )


def _append_rows(repo: Repository, entries: Sequence[Entry], rows: np.ndarray) -> Repository:
    """Append checked rows: in place on the newest version, else into a branched arena."""
    n = repo._n
    arena = repo._arena
    with arena.lock:
        if arena.length != n:  # an older version: branch off into a fresh arena
            old = arena
            arena = _Arena(repo.dim, 0)
            arena.grow(n + len(entries))
            arena.rw[:n] = old.rw[:n]
            arena.entries = old.entries[:n]
            arena.tenants = dict(old.tenants)
            arena.tenant_codes[:n] = old.tenant_codes[:n]
            arena.length = n
        return _append(arena, n, entries, rows, repo.dim)


_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(Entry))
_entry_values = attrgetter(*_ENTRY_FIELDS)
_ID_POS = _ENTRY_FIELDS.index("id")


def _with_id(e: Entry, i: int) -> Entry:
    """``dataclasses.replace(e, id=i)``, several times faster (bulk loads of 1M entries)."""
    values = list(_entry_values(e))
    values[_ID_POS] = i
    return type(e)(*values)


def _append(
    arena: _Arena, n: int, entries: Sequence[Entry], rows: np.ndarray, dim: int
) -> Repository:
    count = len(entries)
    if n + count > arena.capacity:
        arena.grow(n + count)
    arena.rw[n : n + count] = rows
    tenants = arena.tenants
    for tenant in {e.tenant for e in entries} - tenants.keys():
        tenants[tenant] = len(tenants)
    arena.tenant_codes[n : n + count] = [tenants[e.tenant] for e in entries]
    arena.entries.extend(e if e.id != -1 else _with_id(e, n + j) for j, e in enumerate(entries))
    arena.length = n + count
    return Repository(dim, arena, n + count)
