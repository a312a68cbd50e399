"""Shared Hypothesis strategies and seeded data helpers for the test-suite.

Import from here instead of redefining strategies in each test module.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

__all__ = [
    "unit_vectors",
    "unit_matrix",
    "entries",
    "random_unit",
    "clustered_unit",
]


@st.composite
def unit_vectors(draw: st.DrawFn, dim: int) -> np.ndarray:
    """One float32 unit vector of ``dim`` components (near-zero draws rejected)."""
    xs = draw(
        st.lists(
            st.floats(-1.0, 1.0, width=32, allow_nan=False, allow_infinity=False),
            min_size=dim,
            max_size=dim,
        )
    )
    v = np.asarray(xs, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if norm < 1e-3:
        v = np.zeros(dim)
        v[draw(st.integers(0, dim - 1))] = 1.0
        norm = 1.0
    return (v / norm).astype(np.float32)


@st.composite
def unit_matrix(draw: st.DrawFn, rows: int, dim: int) -> np.ndarray:
    """``(rows, dim)`` float32 unit rows from a drawn seed (fast for large sizes)."""
    seed = draw(st.integers(0, 2**32 - 1))
    return random_unit(np.random.default_rng(seed), rows, dim)


def entries(count: int, prefix: str = "q", tenant: str = "default") -> list:
    """``count`` simple entries (import kept local so the strategies stay light)."""
    from intercascade_core.core.repository import Entry

    return [Entry(f"{prefix}{i}", f"a{i}", f"s{i}", tenant=tenant) for i in range(count)]


def random_unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """Uniform random float32 unit vectors (Gaussian, normalised)."""
    x = rng.standard_normal((rows, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def clustered_unit(
    rng: np.random.Generator, rows: int, dim: int, *, clusters: int = 50, spread: float = 0.35
) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (like real embedding traffic)."""
    centres = random_unit(rng, clusters, dim).astype(np.float64)
    which = rng.integers(0, clusters, rows)
    x = centres[which] + spread * rng.standard_normal((rows, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


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
