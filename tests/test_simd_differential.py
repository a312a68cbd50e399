"""The C kernels, each CPU path forced in turn, against the numpy reference.

Indices must be equal and scores within 1e-5 (float32 sums in a different order);
on the large clustered set only, positions whose true scores tie below float32
resolution (< 1e-6) may be ordered either way (``assert_topk_matches``).
Dimensions are odd on purpose, so every SIMD tail path runs.

Tests that take the ``simd`` fixture call the kernels directly and run once; the
others go through ``retrieve(backend="exact")`` and run (conftest's ``exact_impl``)
with the extension and with its numpy twin, which takes the same arguments.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import numpy as np
import pytest

from intercascade_core import Entry, InvalidArgumentError, empty_repository, retrieve, update
from intercascade_core.core._topk_numpy import topk as reference
from tests.strategies import assert_topk_matches, clustered_unit, random_unit

retrieve_mod = sys.modules["intercascade_core.core.retrieve"]

DIMS = [1, 3, 17, 97, 384, 385]
ISAS = ["scalar", "avx2", "avx512"]


@pytest.fixture(scope="module")
def simd() -> ModuleType:
    try:
        from intercascade_core.core import _simd
    except ImportError:
        pytest.skip("C extension intercascade_core.core._simd is not built")
    return _simd


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest, simd: ModuleType) -> str:
    """Force each CPU path in turn (SimSIMD-style); skip the ones this CPU lacks."""
    if request.param not in simd.capabilities():
        pytest.skip(f"this CPU does not support {request.param}")
    return str(request.param)


def quantise(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The stored rows and their int8 scan copy, exactly as retrieve.py builds it."""
    repo = update(empty_repository(v.shape[1]), [Entry("q", "a", "s")] * len(v), v)
    q, s, e = retrieve_mod._int8_copy(repo)
    return np.ascontiguousarray(repo.vectors), q, s, e


def check(simd: ModuleType, v: np.ndarray, q: np.ndarray, k: int, isa: str, **kw: object) -> None:
    ri, rs = reference(v, q, k)
    for threads in (1, 2):
        i, s = simd.topk(v, q, k, isa=isa, threads=threads)
        assert i.dtype == np.int64 and s.dtype == np.float32 and i.shape == ri.shape
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-5)
        if len(v):
            vv, qv, sc, er = quantise(v)
            i8, s8, ncand = simd.topk_int8(vv, qv, sc, er, q, k, isa=isa, threads=threads)
            i32, s32 = simd.topk(vv, q, k, isa=isa, threads=threads)
            np.testing.assert_array_equal(i8, i32)  # same top-k as the float32 scan ...
            np.testing.assert_array_equal(s8, s32)  # ... bit for bit
            assert ncand >= i8.size


@pytest.mark.parametrize("dim", DIMS)
def test_random_inputs(simd: ModuleType, isa: str, dim: int) -> None:
    rng = np.random.default_rng(1000 + dim)
    for n in (0, 1, 5, 64, 301):
        v = random_unit(rng, n, dim)
        q = random_unit(rng, 7, dim)
        for k in (0, 1, 5, n, n + 3):
            check(simd, v, q, k, isa)


@pytest.mark.parametrize("dim", DIMS)
def test_duplicates_and_exact_ties(simd: ModuleType, isa: str, dim: int) -> None:
    rng = np.random.default_rng(2000 + dim)
    base = random_unit(rng, 4, dim)
    v = np.ascontiguousarray(base[rng.integers(0, 4, 203)])  # every row duplicated many times
    q = np.ascontiguousarray(base[[0, 1, 2, 3, 0, 1, 2]])  # 7 queries: odd tile edges
    for k in (1, 10, 60, 203):
        check(simd, v, q, k, isa)


@pytest.mark.parametrize("dim", [3, 384])
def test_identical_rows_all_tie(simd: ModuleType, isa: str, dim: int) -> None:
    v = np.tile(random_unit(np.random.default_rng(3), 1, dim), (50, 1))
    q = random_unit(np.random.default_rng(4), 3, dim)
    i, s = simd.topk(v, q, 7, isa=isa)
    np.testing.assert_array_equal(i, np.tile(np.arange(7), (3, 1)))
    assert (s == s[:, :1]).all()


def test_clustered_real_like_int8_equality(simd: ModuleType, isa: str) -> None:
    """Tight clusters (many near-ties) are where an int8 scan would go wrong without
    the re-score: the top-k must still equal the float32 scan's."""
    rng = np.random.default_rng(5)
    x = clustered_unit(rng, 20009, 384, clusters=30, spread=0.25)
    v, q = np.ascontiguousarray(x[:20000]), np.ascontiguousarray(x[20000:])
    vv, qv, sc, er = quantise(v)
    for k in (1, 5, 50):
        i8, s8, _ = simd.topk_int8(vv, qv, sc, er, q, k, isa=isa)
        i32, s32 = simd.topk(vv, q, k, isa=isa)
        np.testing.assert_array_equal(i8, i32)
        np.testing.assert_array_equal(s8, s32)
        ri, rs = reference(vv, q, k)
        # 20000 rows in 30 tight clusters hold true near-ties below float32 resolution
        assert_topk_matches(i32, s32, ri, rs, vv, q)


def test_tenant_codes(simd: ModuleType, isa: str) -> None:
    rng = np.random.default_rng(6)
    v = random_unit(rng, 500, 97)
    q = random_unit(rng, 5, 97)
    codes = (np.arange(500) % 3).astype(np.int32)
    vv, qv, sc, er = quantise(v)
    for k in (1, 10, 400):
        ri, rs = reference(v, q, k, codes, 2)  # the twin takes the same arguments
        i, s = simd.topk(v, q, k, codes, 2, isa=isa)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-5)
        i8, s8, _ = simd.topk_int8(vv, qv, sc, er, q, k, codes, 2, isa=isa)
        i32, s32 = simd.topk(vv, q, k, codes, 2, isa=isa)
        np.testing.assert_array_equal(i8, i32)
        np.testing.assert_array_equal(s8, s32)
    assert simd.topk(v, q, 3, codes, 7, isa=isa)[0].shape == (5, 0)


def test_nan_rejected(simd: ModuleType, isa: str) -> None:
    v = random_unit(np.random.default_rng(7), 10, 17)
    q = random_unit(np.random.default_rng(8), 2, 17)
    q[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        simd.topk(v, q, 3, isa=isa)


def test_nan_rejected_before_the_kernel() -> None:
    """retrieve and update reject NaN with a typed error, whichever kernel is loaded."""
    v = random_unit(np.random.default_rng(7), 10, 17)
    q = random_unit(np.random.default_rng(8), 2, 17)
    q[1, 3] = np.nan
    repo = update(empty_repository(17), [Entry("q", "a", "s")] * 10, v)
    with pytest.raises(InvalidArgumentError) as info:
        retrieve(repo, q, 3)
    assert info.value.argument == "query_vectors"
    v[2, 2] = np.nan
    with pytest.raises(InvalidArgumentError) as info:
        update(empty_repository(17), [Entry("q", "a", "s")] * 10, v)
    assert info.value.argument == "vectors"


@pytest.mark.parametrize("dim", DIMS)
def test_retrieve_exact_matches_reference(dim: int) -> None:
    """retrieve(backend="exact") — every scan, with and without a tenant — against the
    reference, on odd dimensions and with many exact duplicates."""
    rng = np.random.default_rng(3000 + dim)
    base = random_unit(rng, 40, dim)
    v = np.ascontiguousarray(base[rng.integers(0, 40, 301)])
    q = random_unit(rng, 5, dim)
    tenants = [("a", "b", "c")[i % 3] for i in range(301)]
    es = [Entry("q", "a", "s", tenant=t) for t in tenants]
    repo = update(empty_repository(dim), es, v)
    codes = np.asarray(repo.tenant_codes)
    for k in (1, 7, 301):
        for scan in ("f32", "int8"):
            got = retrieve(repo, q, k, scan=scan)  # type: ignore[arg-type]
            ri, rs = reference(repo.vectors, q, k)
            np.testing.assert_array_equal(got.indices, ri)
            np.testing.assert_allclose(got.scores, rs, rtol=1e-5, atol=1e-5)
            got = retrieve(repo, q, k, scan=scan, tenant="b")  # type: ignore[arg-type]
            ri, rs = reference(repo.vectors, q, k, codes, repo.tenant_code("b"))
            np.testing.assert_array_equal(got.indices, ri)
            np.testing.assert_allclose(got.scores, rs, rtol=1e-5, atol=1e-5)


def test_argument_validation(simd: ModuleType) -> None:
    v = random_unit(np.random.default_rng(9), 10, 8)
    q = v[:2].copy()
    with pytest.raises(TypeError, match="float32"):
        simd.topk(v.astype(np.float64), q, 1)
    with pytest.raises(TypeError, match="numpy array"):
        simd.topk(v.tolist(), q, 1)
    with pytest.raises(ValueError, match="columns"):
        simd.topk(v, q[:, :4].copy(), 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        simd.topk(v[:, ::2], q[:, ::2].copy(), 1)
    with pytest.raises(ValueError, match="2-dimensional"):
        simd.topk(v, q[0], 1)
    with pytest.raises(ValueError, match="k must be"):
        simd.topk(v, q, -1)
    with pytest.raises(ValueError, match="isa"):
        simd.topk(v, q, 1, isa="amx")
    with pytest.raises(ValueError, match="threads"):
        simd.topk(v, q, 1, threads=3)
    with pytest.raises(ValueError, match="codes"):
        simd.topk(v, q, 1, np.zeros(3, np.int32), 0)
    with pytest.raises(TypeError, match="int32"):
        simd.topk(v, q, 1, np.zeros(10, np.int64), 0)
    _, pk, sc, er = quantise(v)
    with pytest.raises(ValueError, match="packed must have shape"):
        simd.topk_int8(v, pk[:0], sc, er, q, 1)
    with pytest.raises(ValueError, match="packed must have shape"):
        simd.topk_int8(v, pk, sc[:3], er, q, 1)
    with pytest.raises(TypeError, match="uint8"):
        simd.topk_int8(v, pk.astype(np.int16), sc, er, q, 1)


def test_capabilities(simd: ModuleType) -> None:
    caps = simd.capabilities()
    assert caps[-1] == "scalar" and set(caps) <= set(ISAS)


def test_multi_phase_init_gives_fresh_module(simd: ModuleType) -> None:
    """Re-importing after removal yields a new module object (PEP 489, markupsafe's test)."""
    name = "intercascade_core.core._simd"
    saved = sys.modules.pop(name)
    try:
        fresh = importlib.import_module(name)
        assert fresh is not saved
        assert fresh.capabilities() == saved.capabilities()
    finally:
        sys.modules[name] = saved


@pytest.mark.parametrize("dim", DIMS)
def test_gather_equals_numpy_twin_bit_for_bit(simd: ModuleType, isa: str, dim: int) -> None:
    """The gather's scores do not depend on the ISA: every path equals the numpy twin
    bit for bit (random rows, repeated candidates, duplicate rows, a non-unit scale)."""
    from intercascade_core.core._topk_numpy import gather

    rng = np.random.default_rng(2000 + dim)
    v = random_unit(rng, 301, dim)
    v[7] = v[3]  # duplicate rows score alike
    q = random_unit(rng, 9, dim)
    q[8] *= np.float32(3.5)
    for c in (0, 1, 3, 4, 5, 33, 301):
        rows = rng.integers(0, 301, (9, c)).astype(np.int64)
        if c >= 2:
            rows[:, :2] = (3, 7)
        got = simd.gather(v, q, rows, isa=isa)
        want = gather(v, q, rows)
        assert got.dtype == np.float32 and got.shape == (9, c)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        if c >= 2:
            assert (got[:, 0] == got[:, 1]).all()
        # and they are the float32 cosines (float64 sums: far inside float32 rounding)
        exact = np.einsum("mcd,md->mc", v[rows].astype(np.float64), q.astype(np.float64))
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-7)


def test_gather_argument_validation(simd: ModuleType) -> None:
    v = random_unit(np.random.default_rng(5), 10, 4)
    q = v[:2].copy()
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        simd.gather(v, q, np.array([[0], [10]], np.int64))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        simd.gather(v, q, np.array([[0], [-1]], np.int64))
    with pytest.raises(ValueError):
        simd.gather(v, q, np.zeros((3, 1), np.int64))  # one row list per query
    with pytest.raises(TypeError):
        simd.gather(v, q, np.zeros((2, 1), np.int32))
    with pytest.raises(ValueError):
        simd.gather(v, q[:, :3].copy(), np.zeros((2, 1), np.int64))
    assert simd.gather(v, q[:0], np.zeros((0, 4), np.int64)).shape == (0, 4)
