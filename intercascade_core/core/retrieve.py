"""Top-k cosine retrieval over a :class:`~intercascade_core.core.repository.Repository`.

``retrieve(repo, query_vectors, k, *, backend="exact", tenant=None)`` returns a
:class:`TopK` with ``indices`` (int64, ``(m, k')``) and ``scores`` (float32,
descending), ``k' = min(k, len(repo))`` (with ``tenant``, ``min(k, #rows of that
tenant)``). Equal scores go to the lower row index. A 1-D query is one row.

Backends, by name:

* ``"exact"`` — the C extension ``intercascade_core.core._simd`` (SIMD, runtime CPU
  dispatch). With ``scan="auto"`` (default) repositories of at least
  :data:`INT8_MIN_ROWS` rows are scanned through an int8 copy of the vectors (derived
  per arena with :meth:`Repository.derived` and extended in place as versions grow;
  queries are quantised too, dots are exact integers — AVX-512 VNNI when available),
  and every row that the scan's error bound cannot exclude is re-scored in float32
  with the float32 scan's own code, so the result is *identical* to ``scan="f32"``
  while reading 4× fewer bytes. A store persists the copy and hands it back
  (:func:`int8_scan_copy`, :func:`attach_int8_scan_copy`, which checks it first), so a
  reopened repository does not rebuild it. Without the extension (not built, or
  ``INTERCASCADE_NO_EXT=1``) its numpy twin answers, logged once at INFO.
* ``"numpy"`` — the pure reference (:mod:`._topk_numpy`), the extension's twin.
* a registered index name — ``"hnsw"`` (approximate, hnswlib,
  :mod:`~intercascade_core.storage.hnsw`) is registered when the package is imported.

or by object: any :class:`~intercascade_core.core.protocols.SearchBackend` (e.g. a
:class:`~intercascade_core.storage.pgvector.PgVectorStore`) answers from the strategies
it holds itself; its ``indices`` are its own ids, ``repo`` is not searched.

Why a registry of named indexes: the core may not import hnswlib or anything in
``storage/``, yet ``backend="hnsw"`` must keep working wherever a name is accepted
(``retrieve``, ``CascadeConfig``, config files, the CLI). An index over a
repository's own rows (labels = row indices, version-bounded, tenant-filtered) is a
different thing from a SearchBackend (its own rows and ids), so it gets its own door:
:func:`register_index`, one dict, no plugin machinery. The adapter registers itself
at import and imports its library lazily, on first search.

Query vectors follow :func:`~intercascade_core.core.repository.unit_rows`: float32,
finite, unit norm within ``NORM_TOLERANCE`` (renormalised), otherwise
:class:`~intercascade_core.errors.InvalidArgumentError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError
from . import _topk_numpy
from .protocols import SearchBackend, TopK
from .repository import Repository, unit_rows

__all__ = [
    "INT8_CHECK_ROWS",
    "INT8_MAX_DIM",
    "INT8_MIN_ROWS",
    "RepositoryIndex",
    "TopK",
    "attach_int8_scan_copy",
    "backend_names",
    "check_backend",
    "extension_available",
    "int8_scan_copy",
    "register_index",
    "rescore",
    "retrieve",
]

log = logging.getLogger(__name__)

Scan = Literal["auto", "f32", "int8"]
_SCANS = ("auto", "f32", "int8")
_BUILT_IN = ("exact", "numpy")

#: the int8 kernel's int32 accumulators are exact up to this dimension (2**31 // 127**2).
INT8_MAX_DIM = 2**31 // 127**2

#: ``scan="auto"`` uses the int8 scan copy from this many rows on.
INT8_MIN_ROWS = 1 << 14

_QUANT_BLOCK = 1 << 16

# The C extension, as markupsafe loads its speedups: one guarded import, the numpy
# twin (same call, same result) when it fails. INTERCASCADE_NO_EXT=1, read here once,
# forces the twin. Tests swap the handle to run both implementations.
_ext: ModuleType | None
_no_ext_reason = ""
if os.environ.get("INTERCASCADE_NO_EXT") == "1":
    _ext, _no_ext_reason = None, "disabled by INTERCASCADE_NO_EXT=1"
else:
    try:
        from . import _simd as _ext
    except ImportError:
        _ext, _no_ext_reason = None, "not built"
_fallback_logged = False


def rescore(
    vectors: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
) -> npt.NDArray[np.float32]:
    """Exact float32 scores ``(m, c)`` of candidate ``rows`` (int64 ``(m, c)``, each in
    ``[0, len(vectors))``) against ``queries`` ``(m, d)``: the re-score step of the
    registered approximate indexes. The extension's ``gather`` or its numpy twin (the
    same bits on every CPU), so an index's scores do not depend on where it runs."""
    ext = _ext
    if ext is None:
        return _topk_numpy.gather(vectors, queries, rows)
    return ext.gather(  # type: ignore[no-any-return]
        np.ascontiguousarray(vectors), np.ascontiguousarray(queries), np.ascontiguousarray(rows)
    )


def extension_available() -> bool:
    """True when the C extension is built and not disabled by ``INTERCASCADE_NO_EXT=1``."""
    return _ext is not None


class RepositoryIndex(Protocol):
    """A named index over a repository's own rows (see :func:`register_index`).

    Called with validated unit ``queries`` (m, dim), ``k >= 1``, ``tenant_code`` (-1:
    every tenant) and ``ef`` (search breadth, None: the index's default); returns
    ``(indices int64, scores float32)`` of shape ``(m, k')``, row indices ``<
    len(repo)`` of that tenant only, sorted by (score desc, index asc).
    """

    def __call__(
        self,
        repo: Repository,
        queries: npt.NDArray[np.float32],
        k: int,
        *,
        tenant_code: int,
        ef: int | None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...


_INDEXES: dict[str, RepositoryIndex] = {}


def register_index(name: str, search: RepositoryIndex) -> None:
    """Make ``backend=name`` search a repository through ``search`` (a later
    registration of the same name replaces the earlier one)."""
    if not isinstance(name, str) or not name or name in _BUILT_IN:
        raise InvalidArgumentError("name", f"must be a new non-empty str, got {name!r}")
    if not callable(search):
        raise InvalidArgumentError("search", f"must be callable, got {type(search).__name__}")
    _INDEXES[name] = search


def backend_names() -> tuple[str, ...]:
    """The names ``backend=`` accepts now: the built-in scans and registered indexes."""
    return _BUILT_IN + tuple(_INDEXES)


def check_backend(backend: Any) -> str | SearchBackend:
    """``backend`` if it is a known name or a :class:`SearchBackend`, else
    :class:`InvalidArgumentError` (for configs that are checked before any search)."""
    if isinstance(backend, str):
        if backend not in _BUILT_IN and backend not in _INDEXES:
            raise InvalidArgumentError(
                "backend",
                f"must be one of {backend_names()} or a SearchBackend, got {backend!r}",
            )
        return backend
    if not isinstance(backend, SearchBackend):
        raise InvalidArgumentError(
            "backend",
            f"must be one of {backend_names()} or a SearchBackend (a .search(query_vectors, "
            f"k, *, tenant=None) method and a .dim), got {type(backend).__name__}",
        )
    return backend


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidArgumentError("k", f"must be an int, got {type(k).__name__}")
    if k < 0:
        raise InvalidArgumentError("k", f"must be >= 0, got {k}")
    return int(k)


@dataclass(frozen=True, slots=True)
class _Int8Copy:
    """The int8 scan copy of an arena's first ``rows`` rows (buffers preallocated
    past them and filled in place as later versions extend the copy)."""

    packed: np.ndarray  # uint8 (blocks, ceil(d/4), 16, 4)
    scales: np.ndarray  # float32 (blocks * 16,)
    errs: np.ndarray  # float32 (blocks * 16,)
    rows: int


def _quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``x`` (float32) as ``(q int8, s float32, err float32)``; see :func:`_extend_int8`."""
    s = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)
    q = np.clip(np.rint(x / s[:, None]), -127, 127).astype(np.int8)
    resid = x.astype(np.float64) - q.astype(np.float64) * s.astype(np.float64)[:, None]
    e = np.sqrt(np.einsum("ij,ij->i", resid, resid)) * (1 + 1e-9)
    return q, s, np.nextafter(e.astype(np.float32), np.float32(np.inf))


def _extend_int8(prev: _Int8Copy | None, repo: Repository) -> _Int8Copy:
    """``prev`` extended to ``len(repo)`` rows (run under the arena lock).

    Per-row symmetric quantisation ``q = rint(x / s)``, ``s = max|x| / 127``; ``err``
    is an upper bound on ``||x - s·q||₂`` (float64, rounded up), so
    ``|x·y - s·(q·y)| <= err·||y||`` (Cauchy–Schwarz). Stored for the VNNI kernel as
    ``q + 128`` (uint8) in blocks of 16 rows × 4 dimensions; ``scales``/``errs``
    padded to whole blocks. A copy handed in by :func:`attach_int8_scan_copy` (a
    read-only memory map) is copied into memory by its first extension.
    """
    n, d = len(repo), repo.dim
    if prev is not None and prev.rows >= n:
        return prev
    d4 = -(-d // 4)
    nb = -(-n // 16)
    if prev is None or prev.packed.shape[0] < nb or not prev.packed.flags.writeable:
        old_cap = prev.packed.shape[0] if prev is not None else 0
        cap = max(nb, 2 * old_cap if old_cap < nb else old_cap)  # doubling
        pk = np.full((cap, d4, 16, 4), 128, dtype=np.uint8)
        sc = np.zeros(cap * 16, dtype=np.float32)
        er = np.zeros(cap * 16, dtype=np.float32)
        done = 0
        if prev is not None:
            done = prev.rows
            pk[: prev.packed.shape[0]] = prev.packed
            sc[: prev.scales.shape[0]], er[: prev.errs.shape[0]] = prev.scales, prev.errs
        prev = _Int8Copy(pk, sc, er, done)
    pk, sc, er = prev.packed, prev.scales, prev.errs
    vec = repo.vectors
    start = prev.rows // 16 * 16  # re-pack the partly filled block (its rows never change)
    for a in range(start, n, _QUANT_BLOCK):
        b = min(n, a + _QUANT_BLOCK)
        q, s, e = _quantise(vec[a:b])
        sc[a:b] = s
        er[a:b] = e
        rows = np.full((-(-(b - a) // 16) * 16, d4 * 4), 128, dtype=np.uint8)
        rows[: b - a, :d] = (q.astype(np.int16) + 128).astype(np.uint8)
        blocks = rows.reshape(-1, 16, d4, 4).transpose(0, 2, 1, 3)
        pk[a // 16 : a // 16 + blocks.shape[0]] = blocks
    return dataclasses.replace(prev, rows=n)


def _int8_copy(repo: Repository) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The int8 scan copy's ``(packed, scales, errs)`` for the first ``len(repo)`` rows."""
    copy = repo.derived("int8", _extend_int8)
    nb = -(-len(repo) // 16)
    return copy.packed[:nb], copy.scales[: nb * 16], copy.errs[: nb * 16]


def int8_scan_copy(
    repo: Repository,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The int8 scan copy of ``repo``'s rows as ``(packed, scales, errs)``, built or
    extended first if needed (what a store persists; hand it back with
    :func:`attach_int8_scan_copy`). Shapes: ``(ceil(n/16), ceil(dim/4), 16, 4)``
    uint8 and ``(16·ceil(n/16),)`` float32 twice."""
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    if repo.dim > INT8_MAX_DIM:
        raise InvalidArgumentError("repo", f"the int8 scan supports dim <= {INT8_MAX_DIM}, got {repo.dim}")
    return _int8_copy(repo)


#: rows of a handed-in scan copy re-quantised and compared before it is trusted
INT8_CHECK_ROWS = 64


def attach_int8_scan_copy(
    repo: Repository,
    packed: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    errs: npt.NDArray[np.float32],
) -> None:
    """Hand in a scan copy of ``repo``'s rows kept elsewhere (a store maps it from its
    snapshot), so the first ``scan="int8"``/``"auto"`` query does not rebuild it.

    A wrong copy would silently drop true neighbours, so it is checked first, in
    O(n) vectorised work plus O(:data:`INT8_CHECK_ROWS`·dim): exact shapes and dtypes,
    C order, finite positive scales, error bounds within the quantisation limit, the
    padding of the last block, and sampled rows (first, last, spread) re-quantised and
    compared (the scale and codes bit for bit; the stored error must still bound the
    true residual). Anything else raises :class:`InvalidArgumentError` and attaches
    nothing. Checksums of the files are the store's business. A copy already held by
    the arena that covers as many rows is kept.
    """
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    n, d = len(repo), repo.dim
    _check_int8_copy(repo, packed, scales, errs)
    given = _Int8Copy(packed, scales, errs, n)

    def keep_longer(prev: _Int8Copy | None, r: Repository) -> _Int8Copy:
        return prev if prev is not None and prev.rows >= n else given

    if n and d <= INT8_MAX_DIM:
        repo.derived("int8", keep_longer)


def _check_int8_copy(repo: Repository, packed: Any, scales: Any, errs: Any) -> None:
    n, d = len(repo), repo.dim
    nb, d4 = -(-n // 16), -(-d // 4)

    def bad(what: str) -> InvalidArgumentError:
        return InvalidArgumentError("packed", f"int8 scan copy for {n} rows of dim {d}: {what}")

    if d > INT8_MAX_DIM:
        raise bad(f"the int8 scan supports dim <= {INT8_MAX_DIM}")
    for name, arr, dtype, shape in (
        ("packed", packed, np.uint8, (nb, d4, 16, 4)),
        ("scales", scales, np.float32, (nb * 16,)),
        ("errs", errs, np.float32, (nb * 16,)),
    ):
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape:
            raise bad(f"{name} must be {np.dtype(dtype)} {shape}, got {_describe(arr)}")
        if not arr.flags.c_contiguous:
            raise bad(f"{name} must be C-contiguous")
    if n == 0:
        return
    s, e = scales[:n], errs[:n]
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise bad("scales must be finite and positive")
    # each coordinate's residual is at most s/2: ||x - s·q|| <= s·sqrt(d)/2
    if not (np.isfinite(e).all() and (e >= 0).all() and (e <= s * np.float32(np.sqrt(d) / 2 * 1.01) + 1e-30).all()):
        raise bad("error bounds out of range")
    pad = n - (nb - 1) * 16
    if (packed[-1, :, pad:, :] != 128).any() or (scales[n:] != 0).any() or (errs[n:] != 0).any():
        raise bad("padding of the last block is not empty")
    if d4 * 4 > d and (packed[:, d4 - 1, :, d - (d4 - 1) * 4 :] != 128).any():
        raise bad("padding of the last dimensions is not empty")
    step = max(1, n // INT8_CHECK_ROWS)
    rows = np.unique(np.r_[np.arange(0, n, step)[:INT8_CHECK_ROWS], n - 1])
    q, s_ref, e_ref = _quantise(np.asarray(repo.vectors[rows], dtype=np.float32))
    stored_q = packed[rows // 16, :, rows % 16, :].reshape(len(rows), d4 * 4)[:, :d]
    if not np.array_equal(stored_q.astype(np.int16) - 128, q.astype(np.int16)):
        raise bad("sampled rows do not match the vectors (codes)")
    if not np.array_equal(scales[rows], s_ref):
        raise bad("sampled rows do not match the vectors (scales)")
    # the stored bound must still bound the residual (summation order may differ by ulps)
    if (errs[rows] < e_ref * np.float32(1 - 1e-6)).any():
        raise bad("sampled rows' error bounds are too small")


def _describe(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def retrieve(
    repo: Repository | SearchBackend,
    query_vectors: npt.NDArray[np.float32],
    k: int,
    *,
    backend: str | SearchBackend = "exact",
    tenant: str | None = None,
    scan: Scan = "auto",
    ef: int | None = None,
    threads: int = 0,
) -> TopK:
    """Top-``k`` entries of ``repo`` by cosine similarity for each query row.

    ``backend``: a name (:func:`backend_names`) or a
    :class:`~intercascade_core.core.protocols.SearchBackend`, which searches what it
    holds (``repo`` — a repository or the backend itself — must share its ``dim``).
    ``scan`` picks the exact backend's scan ("f32", "int8" or "auto"); ``ef`` is a
    named index's search breadth (hnsw: default ``max(128, k)``); ``threads`` (0 =
    auto, 1 or 2) is the exact backend's thread count. See the module docstring.
    """
    backend = check_backend(backend)
    if scan not in _SCANS:
        raise InvalidArgumentError("scan", f"must be one of {_SCANS}, got {scan!r}")
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise InvalidArgumentError(
            "tenant", f"must be a non-empty str, or None for every row, got {tenant!r:.40}"
        )
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= 2:
        raise InvalidArgumentError("threads", f"must be 0 (auto), 1 or 2, got {threads!r}")
    if not isinstance(backend, str):
        return _search_backend(backend, repo, query_vectors, _check_k(k), tenant, ef)
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    k = _check_k(k)
    q = unit_rows(query_vectors, repo.dim, argument="query_vectors")
    m, n = q.shape[0], len(repo)
    code = -1
    if tenant is not None:
        code = repo.tenant_code(tenant)
        if code < 0:
            n = 0
    if k == 0 or n == 0 or m == 0:
        return TopK(np.empty((m, 0), np.int64), np.empty((m, 0), np.float32))
    index = _INDEXES.get(backend)
    if index is not None:
        idx, sc = index(repo, q, k, tenant_code=code, ef=ef)
        return TopK(idx, sc)

    codes = None if tenant is None else repo.tenant_codes
    ext = _ext
    if backend == "numpy" or ext is None:
        if backend == "exact":
            _log_fallback()
        idx, sc = _topk_numpy.topk(repo.vectors, q, k, codes, code)
        return TopK(idx, sc)
    k = min(k, len(repo))  # the C argument is a C long: a huge k must not overflow it
    # the int8 kernel sums int8 products in int32: exact only up to 2**31 / 127**2 dims
    int8_ok = repo.dim <= INT8_MAX_DIM
    if scan == "int8" and not int8_ok:
        raise InvalidArgumentError("scan", f"the int8 scan supports dim <= {INT8_MAX_DIM}, got {repo.dim}")
    use_int8 = scan == "int8" or (scan == "auto" and int8_ok and len(repo) >= INT8_MIN_ROWS)
    if use_int8:
        qv, s, e = _int8_copy(repo)
        idx, sc, _ = ext.topk_int8(repo.vectors, qv, s, e, q, k, codes, code, threads=threads)
    else:
        idx, sc = ext.topk(repo.vectors, q, k, codes, code, threads=threads)
    return TopK(idx, sc)


def _search_backend(
    backend: SearchBackend,
    repo: Any,
    query_vectors: Any,
    k: int,
    tenant: str | None,
    ef: int | None,
) -> TopK:
    """Validate, then let ``backend`` answer; check the shape of what it returns."""
    if ef is not None:
        raise InvalidArgumentError(
            "ef", "applies to named indexes only; set a SearchBackend's search breadth on it"
        )
    dim = backend.dim
    if repo is not backend and not isinstance(repo, Repository):
        raise InvalidArgumentError(
            "repo", f"must be a Repository or the backend itself, got {type(repo).__name__}"
        )
    if repo.dim != dim:
        raise InvalidArgumentError("repo", f"has dim {repo.dim}, the backend {dim}")
    q = unit_rows(query_vectors, dim, argument="query_vectors")
    top = backend.search(q, k, tenant=tenant)
    if not isinstance(top, TopK) or top.indices.shape[0] != q.shape[0]:
        raise InvalidArgumentError(
            "backend",
            f"{type(backend).__name__}.search must return a TopK with one row per query "
            f"({q.shape[0]}), got {top!r:.120}",
        )
    return top


_log_lock = threading.Lock()


def _log_fallback() -> None:
    global _fallback_logged
    with _log_lock:
        if not _fallback_logged:
            _fallback_logged = True
            why = _no_ext_reason or "not loaded"
            log.info("intercascade_core.core._simd is %s; backend='exact' uses the numpy path", why)
