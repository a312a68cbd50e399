"""hnswlib adapter: the approximate ``backend="hnsw"`` of :func:`retrieve`.

One HNSW index (inner-product space, labels = row indices) is attached to each
repository *arena* and grown incrementally: a search on version ``n`` first adds
the arena's rows ``[indexed, n)`` (rows below the arena length never change), so
the index is never rebuilt; capacity doubles with ``resize_index``.

Version bound: the index may hold rows newer than the version asked about
(``label >= n``) — they must never be returned. When it holds none and no tenant
filter is given, a plain ``knn_query`` runs (the fast path: querying the newest
version). Otherwise the search over-fetches ``max(c·k', 2k' + 16)`` neighbours and
drops labels ``>= n`` / of other tenants; only queries left with fewer than ``k'`` rows
fall back to hnswlib's ``filter=`` callable, which is exact but calls Python for
every visited node (slow, so it is the last resort, not the default).

Re-score: hnswlib proposes ``c·k'`` candidates (``HnswParams.rescore``, the over-fetch
factor ``c``) and the C gather kernel scores them exactly in float32, the same bits as
the exact backends' scores, ties to the lower row index; with ``ef >= n`` and
``c·k' >= n`` the result is the exact top-k. hnswlib's own ``1 - distance`` loses the
low bits of scores near 1, which is what mis-orders near-ties without it.

The index lives in the repository's derived data (:meth:`Repository.derived`, key
``"hnsw"``): the arena lock is held only to find or create it; rows are added under
the index's own lock, so a long build does not hold up appends to the repository.

A store saves the index with a snapshot and loads it back (:func:`save_index`,
:func:`load_index`: the header, labels, parameters and sampled rows are checked before
it is trusted; :mod:`.store` checksums the file first).

Picking ``ef``: recall depends on the data (1M perturbed-MiniLM rows need a far larger
``ef`` for 0.99 than 200k do), so :func:`tune_ef` measures it instead of guessing:
the smallest ``ef`` whose recall@k against the exact float32 top-k of sample queries
reaches a target.

Importing this module registers the name ``"hnsw"`` with
:func:`~intercascade_core.core.retrieve.register_index` (the package root imports it,
so the name always works); hnswlib itself is imported lazily, on the first search
(it is an adapter dependency, not a core one).
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..core import _topk_numpy
from ..core.repository import Repository, unit_rows
from ..core.retrieve import register_index, retrieve
from ..core.retrieve import rescore as rescore_rows
from ..errors import InvalidArgumentError

__all__ = [
    "DEFAULT_PARAMS",
    "EfChoice",
    "HnswParams",
    "ensure_index",
    "has_index",
    "index_stats",
    "load_index",
    "save_index",
    "search",
    "tune_ef",
]


@dataclass(frozen=True, slots=True)
class HnswParams:
    """Index parameters: graph degree ``M``, build breadth ``ef_construction``,
    default search breadth ``ef`` (raised to ``k`` when smaller), build seed, build
    threads, and ``rescore``: the search over-fetches ``rescore·k`` candidates and
    re-scores them exactly in float32 (0: hnswlib's own scores, ``k`` candidates)."""

    # 32 / 200: on the 1M perturbed-MiniLM bench set, recall@5 0.99 at ef=96 (0.18-0.22 ms p50)
    # where 16 / 100 stalls at 0.984 (ef=1024); the build costs ~400 CPU-s on 2 threads
    # (~3.5 min idle), the index file 1728 MiB vs 1607 (bench/results/retrieval.md)
    M: int = 32
    ef_construction: int = 200
    # 128: recall@5 0.992 at 0.19-0.25 ms p50 there (with M / ef_construction above)
    ef: int = 128
    seed: int = 100
    threads: int = 2
    # 4: the exact re-score of 4k rows costs ~µs beside the graph walk (bench_retrieve)
    rescore: int = 4


DEFAULT_PARAMS = HnswParams()


class _AnnIndex:
    def __init__(self, dim: int, params: HnswParams, *, init: bool = True) -> None:
        """An empty index, or with ``init=False`` one for ``load_index`` to fill."""
        try:
            import hnswlib
        except ImportError as exc:  # pragma: no cover - hnswlib is a core dependency
            raise ImportError("backend='hnsw' needs hnswlib: pip install hnswlib") from exc
        self.params = params
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.capacity = 1024 if init else 0
        if init:
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
    rescore: int | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Approximate top-``k`` of ``repo`` (rows ``< len(repo)``, of ``tenant_code`` when
    >= 0) for validated unit ``queries``. Results sorted by (score desc, index asc).

    ``rescore`` (default ``params.rescore``) is the over-fetch factor ``c``: hnswlib
    proposes ``c·k'`` candidates and they are re-scored exactly in float32
    (:func:`~intercascade_core.core.retrieve.rescore`), so scores and tie order are the
    exact backends'; ``0`` returns hnswlib's own ``1 - distance``."""
    if ef is not None and (isinstance(ef, bool) or not isinstance(ef, int) or ef < 1):
        raise InvalidArgumentError("ef", f"must be a positive int, got {ef!r}")
    bad_c = isinstance(rescore, bool) or not isinstance(rescore, int) or rescore < 0
    if rescore is not None and bad_c:
        raise InvalidArgumentError("rescore", f"must be an int >= 0, got {rescore!r}")
    n, m = len(repo), queries.shape[0]
    idx = ensure_index(repo)
    c = idx.params.rescore if rescore is None else rescore
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

    # per query: candidate labels and hnswlib's scores for them (rows < n of the tenant)
    found: list[tuple[np.ndarray, np.ndarray]] = []
    with idx.lock:
        total = idx.count
        if codes is None and total == n:  # newest version, no tenant: plain search
            fetch = min(total, max(kk, c * kk))
            idx.index.set_ef(max(ef_q, fetch))
            labels, dist = _knn(idx, repo, queries, fetch)
            labels = labels.astype(np.int64)
            if c > 0:  # one gather for the whole batch (every query has `fetch` labels)
                scores = rescore_rows(repo.vectors, queries, np.ascontiguousarray(labels))
                for j in range(m):
                    out_i[j], out_s[j] = _sorted(labels[j], scores[j], kk)
                return out_i, out_s
            for j in range(m):
                out_i[j], out_s[j] = _sorted(labels[j], (1 - dist[j]).astype(np.float32), kk)
            return out_i, out_s
        fetch = min(total, max(c * kk, 2 * kk + 16))
        idx.index.set_ef(max(ef_q, fetch))
        labels, dist = _knn(idx, repo, queries, fetch)
        labels = labels.astype(np.int64)
        short = []
        for j in range(m):
            good = ok(labels[j])
            if np.count_nonzero(good) >= kk:
                found.append((labels[j][good], (1 - dist[j][good]).astype(np.float32)))
            else:
                found.append((labels[j][:0], dist[j][:0].astype(np.float32)))
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
                found[j] = (lab[0].astype(np.int64), (1 - dis[0]).astype(np.float32))
    for j, (lab, sc) in enumerate(found):  # rows < n never change: no lock needed
        if c > 0:
            sc = rescore_rows(repo.vectors, queries[j : j + 1], lab[None])[0]
        out_i[j], out_s[j] = _sorted(lab, sc, kk)
    return out_i, out_s


@dataclass(frozen=True, slots=True)
class EfChoice:
    """What :func:`tune_ef` measured: ``ef`` to search with, its ``recall`` on the
    sample, whether it ``met`` the target, and the recall of every ``ef`` tried."""

    ef: int
    recall: float
    met: bool
    curve: tuple[tuple[int, float], ...]


def tune_ef(
    repo: Repository,
    queries: npt.NDArray[np.float32],
    k: int,
    target: float,
    *,
    efs: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048),
    rescore: int | None = None,
) -> EfChoice:
    """The smallest ``ef`` of ``efs`` (tried in increasing order, stopping at the first
    that meets it) whose recall@``k`` on ``queries`` reaches ``target``, measured against
    the exact float32 top-``k`` of the same queries, searching as :func:`search` does
    with ``rescore``. When none reaches it: the largest ``ef``, ``met=False``.
    ``queries`` should look like the traffic (recall is a property of the data, not of
    the index alone); the exact scan costs one pass over ``repo`` per 64-query batch."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise InvalidArgumentError("target", f"must be a recall in (0, 1], got {target!r}")
    if (
        not efs
        or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in efs)
        or list(efs) != sorted(set(efs))
    ):
        raise InvalidArgumentError("efs", f"must be increasing positive ints, got {efs!r}")
    q = unit_rows(queries, repo.dim, argument="queries")
    if q.shape[0] == 0:
        raise InvalidArgumentError("queries", "need at least one sample query")
    truth = retrieve(repo, q, k, scan="f32").indices
    want = [set(row.tolist()) for row in truth]
    slots = max(1, truth.size)
    curve: list[tuple[int, float]] = []
    for ef in efs:
        got, _ = search(repo, q, k, ef=ef, rescore=rescore)
        hits = sum(len(w.intersection(g.tolist())) for w, g in zip(want, got, strict=True))
        curve.append((ef, hits / slots))
        if hits / slots >= target:
            return EfChoice(ef, hits / slots, True, tuple(curve))
    return EfChoice(efs[-1], curve[-1][1], False, tuple(curve))


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


def save_index(repo: Repository, path: str | os.PathLike[str]) -> dict[str, int]:
    """Write the arena's HNSW index (grown to ``len(repo)``) to ``path`` (hnswlib format,
    fsynced) and return what :func:`load_index` checks it against: ``rows``, ``dim``,
    ``M``, ``ef_construction`` (plus ``ef`` and ``seed``, restored on load). Refuses an
    index that already holds rows newer than ``repo`` (an older version's file would
    hold rows that are not in it)."""
    idx = ensure_index(repo)
    with idx.lock:
        if idx.count != len(repo):
            raise InvalidArgumentError(
                "repo", f"the arena's index holds {idx.count} rows, this version {len(repo)}"
            )
        idx.index.save_index(os.fspath(path))
        p = idx.params
        meta = {"rows": idx.count, "dim": repo.dim, "M": p.M, "ef_construction": p.ef_construction,
                "ef": p.ef, "seed": p.seed}
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return meta


def has_index(repo: Repository) -> bool:
    """Whether ``repo``'s arena holds an HNSW index (built by a search or loaded)."""
    return repo.derived("hnsw", _peek) is not None


# hnswlib's file header (hnswalg.h saveIndex): offsetLevel0, max_elements, count,
# size_data_per_element, label_offset, offsetData (size_t); maxlevel, enterpoint (int);
# maxM, maxM0, M (size_t); mult (double); ef_construction (size_t)
_HEADER = struct.Struct("<6Qii3QdQ")


def _check_header(path: str, dim: int, rows: int, params: HnswParams) -> None:
    """hnswlib trusts its file: a wrong dimension loads silently and reads past its
    rows. Check the header against what the index must be before hnswlib sees it."""

    def bad(what: str) -> InvalidArgumentError:
        return InvalidArgumentError("path", f"{path}: {what}")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_HEADER.size)
    if len(head) != _HEADER.size:
        raise bad("shorter than an hnswlib header")
    (off0, max_el, count, per_el, label_off, off_data, level, enter, max_m, max_m0, m,
     _mult, ef_c) = _HEADER.unpack(head)
    links0 = max_m0 * 4 + 4
    if count != rows:
        raise bad(f"index holds {count} rows, expected {rows}")
    if m != params.M or ef_c != params.ef_construction or max_m != m or max_m0 != 2 * m:
        raise bad(f"built with M={m}, ef_construction={ef_c}; expected M={params.M}, "
                  f"ef_construction={params.ef_construction}")
    if (off0, off_data, label_off, per_el) != (0, links0, links0 + 4 * dim, links0 + 4 * dim + 8):
        raise bad(f"row layout is not that of {dim}-dimensional inner-product rows")
    if not (count <= max_el <= 1 << 40 and -1 <= level <= 64 and (count == 0 or 0 <= enter < count)):
        raise bad("implausible header")
    if size < _HEADER.size + count * (per_el + 4):
        raise bad(f"{size} bytes, too short for {count} rows")


#: rows of a loaded index compared with the repository's before it is trusted
CHECK_ROWS = 64


def load_index(
    repo: Repository,
    path: str | os.PathLike[str],
    params: HnswParams | None = None,
    *,
    rows: int | None = None,
) -> None:
    """Attach an index saved by :func:`save_index` to ``repo``'s arena, replacing any.

    It must hold exactly ``rows`` rows (default: ``len(repo)``; at most ``len(repo)``),
    labelled ``0..rows-1``, of ``repo.dim`` dimensions, built with ``params`` (default
    :data:`DEFAULT_PARAMS`: ``M`` and ``ef_construction`` must match), and sampled rows
    must equal the repository's. The header is checked before hnswlib reads the file;
    anything else raises :class:`InvalidArgumentError` and attaches nothing. (Checksums
    are the caller's business: hnswlib cannot be trusted with a damaged file.)"""
    params = params or DEFAULT_PARAMS
    want = len(repo) if rows is None else rows
    if want > len(repo):
        raise InvalidArgumentError("rows", f"index of {want} rows for a repository of {len(repo)}")
    p = os.fspath(path)
    _check_header(p, repo.dim, want, params)
    idx = _AnnIndex(repo.dim, params, init=False)
    try:
        idx.index.load_index(p, max_elements=0)
    except RuntimeError as e:
        raise InvalidArgumentError("path", f"{p}: hnswlib cannot load it ({e})") from None
    count = idx.index.get_current_count()
    if count != want or idx.index.dim != repo.dim:
        raise InvalidArgumentError("path", f"{p}: index holds {count} rows of dim {idx.index.dim}")
    if want:
        labels = np.sort(np.asarray(idx.index.get_ids_list(), dtype=np.int64))
        if not np.array_equal(labels, np.arange(want, dtype=np.int64)):
            raise InvalidArgumentError("path", f"{p}: labels are not the rows 0..{want - 1}")
        sample = np.unique(np.r_[np.arange(0, want, max(1, want // CHECK_ROWS))[:CHECK_ROWS], want - 1])
        got = np.asarray(idx.index.get_items(sample, return_type="numpy"), dtype=np.float32)
        if not np.array_equal(got, np.asarray(repo.vectors[sample])):
            raise InvalidArgumentError("path", f"{p}: sampled rows differ from the repository's")
    idx.count = count
    idx.capacity = idx.index.get_max_elements()

    def replace(prev: _AnnIndex | None, r: Repository) -> _AnnIndex:
        return idx

    repo.derived("hnsw", replace)


register_index("hnsw", search)
