"""The test-suite's data helpers: the public testing kit, plus one assertion of its own.

Strategies and seeded generators live in :mod:`intercascade_core.testing` (users get the
same ones); this module only keeps the names the suite imports. ``entries`` is the kit's
``make_entries``.
"""

from __future__ import annotations

import numpy as np

from intercascade_core.testing import clustered_unit, random_unit
from intercascade_core.testing import make_entries as entries

__all__ = ["assert_topk_matches", "clustered_unit", "entries", "random_unit"]


def assert_topk_matches(
    indices: np.ndarray,
    scores: np.ndarray,
    ref_indices: np.ndarray,
    ref_scores: np.ndarray,
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    tie_tol: float = 1e-6,
) -> None:
    """Top-k equality against the reference: same shape, scores within 1e-5 and
    indices **equal**, except where two rows' true (float64) scores differ by less
    than ``tie_tol`` — below float32 resolution (one ulp at 0.9 is 6e-8), where a
    float32 kernel may legitimately order them either way. Every such swap must
    involve rows whose true scores are within ``tie_tol`` of the reference's."""
    assert indices.shape == ref_indices.shape
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    for row in np.flatnonzero((indices != ref_indices).any(axis=1)):
        q = queries[row].astype(np.float64)
        true_got = vectors[indices[row]].astype(np.float64) @ q
        true_ref = vectors[ref_indices[row]].astype(np.float64) @ q
        bad = indices[row] != ref_indices[row]
        gap = np.abs(true_got[bad] - true_ref[bad])
        assert (gap <= tie_tol).all(), (
            f"query {row}: indices differ beyond a near-tie ({gap.max():.3g})"
        )
        assert len(set(indices[row].tolist())) == indices.shape[1]
