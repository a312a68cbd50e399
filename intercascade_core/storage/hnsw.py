"""hnswlib adapter: the approximate ``backend="hnsw"`` of :func:`retrieve`.

One HNSW index (inner-product space, labels = row indices) is attached to each
repository *arena* and grown incrementally: a search on version ``n`` first adds
the arena's rows ``[indexed, n)`` (rows below the arena length never change), so
the index is never rebuilt; capacity doubles with ``resize_index``.

Version bound: the index may hold rows newer than the version asked about
(``label >= n``) — they must never be returned. When it holds none and no tenant
filter is given, a plain ``knn_query`` runs (the fast path: querying the newest
version). Otherwise the search over-fetches ``2k' + 16`` neighbours and drops
labels ``>= n`` / of other tenants; only queries left with fewer than ``k'`` rows
fall back to hnswlib's ``filter=`` callable, which is exact but calls Python for
every visited node (slow, so it is the last resort, not the default).

The index lives in the repository's derived data (:meth:`Repository.derived`, key
``"hnsw"``): the arena lock is held only to find or create it; rows are added under
the index's own lock, so a long build does not hold up appends to the repository.

Importing this module registers the name ``"hnsw"`` with
:func:`~intercascade_core.core.retrieve.register_index` (the package root imports it,
so the name always works); hnswlib itself is imported lazily, on the first search
(it is an adapter dependency, not a core one).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..core import _topk_numpy
from ..core.repository import Repository
from ..core.retrieve import register_index
from ..errors import InvalidArgumentError

__all__ = [
    "DEFAULT_PARAMS",
    "HnswParams",
    "ensure_index",
    "index_stats",
    "load_index",
    "save_index",
    "search",
]


@dataclass(frozen=True, slots=True)
class HnswParams:
    """Index parameters: graph degree ``M``, build breadth ``ef_construction``,
    default search breadth ``ef`` (raised to ``k`` when smaller), build seed."""

    M: int = 16
    ef_construction: int = 100
    # 128: recall@5 0.95 at 0.25 ms p50 on the 1M mixed-MiniLM bench set (ef=64: 0.94)
    ef: int = 128
    seed: int = 100
    threads: int = 2


DEFAULT_PARAMS = HnswParams()


class _AnnIndex:
    def __init__(self, dim: int, params: HnswParams) -> None:
        try:
            import hnswlib
        except ImportError as exc:  # pragma: no cover - hnswlib is a core dependency
            raise ImportError("backend='hnsw' needs hnswlib: pip install hnswlib") from exc
        self.params = params
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.capacity = 1024
        self.index.init_index(
            max_elements=self.capacity,
            M=params.M,
            ef_construction=params.ef_construction,
            random_seed=params.seed,
        )
        self.count = 0
        self.lock = threading.Lock()

    def grow_to(self, vectors: np.ndarray, n: int) -> None:
        """Add rows ``[count, n)`` of ``vectors``, the arena's first ``n`` rows (the
        caller holds ``lock``)."""
        if n <= self.count:
            return
        if n > self.capacity:
            self.capacity = max(2 * self.capacity, 1 << (n - 1).bit_length())
            self.index.resize_index(self.capacity)
        rows = vectors[self.count : n]
        threads = 1 if n - self.count < 64 else self.params.threads
        self.index.add_items(rows, np.arange(self.count, n, dtype=np.int64), num_threads=threads)
        self.count = n


def ensure_index(repo: Repository, params: HnswParams | None = None) -> _AnnIndex:
    """The arena's HNSW index, created with ``params`` if absent, grown to ``len(repo)``."""

    def find_or_create(prev: _AnnIndex | None, r: Repository) -> _AnnIndex:
        return prev if prev is not None else _AnnIndex(r.dim, params or DEFAULT_PARAMS)

    idx = repo.derived("hnsw", find_or_create)
    with idx.lock:
        idx.grow_to(repo.vectors, len(repo))
    return idx


def _peek(prev: _AnnIndex | None, repo: Repository) -> _AnnIndex | None:
    return prev


def index_stats(repo: Repository) -> dict[str, int]:
    """Rows indexed and capacity of the arena's HNSW index (0s when none yet)."""
    idx = repo.derived("hnsw", _peek)
    return {"count": idx.count if idx else 0, "capacity": idx.capacity if idx else 0}


def _sorted(labels: np.ndarray, scores: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((labels, -scores))[:kk]
    return labels[order], scores[order]


def search(
    repo: Repository,
    queries: npt.NDArray[np.float32],
    k: int,
    *,
    tenant_code: int = -1,
    ef: int | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Approximate top-``k`` of ``repo`` (rows ``< len(repo)``, of ``tenant_code`` when
    >= 0) for validated unit ``queries``. Results sorted by (score desc, index asc)."""
    if ef is not None and (isinstance(ef, bool) or not isinstance(ef, int) or ef < 1):
        raise InvalidArgumentError("ef", f"must be a positive int, got {ef!r}")
    n, m = len(repo), queries.shape[0]
    idx = ensure_index(repo)
    codes = repo.tenant_codes if tenant_code >= 0 else None
    allowed_n = n if codes is None else int(np.count_nonzero(codes == tenant_code))
    kk = min(k, allowed_n)
    out_i = np.empty((m, kk), np.int64)
    out_s = np.empty((m, kk), np.float32)
    if kk == 0 or m == 0:
        return out_i, out_s
    ef_q = max(ef or idx.params.ef, kk)

    def ok(labels: np.ndarray) -> np.ndarray:
        good = labels < n
        if codes is not None:
            good &= codes[np.minimum(labels, n - 1)] == tenant_code
        return good

    with idx.lock:
        total = idx.count
        if codes is None and total == n:  # newest version, no tenant: plain search
            idx.index.set_ef(ef_q)
            labels, dist = _knn(idx, repo, queries, kk)
            for j in range(m):
                out_i[j], out_s[j] = _sorted(
                    labels[j].astype(np.int64), (1 - dist[j]).astype(np.float32), kk
                )
            return out_i, out_s
        fetch = min(total, 2 * kk + 16)
        idx.index.set_ef(max(ef_q, fetch))
        labels, dist = _knn(idx, repo, queries, fetch)
        labels = labels.astype(np.int64)
        short = []
        for j in range(m):
            good = ok(labels[j])
            if np.count_nonzero(good) >= kk:
                out_i[j], out_s[j] = _sorted(
                    labels[j][good], (1 - dist[j][good]).astype(np.float32), kk
                )
            else:
                short.append(j)
        if short:
            if codes is None:
                keep = lambda label: label < n  # noqa: E731
            else:
                code_list = codes.tolist()
                keep = lambda label: label < n and code_list[label] == tenant_code  # noqa: E731
            idx.index.set_ef(max(ef_q, kk))
            for j in short:
                try:
                    lab, dis = idx.index.knn_query(
                        queries[j : j + 1], k=kk, num_threads=1, filter=keep
                    )
                except RuntimeError:  # the filtered graph walk found < k' rows: answer exactly
                    lab, dis = _exact(repo, queries[j : j + 1], kk, codes, tenant_code)
                out_i[j], out_s[j] = _sorted(
                    lab[0].astype(np.int64), (1 - dis[0]).astype(np.float32), kk
                )
    return out_i, out_s


def _knn(
    idx: _AnnIndex, repo: Repository, q: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unfiltered knn_query over the whole index; on hnswlib's "cannot return k
    results" (tiny or poorly connected graphs) answer exactly over this version's
    rows (the only ones a caller may return)."""
    try:
        return idx.index.knn_query(q, k=k, num_threads=1)  # type: ignore[no-any-return]
    except RuntimeError:
        return _exact(repo, q, k, None, -1)


def _exact(
    repo: Repository, q: np.ndarray, kk: int, codes: np.ndarray | None, tenant_code: int
) -> tuple[np.ndarray, np.ndarray]:
    i, s = _topk_numpy.topk(repo.vectors, q, kk, codes, tenant_code)
    return i, 1 - s.astype(np.float64)


def save_index(repo: Repository, path: str) -> None:
    """Write the arena's HNSW index (grown to ``len(repo)``) to ``path`` (hnswlib format)."""
    idx = ensure_index(repo)
    with idx.lock:
        idx.index.save_index(str(path))


def load_index(repo: Repository, path: str, params: HnswParams | None = None) -> None:
    """Attach an index saved by :func:`save_index` from a repository with the *same
    first rows* (the caller vouches for that) to ``repo``'s arena, replacing any. The
    index may hold at most ``len(repo)`` rows."""
    idx = _AnnIndex(repo.dim, params or DEFAULT_PARAMS)
    idx.index.load_index(str(path), max_elements=0)
    count = idx.index.get_current_count()
    if count > len(repo):
        raise InvalidArgumentError("path", f"index holds {count} rows, the repository {len(repo)}")
    idx.count = count
    idx.capacity = idx.index.get_max_elements()

    def replace(prev: _AnnIndex | None, r: Repository) -> _AnnIndex:
        return idx

    repo.derived("hnsw", replace)


register_index("hnsw", search)
