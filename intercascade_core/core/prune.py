"""Keep the repository bounded: a cap with eviction, and near-duplicate suppression.

Pure functions: each returns a new :class:`Pruned` (repository, usage counters, the kept
rows of the input) and never changes its arguments.

Usage counters live outside the immutable :class:`~intercascade_core.core.repository.Entry`:
an int64 array aligned with the rows (``uses[r]`` = how many prompts row ``r`` was placed
in), threaded by the caller (:class:`~intercascade_core.service.Cascade` does it) and
persisted by :mod:`intercascade_core.storage.store`. :func:`record_uses` returns the incremented copy.

Rows and ids: a pruned repository is rebuilt from the kept rows in their original order,
and every kept entry gets its **new row index as id** (ids stay equal to rows, which is
what :func:`~intercascade_core.core.repository.update` assigns by default and what usage
counting relies on). ``Pruned.kept[new_row] = old_row`` maps between the two.

Distances are cosine distances ``1 - cos(u, v)`` between the unit-norm query embeddings;
two entries are near-duplicates when they belong to the same tenant and their distance is
``<= max_distance``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError
from .repository import Entry, Repository, empty_repository, update
from .retrieve import retrieve

__all__ = [
    "Pruned",
    "add_unique",
    "compact",
    "dedupe",
    "evict",
    "find_near_duplicate",
    "record_uses",
]

Policy = Literal["least_used", "oldest"]
_BLOCK = 2048


@dataclass(frozen=True, slots=True, eq=False)
class Pruned:
    """A pruned repository, its usage counters (read-only int64) and ``kept``: for each
    new row, the row of the input it came from (int64, increasing)."""
    repository: Repository
    uses: npt.NDArray[np.int64]
    kept: npt.NDArray[np.int64]


def _uses(uses: Any, n: int) -> np.ndarray:
    if uses is None:
        return np.zeros(n, dtype=np.int64)
    arr = np.asarray(uses)
    if arr.dtype.kind not in "iu" or arr.ndim != 1 or len(arr) > n:
        raise InvalidArgumentError("uses", f"must be a 1-D integer array of length <= {n}")
    out = np.zeros(n, dtype=np.int64)
    out[: len(arr)] = arr
    return out


def _ro(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _check_repo(repo: Any) -> Repository:
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    return repo


def _check_distance(max_distance: Any) -> float:
    if (
        isinstance(max_distance, bool)
        or not isinstance(max_distance, (int, float))
        or not (0.0 <= max_distance <= 2.0)
    ):
        raise InvalidArgumentError(
            "max_distance", f"must be a cosine distance in [0, 2], got {max_distance!r}"
        )
    return float(max_distance)


def record_uses(
    uses: npt.ArrayLike | None, rows: Sequence[int] | npt.ArrayLike, n: int
) -> npt.NDArray[np.int64]:
    """``uses`` extended with zeros to length ``n`` plus one per listed row (a row listed
    twice counts twice). Returns a new read-only array."""
    out = _uses(uses, n)
    r = np.asarray(rows, dtype=np.int64).reshape(-1)
    if r.size:
        if r.min() < 0 or r.max() >= n:
            raise InvalidArgumentError("rows", f"row indices must be in 0..{n - 1}")
        np.add.at(out, r, 1)
    return _ro(out)


def compact(repo: Repository, rows: npt.ArrayLike, uses: npt.ArrayLike | None = None) -> Pruned:
    """A new repository with only ``rows`` of ``repo`` (sorted, deduplicated), ids
    renumbered to the new rows."""
    _check_repo(repo)
    n = len(repo)
    keep = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
    if keep.size and (keep[0] < 0 or keep[-1] >= n):
        raise InvalidArgumentError("rows", f"row indices must be in 0..{n - 1}")
    u = _uses(uses, n)
    entries = repo.entries
    kept_entries = [dataclasses.replace(entries[int(r)], id=-1) for r in keep]
    new = update(empty_repository(repo.dim), kept_entries, np.ascontiguousarray(repo.vectors[keep]))
    return Pruned(new, _ro(u[keep].copy()), _ro(keep))


def evict(
    repo: Repository,
    max_entries: int,
    *,
    policy: Policy = "least_used",
    uses: npt.ArrayLike | None = None,
) -> Pruned:
    """Keep at most ``max_entries`` rows.

    ``policy="least_used"`` evicts the rows with the fewest uses first (ties: the oldest
    by ``created_at``, then the lower row); ``"oldest"`` evicts by ``created_at`` (ties:
    the lower row). The cap is global across tenants. When nothing needs evicting the
    input repository itself is returned (no copy).
    """
    _check_repo(repo)
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 0:
        raise InvalidArgumentError("max_entries", f"must be an int >= 0, got {max_entries!r}")
    if policy not in ("least_used", "oldest"):
        raise InvalidArgumentError("policy", f"must be 'least_used' or 'oldest', got {policy!r}")
    n = len(repo)
    u = _uses(uses, n)
    if n <= max_entries:
        return Pruned(repo, _ro(u), _ro(np.arange(n, dtype=np.int64)))
    created = np.fromiter((e.created_at for e in repo.entries), dtype=np.float64, count=n)
    rows = np.arange(n, dtype=np.int64)
    # np.lexsort sorts by the last key first
    order = (
        np.lexsort((rows, created, u)) if policy == "least_used" else np.lexsort((rows, created))
    )
    keep = np.sort(order[n - max_entries :])
    return compact(repo, keep, u)


def _tenant_rows(repo: Repository) -> dict[int, np.ndarray]:
    codes = np.asarray(repo.tenant_codes)
    return {int(c): np.flatnonzero(codes == c) for c in np.unique(codes)}


def dedupe(repo: Repository, max_distance: float, *, uses: npt.ArrayLike | None = None) -> Pruned:
    """Drop near-duplicates within each tenant: scanning rows in order, a row is kept
    unless an already kept row of the same tenant is within ``max_distance``. A dropped
    row's usage counter is added to the kept row it duplicates. O(n_t² · d) per tenant in
    blocks (meant for offline compaction; online insertion uses :func:`add_unique`)."""
    _check_repo(repo)
    thr = 1.0 - _check_distance(max_distance)
    n = len(repo)
    u = _uses(uses, n)
    vec = np.asarray(repo.vectors)
    keep_mask = np.zeros(n, dtype=bool)
    for rows in _tenant_rows(repo).values():
        kept: list[int] = []  # rows of this tenant kept so far
        x = vec[rows]
        for a in range(0, len(rows), _BLOCK):
            blk = x[a : a + _BLOCK]
            sims_prev = blk @ vec[kept].T if kept else np.empty((len(blk), 0), np.float32)
            sims_in = blk @ blk.T
            kept_here: list[int] = []  # offsets within the block
            for i in range(len(blk)):
                dup: int | None = None
                if sims_prev.shape[1]:
                    j = int(np.argmax(sims_prev[i]))
                    if sims_prev[i, j] >= thr:
                        dup = kept[j]
                if dup is None and kept_here:
                    s = sims_in[i, kept_here]
                    j = int(np.argmax(s))
                    if s[j] >= thr:
                        dup = int(rows[a + kept_here[j]])
                if dup is None:
                    kept_here.append(i)
                else:
                    u[dup] += u[rows[a + i]]
            kept.extend(int(rows[a + i]) for i in kept_here)
        keep_mask[kept] = True
    keep = np.flatnonzero(keep_mask)
    if len(keep) == n:
        return Pruned(repo, _ro(u), _ro(keep.astype(np.int64)))
    return compact(repo, keep, u)


def find_near_duplicate(
    repo: Repository, vector: npt.NDArray[np.float32], tenant: str, max_distance: float
) -> int | None:
    """The row of ``repo`` (tenant ``tenant``) nearest to ``vector`` if it lies within
    ``max_distance`` (cosine distance), else None. Uses the exact backend."""
    _check_repo(repo)
    thr = 1.0 - _check_distance(max_distance)
    if repo.tenant_code(tenant) < 0:
        return None
    top = retrieve(
        repo, np.asarray(vector, dtype=np.float32).reshape(1, -1), 1, backend="exact", tenant=tenant
    )
    if top.indices.shape[1] == 0 or top.scores[0, 0] < thr:
        return None
    return int(top.indices[0, 0])


def add_unique(
    repo: Repository,
    entries: Sequence[Entry],
    vectors: npt.NDArray[np.float32],
    max_distance: float,
) -> tuple[Repository, npt.NDArray[np.bool_]]:
    """Append the entries that are not near-duplicates (same tenant, cosine distance
    ``<= max_distance``) of a stored entry or of an earlier entry of this batch.
    Returns the new repository and a mask of the entries that were stored."""
    _check_repo(repo)
    _check_distance(max_distance)
    vec = np.asarray(vectors, dtype=np.float32).reshape(len(entries), repo.dim)
    thr = 1.0 - max_distance
    stored = np.zeros(len(entries), dtype=bool)
    for i, e in enumerate(entries):
        if find_near_duplicate(repo, vec[i], e.tenant, max_distance) is not None:
            continue
        if any(
            entries[int(j)].tenant == e.tenant and float(vec[j] @ vec[i]) >= thr
            for j in np.flatnonzero(stored)
        ):
            continue
        stored[i] = True
    keep = np.flatnonzero(stored)
    if keep.size:
        repo = update(repo, [entries[int(i)] for i in keep], np.ascontiguousarray(vec[keep]))
    return repo, _ro(stored)
