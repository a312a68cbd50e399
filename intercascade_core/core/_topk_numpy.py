"""Pure-numpy cosine top-k: the reference implementation (the spec and the oracle),
and the twin of the C extension's ``topk`` (same arguments, same result), which
:mod:`.retrieve` falls back to when the extension is not there.

Order: scores descending; equal scores go to the **lower row index**. Rows are
scanned with one float32 matmul per block of queries (``queries @ vectors.T``) and
the k-th largest score ``t`` is found with ``np.partition``. BLAS does not give
bit-identical scores to identical rows (its kernels treat tile edges differently),
so the candidates — every row within the matmul's error bound ``2·d·2⁻²⁴`` of ``t``
(unit vectors) — are re-scored by :func:`gather` (the same operations for every row,
so duplicates tie exactly) and sorted by (score descending, index ascending).

:func:`gather` is the twin of the extension's ``gather``, bit for bit on every ISA:
float32 products taken exactly in float64, lane ``t mod 8`` summing its products in
dimension order, lanes added as ``((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))``, one rounding
to float32. A fixed order (not BLAS's, not numpy's pairwise sum) is what lets a C
kernel and numpy agree exactly.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["gather", "topk"]

# queries per matmul block: keeps the (block, n) score matrix near 64 MiB
_SCORE_BLOCK_ELEMS = 1 << 24


def gather(
    vectors: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
) -> npt.NDArray[np.float32]:
    """Scores of chosen rows: ``out[q, j] = vectors[rows[q, j]] · queries[q]`` as float32
    ``(m, c)`` for ``rows`` int64 ``(m, c)`` (indices assumed valid)."""
    m, c = rows.shape
    d = vectors.shape[1]
    prod = vectors[rows.reshape(-1)].astype(np.float64)
    prod *= np.repeat(queries.astype(np.float64), c, axis=0)  # exact: 24 + 24 bits < 53
    lanes = np.pad(prod, ((0, 0), (0, -d % 8))).reshape(m * c, (d + 7) // 8, 8)
    acc = np.zeros((m * c, 8), np.float64)
    for step in range(lanes.shape[1]):  # dimension order within each lane
        acc += lanes[:, step]
    half = acc[:, :4] + acc[:, 4:]
    quarter = half[:, :2] + half[:, 2:]
    out: npt.NDArray[np.float32] = (quarter[:, 0] + quarter[:, 1]).astype(np.float32)
    return out.reshape(m, c)


def _topk_row(
    s: npt.NDArray[np.float32],
    k: int,
    vectors: npt.NDArray[np.float32],
    query: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    n = s.shape[0]
    t = np.partition(s, n - k)[n - k]
    window = 2.0 * (vectors.shape[1] + 2) * 2.0**-24 * float(np.linalg.norm(query)) + 1e-30
    cand = np.flatnonzero(s >= t - window)
    exact = gather(vectors, query[None], cand[None].astype(np.int64))[0]
    exact[~np.isfinite(s[cand])] = -np.inf  # rows masked out by the caller stay out
    order = np.lexsort((cand, -exact))[:k]
    return cand[order].astype(np.int64, copy=False), exact[order]


def topk(
    vectors: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    k: int,
    codes: npt.NDArray[np.int32] | None = None,
    tenant: int = -1,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Top-``k`` rows of ``vectors`` (n, d) by inner product with each row of
    ``queries`` (m, d); with ``codes`` (n,) only the rows whose code is ``tenant``.
    Returns ``(indices int64 (m, k'), scores float32 (m, k'))`` with
    ``k' = min(k, #candidate rows)``. Inputs are assumed validated."""
    allowed = None if codes is None else codes == tenant
    m = queries.shape[0]
    n_allowed = vectors.shape[0] if allowed is None else int(np.count_nonzero(allowed))
    kk = min(k, n_allowed)
    idx = np.empty((m, kk), dtype=np.int64)
    out = np.empty((m, kk), dtype=np.float32)
    if kk == 0 or m == 0:
        return idx, out
    block = max(1, _SCORE_BLOCK_ELEMS // max(vectors.shape[0], 1))
    for q0 in range(0, m, block):
        scores = np.matmul(queries[q0 : q0 + block], vectors.T)
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
        for j in range(scores.shape[0]):
            idx[q0 + j], out[q0 + j] = _topk_row(scores[j], kk, vectors, queries[q0 + j])
    return idx, out
