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

The arena stays private to this module. Other modules use the public doors:
:meth:`Repository.derived` (data computed from the rows and shared by the versions
of one arena: the int8 scan copy, an ANN index), :func:`from_arrays` (a version over
existing arrays, e.g. a memory-mapped snapshot) and :func:`append_exact`, and
:func:`unit_rows`, the one check of embedding rows (repository rows, queries,
rows sent to a server).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol, TypeVar, overload

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError

__all__ = [
    "NORM_TOLERANCE",
    "Entry",
    "Repository",
    "append_exact",
    "check_entries",
    "empty_repository",
    "from_arrays",
    "unit_rows",
    "update",
]

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


_T = TypeVar("_T")


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


class _EntryList(Protocol):
    """What an arena needs of its entry list: a ``list``, or the lazily parsed
    entries of a memory-mapped snapshot (:mod:`~intercascade_core.storage.store`)."""

    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, i: int) -> Entry: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Entry]: ...
    def __iter__(self) -> Iterator[Entry]: ...
    def extend(self, items: Iterable[Entry]) -> None: ...


class _Arena:
    """Append-only storage shared by the versions built from one another.

    Invariant: rows ``[0, length)`` are never written again; every version ``v`` of
    this arena has ``v._n <= length``. Only the holder of ``length`` (the newest
    version) may append in place; the lock makes "am I the newest?" + append atomic.
    """

    __slots__ = (
        "__weakref__",
        "capacity",
        "derived",
        "dim",
        "entries",
        "length",
        "lock",
        "ro",
        "rw",
        "tenant_codes",
        "tenant_codes_ro",
        "tenants",
    )

    def __init__(self, dim: int, capacity: int) -> None:
        self.dim = dim
        self.capacity = capacity
        self.length = 0
        self.rw, self.ro = _alloc(capacity, dim, np.float32)
        self.entries: _EntryList = []
        self.tenants: dict[str, int] = {}
        self.tenant_codes, self.tenant_codes_ro = _alloc(capacity, 0, np.int32)
        self.lock = threading.Lock()
        # data derived from the rows, append-only like them (Repository.derived)
        self.derived: dict[str, Any] = {}

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

    def __init__(self, entries: _EntryList, n: int) -> None:
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

    @property
    def tenant_names(self) -> tuple[str, ...]:
        """The tenant of each code (index = code). Codes are shared by the versions
        of one arena, so this may name tenants that only newer versions hold."""
        with self._arena.lock:
            return tuple(self._arena.tenants)

    def derived(self, key: str, extend: Callable[[_T | None, Repository], _T]) -> _T:
        """Data derived from the rows (an int8 scan copy, an ANN index), shared by the
        versions that share this one's storage and grown, never rebuilt, as they grow.

        ``extend(previous, self)`` receives the value stored under ``key`` (``None``
        the first time, or after a copy-on-branch) and returns one that covers at
        least rows ``[0, len(self))``; it is stored and returned. It may grow
        ``previous`` in place — the rows it already covers never change — but must
        keep it valid for the older, shorter versions that share it (they read only
        their first ``len`` rows). It runs under the storage's lock, so calls on
        versions of one arena (and appends to it) are serialised: keep it short, or
        return a handle that the caller grows under a lock of its own.
        """
        arena = self._arena
        with arena.lock:
            value = extend(arena.derived.get(key), self)
            arena.derived[key] = value
            return value

    def __repr__(self) -> str:
        return f"Repository(dim={self.dim}, len={self._n})"


def empty_repository(dim: int) -> Repository:
    """An empty repository of ``dim``-dimensional embeddings."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidArgumentError("dim", f"must be a positive int, got {dim!r}")
    return Repository(int(dim), _Arena(int(dim), 0), 0)


def from_arrays(
    vectors: npt.NDArray[np.float32],
    tenant_codes: npt.NDArray[np.int32],
    tenants: Sequence[str],
    entries: Sequence[Entry],
) -> Repository:
    """A version over existing rows, without copying them: bulk, bit-exact loads
    (a memory-mapped snapshot opens in O(1), see :mod:`~intercascade_core.storage.store`).

    ``vectors`` is ``(n, dim)`` float32, ``tenant_codes`` ``(n,)`` int32 where code
    ``c`` is tenant ``tenants[c]``, ``entries`` the ``n`` entries (ids kept as
    given; a sequence with an ``extend`` method, such as a lazily parsed one, is kept
    as is, any other is copied into a list). Arrays over a buffer no one can write
    (a read-only memory map) are shared; any other is copied, so that no one can
    change a row behind the version's back. The rows are not checked for unit norm
    (that reads every row: the caller vouches, or calls :func:`unit_rows`); the first
    :func:`update` of the version copies them into growable storage.
    """
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32 or vectors.ndim != 2:
        raise InvalidArgumentError("vectors", f"must be a 2-D float32 array, got {_describe(vectors)}")
    n, dim = vectors.shape
    if dim < 1:
        raise InvalidArgumentError("vectors", f"must have at least one column, got shape {vectors.shape}")
    if not isinstance(tenant_codes, np.ndarray) or tenant_codes.dtype != np.int32 or tenant_codes.shape != (n,):
        raise InvalidArgumentError(
            "tenant_codes", f"must be an int32 array of shape ({n},), got {_describe(tenant_codes)}"
        )
    names = list(tenants)
    if not all(isinstance(t, str) for t in names) or len(set(names)) != len(names):
        raise InvalidArgumentError("tenants", f"must be distinct str, got {names!r:.200}")
    if len(entries) != n:
        raise InvalidArgumentError("entries", f"must hold {n} entries (one per row), got {len(entries)}")
    arena = _Arena(dim, 0)
    if n:
        arena.rw = arena.ro = _shared(vectors)
        arena.tenant_codes = arena.tenant_codes_ro = _shared(tenant_codes)
        # capacity == length: the first append grows, i.e. copies, before writing
        arena.capacity = arena.length = n
    arena.entries = entries if hasattr(entries, "extend") else list(entries)
    arena.tenants = {t: i for i, t in enumerate(names)}
    return Repository(dim, arena, n)


def _describe(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def _shared(a: np.ndarray) -> np.ndarray:
    """``a`` itself when it is C-contiguous over a buffer that no one can write (a
    read-only memory map), else a read-only copy built like the arena's own buffers.
    (An ndarray that owns its memory can always be flipped writeable by its holder.)"""
    probe = a.view()
    try:
        probe.flags.writeable = True
    except ValueError:
        owner: Any = a
        while isinstance(owner, np.ndarray) and owner.base is not None:
            owner = owner.base
        if not isinstance(owner, np.ndarray) and a.flags.c_contiguous:
            return a
    rw, ro = _alloc(a.shape[0], a.shape[1] if a.ndim == 2 else 0, a.dtype)
    rw[...] = a
    return ro


def unit_rows(
    vectors: Any,
    dim: int,
    *,
    count: int | None = None,
    argument: str = "vectors",
    renormalise: bool = True,
) -> npt.NDArray[np.float32]:
    """The one check of embedding rows (stored rows, queries, rows sent to a server).

    ``vectors`` must be a float32 numpy array of shape ``(count, dim)`` — ``(m, dim)``
    for any ``m`` when ``count`` is None; a 1-D array is one row when ``count`` is
    None or 1 — finite, each row of L2 norm within :data:`NORM_TOLERANCE` of 1.
    Returns the rows renormalised to unit norm in float32 (C-contiguous), or with
    ``renormalise=False`` the validated 2-D rows as given (for bit-exact storage:
    the renormalisation is not idempotent to the last ulp). Anything else raises
    :class:`~intercascade_core.errors.InvalidArgumentError` naming ``argument``.
    """
    if not isinstance(vectors, np.ndarray):
        raise InvalidArgumentError(
            argument, f"must be a numpy float32 array, got {type(vectors).__name__}"
        )
    if vectors.dtype != np.float32:
        raise InvalidArgumentError(argument, f"must have dtype float32, got {vectors.dtype}")
    rows = vectors.reshape(1, -1) if vectors.ndim == 1 and count in (None, 1) else vectors
    if count is None:
        if rows.ndim != 2 or rows.shape[1] != dim:
            raise InvalidArgumentError(
                argument, f"must have shape (m, {dim}) or ({dim},), got {vectors.shape}"
            )
    elif rows.shape != (count, dim):
        raise InvalidArgumentError(
            argument, f"must have shape ({count}, {dim}) (one row per entry), got {vectors.shape}"
        )
    if rows.shape[0] == 0:
        return np.ascontiguousarray(rows) if renormalise else rows
    # a row holds NaN/inf iff its float64 sum of squares does (float32 squares cannot overflow it)
    sq = np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
    if not np.isfinite(sq).all():
        raise InvalidArgumentError(argument, "contains NaN or infinite values")
    norms = np.sqrt(sq)
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgumentError(
            argument,
            f"row {i} has L2 norm {norms[i]:.6g}; rows must be unit-norm (within {NORM_TOLERANCE})",
        )
    if not renormalise:
        return rows
    return np.ascontiguousarray(rows * (1.0 / norms).astype(np.float32)[:, None])


def update(repo: Repository, entries: Sequence[Entry], vectors: np.ndarray) -> Repository:
    """Return a new version of ``repo`` with ``entries`` appended (``repo`` is unchanged).

    ``vectors`` has shape ``(len(entries), repo.dim)`` (a 1-D row is accepted for a
    single entry), dtype float32, finite, with unit L2 norm (within
    :data:`NORM_TOLERANCE`; renormalised exactly). Entries with ``id == -1`` get
    their row index as id.
    """
    check_entries(entries, repo)
    count = len(entries)
    rows = unit_rows(vectors, repo.dim, count=count)
    if count == 0:
        return repo
    return _append_rows(repo, entries, rows)


def append_exact(repo: Repository, entries: Sequence[Entry], vectors: np.ndarray) -> Repository:
    """:func:`update` for rows that already come from a repository (a journal replay, a
    rebased commit): validated the same way (float32, finite, unit norm within the
    tolerance) but stored **bit-exactly**, without the float32 renormalisation that
    ``update`` applies (which is not idempotent to the last ulp). Replaying a journal
    therefore reproduces the logged rows exactly."""
    check_entries(entries, repo)
    count = len(entries)
    rows = unit_rows(vectors, repo.dim, count=count, renormalise=False)
    if count == 0:
        return repo
    return _append_rows(repo, entries, rows)


def check_entries(entries: Any, repo: Any = None) -> None:
    """What :func:`update` demands of ``entries`` (and of ``repo`` when given), so that a
    store can refuse before it writes what a reopen would refuse to replay."""
    if repo is not None and not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    if isinstance(entries, (str, bytes, Entry)) or not isinstance(entries, Sequence):
        raise InvalidArgumentError("entries", "must be a sequence of Entry")
    for e in entries:
        if not isinstance(e, Entry):
            raise InvalidArgumentError(
                "entries", f"must contain Entry objects, got {type(e).__name__}"
            )
        if not isinstance(e.tenant, str) or not e.tenant:
            raise InvalidArgumentError(
                "entries", f"an entry's tenant must be a non-empty str, got {e.tenant!r:.40}"
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
            arena.entries = list(old.entries[:n])
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
