"""Top-k cosine retrieval over a :class:`~intercascade_core.core.repository.Repository`.

``retrieve(repo, query_vectors, k, *, backend="exact", tenant=None)`` returns a
:class:`TopK` with ``indices`` (int64, ``(m, k')``) and ``scores`` (float32,
descending), ``k' = min(k, len(repo))`` (with ``tenant``, ``min(k, #rows of that
tenant)``). Equal scores go to the lower row index. A 1-D query is one row.

Backends:

* ``"exact"`` — the C extension ``intercascade_core.core._simd`` (SIMD, runtime CPU
  dispatch). With ``scan="auto"`` (default) repositories of at least
  :data:`INT8_MIN_ROWS` rows are scanned through an int8 copy of the vectors (built
  lazily per arena and extended in place as versions grow; queries are quantised
  too, dots are exact integers — AVX-512 VNNI when available), and every row that
  the scan's error bound cannot exclude is re-scored in float32 with the float32
  scan's own code, so the result is *identical* to ``scan="f32"`` while reading 4×
  fewer bytes. Falls back to ``"numpy"`` (logged once at INFO) when the extension
  is not built or ``INTERCASCADE_NO_EXT=1``.
* ``"numpy"`` — the pure reference (:mod:`._topk_numpy`).
* ``"hnsw"`` — approximate, hnswlib (:mod:`._ann`), grown incrementally with the
  repository; answers only with rows of the version asked about.
* ``"pgvector"`` — ``repo`` is a :class:`~intercascade_core.storage.pgvector.PgVectorStore`;
  the server searches (``ef`` becomes ``ef_search``) and ``indices`` are its row ids.

Query vectors follow :func:`~intercascade_core.core.repository.update`'s rule: float32,
finite, unit norm within ``NORM_TOLERANCE`` (renormalised), otherwise
:class:`~intercascade_core.errors.InvalidArgumentError`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError
from . import _topk_numpy
from .repository import NORM_TOLERANCE, Repository

__all__ = ["TopK", "retrieve", "extension_available", "INT8_MIN_ROWS"]

log = logging.getLogger(__name__)

Backend = Literal["exact", "numpy", "hnsw", "pgvector"]
Scan = Literal["auto", "f32", "int8"]
_BACKENDS = ("exact", "numpy", "hnsw", "pgvector")
_SCANS = ("auto", "f32", "int8")

#: the int8 kernel's int32 accumulators are exact up to this dimension (2**31 // 127**2).
INT8_MAX_DIM = 2**31 // 127**2

#: ``scan="auto"`` uses the int8 scan copy from this many rows on.
INT8_MIN_ROWS = 1 << 14

_QUANT_BLOCK = 1 << 16


def _load_ext() -> ModuleType | None:
    if os.environ.get("INTERCASCADE_NO_EXT") == "1":
        return None
    try:
        from . import _simd
    except ImportError:
        return None
    return _simd  # type: ignore[no-any-return]


_ext: ModuleType | None = _load_ext()
_fallback_logged = False


def extension_available() -> bool:
    """True when the C extension is built and not disabled by ``INTERCASCADE_NO_EXT=1``."""
    return _ext is not None


@dataclass(frozen=True, slots=True, eq=False)
class TopK:
    """Result of :func:`retrieve`: row ``i`` holds query ``i``'s best rows, best first."""

    indices: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        self.indices.flags.writeable = False
        self.scores.flags.writeable = False


def _check_queries(query_vectors: Any, dim: int) -> npt.NDArray[np.float32]:
    q = query_vectors
    if not isinstance(q, np.ndarray):
        raise InvalidArgumentError(
            "query_vectors", f"must be a numpy float32 array, got {type(q).__name__}"
        )
    if q.dtype != np.float32:
        raise InvalidArgumentError("query_vectors", f"must have dtype float32, got {q.dtype}")
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2 or q.shape[1] != dim:
        raise InvalidArgumentError(
            "query_vectors", f"must have shape (m, {dim}) or ({dim},), got {query_vectors.shape}"
        )
    if q.shape[0] == 0:
        return np.ascontiguousarray(q)
    sq = np.einsum("ij,ij->i", q, q, dtype=np.float64)
    if not np.isfinite(sq).all():  # NaN/inf in a row makes its float64 sum of squares non-finite
        raise InvalidArgumentError("query_vectors", "contains NaN or infinite values")
    norms = np.sqrt(sq)
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgumentError(
            "query_vectors",
            f"row {i} has L2 norm {norms[i]:.6g}; "
            f"queries must be unit-norm (within {NORM_TOLERANCE})",
        )
    return np.ascontiguousarray(q * (1.0 / norms).astype(np.float32)[:, None])


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidArgumentError("k", f"must be an int, got {type(k).__name__}")
    if k < 0:
        raise InvalidArgumentError("k", f"must be >= 0, got {k}")
    return int(k)


def _int8_copy(repo: Repository) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arena's int8 scan copy, extended (in place, append-only) to ``len(repo)``.

    Per-row symmetric quantisation ``q = rint(x / s)``, ``s = max|x| / 127``; ``err``
    is an upper bound on ``||x - s·q||₂`` (float64, rounded up), so
    ``|x·y - s·(q·y)| <= err·||y||`` (Cauchy–Schwarz). Stored for the VNNI kernel as
    ``q + 128`` (uint8) in blocks of 16 rows × 4 dimensions: shape
    ``(ceil(n/16), ceil(d/4), 16, 4)``; ``scales``/``errs`` padded to whole blocks.
    Returns ``(packed, scales, errs)`` for the first ``len(repo)`` rows.
    """
    arena = repo._arena
    n, d = len(repo), repo.dim
    d4 = -(-d // 4)
    nb = -(-n // 16)
    with arena.lock:
        cache = arena.cache.get("int8")
        if cache is None or cache[0].shape[0] < nb:
            cap = -(-arena.capacity // 16)
            pk = np.full((cap, d4, 16, 4), 128, dtype=np.uint8)
            sc = np.zeros(cap * 16, dtype=np.float32)
            er = np.zeros(cap * 16, dtype=np.float32)
            done = 0
            if cache is not None:
                done = cache[3]
                pk[: cache[0].shape[0]] = cache[0]
                sc[: cache[1].shape[0]], er[: cache[2].shape[0]] = cache[1], cache[2]
            cache = [pk, sc, er, done]
            arena.cache["int8"] = cache
        pk, sc, er, done = cache
        vec = arena.rw
        start = done // 16 * 16  # re-pack the partly filled block (its rows never change)
        for a in range(start, n, _QUANT_BLOCK):
            b = min(n, a + _QUANT_BLOCK)
            x = vec[a:b]
            s = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)
            q = np.clip(np.rint(x / s[:, None]), -127, 127).astype(np.int8)
            resid = x.astype(np.float64) - q.astype(np.float64) * s.astype(np.float64)[:, None]
            e = np.sqrt(np.einsum("ij,ij->i", resid, resid)) * (1 + 1e-9)
            sc[a:b] = s
            er[a:b] = np.nextafter(e.astype(np.float32), np.float32(np.inf))
            rows = np.full((-(-(b - a) // 16) * 16, d4 * 4), 128, dtype=np.uint8)
            rows[: b - a, :d] = (q.astype(np.int16) + 128).astype(np.uint8)
            blocks = rows.reshape(-1, 16, d4, 4).transpose(0, 2, 1, 3)
            pk[a // 16 : a // 16 + blocks.shape[0]] = blocks
        if n > done:
            cache[3] = n
        return pk[:nb], sc[: nb * 16], er[: nb * 16]


def retrieve(
    repo: Repository,
    query_vectors: npt.NDArray[np.float32],
    k: int,
    *,
    backend: Backend = "exact",
    tenant: str | None = None,
    scan: Scan = "auto",
    ef: int | None = None,
    threads: int = 0,
) -> TopK:
    """Top-``k`` entries of ``repo`` by cosine similarity for each query row.

    ``scan`` picks the exact backend's scan ("f32", "int8" or "auto"); ``ef`` is the
    hnsw search breadth (default ``max(128, k)``); ``threads`` (0 = auto, 1 or 2) is
    the exact backend's thread count. See the module docstring.
    """
    if backend not in _BACKENDS:
        raise InvalidArgumentError("backend", f"must be one of {_BACKENDS}, got {backend!r}")
    if backend == "pgvector":  # server-side search; indices are the server's row ids
        from ..storage.pgvector import PgVectorStore

        if not isinstance(repo, PgVectorStore):
            raise InvalidArgumentError(
                "repo", f"backend='pgvector' needs a PgVectorStore, got {type(repo).__name__}"
            )
        q = _check_queries(query_vectors, repo.dim)
        return repo.search(q, _check_k(k), tenant=tenant, ef_search=ef)
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    if scan not in _SCANS:
        raise InvalidArgumentError("scan", f"must be one of {_SCANS}, got {scan!r}")
    if tenant is not None and not isinstance(tenant, str):
        raise InvalidArgumentError("tenant", f"must be a str or None, got {type(tenant).__name__}")
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= 2:
        raise InvalidArgumentError("threads", f"must be 0 (auto), 1 or 2, got {threads!r}")
    k = _check_k(k)
    q = _check_queries(query_vectors, repo.dim)
    m, n = q.shape[0], len(repo)
    code = -1
    if tenant is not None:
        code = repo.tenant_code(tenant)
        if code < 0:
            n = 0
    if k == 0 or n == 0 or m == 0:
        return TopK(np.empty((m, 0), np.int64), np.empty((m, 0), np.float32))

    if backend == "hnsw":
        from ..storage import hnsw as _ann

        idx, sc = _ann.search(repo, q, k, tenant_code=code, ef=ef)
        return TopK(idx, sc)

    if backend == "exact" and _ext is None:
        _log_fallback()
        backend = "numpy"
    if backend == "numpy":
        allowed = None if tenant is None else repo.tenant_codes == code
        idx, sc = _topk_numpy.topk(repo.vectors, q, k, allowed)
        return TopK(idx, sc)

    assert _ext is not None
    codes = None if tenant is None else repo.tenant_codes
    k = min(k, len(repo))  # the C argument is a C long: a huge k must not overflow it
    # the int8 kernel sums int8 products in int32: exact only up to 2**31 / 127**2 dims
    int8_ok = repo.dim <= INT8_MAX_DIM
    if scan == "int8" and not int8_ok:
        raise InvalidArgumentError("scan", f"the int8 scan supports dim <= {INT8_MAX_DIM}, got {repo.dim}")
    use_int8 = scan == "int8" or (scan == "auto" and int8_ok and len(repo) >= INT8_MIN_ROWS)
    if use_int8:
        qv, s, e = _int8_copy(repo)
        idx, sc, _ = _ext.topk_int8(repo.vectors, qv, s, e, q, k, codes, code, threads=threads)
    else:
        idx, sc = _ext.topk(repo.vectors, q, k, codes, code, threads=threads)
    return TopK(idx, sc)


_log_lock = threading.Lock()


def _log_fallback() -> None:
    global _fallback_logged
    with _log_lock:
        if not _fallback_logged:
            _fallback_logged = True
            why = (
                "disabled by INTERCASCADE_NO_EXT=1"
                if os.environ.get("INTERCASCADE_NO_EXT") == "1"
                else "not built"
            )
            log.info("intercascade_core.core._simd is %s; backend='exact' uses the numpy path", why)
