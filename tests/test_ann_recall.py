"""backend="hnsw": recall against exact search, version bounds, tenant filter.

Recall threshold (scipy-style slack): over m·k = 200·10 = 2000 (query, rank) slots,
if the true per-slot recall were p = 0.97 the count of hits is ~ Binomial(2000, p)
(slots are not independent, so this is a heuristic), and binom.ppf(1e-6, 2000, 0.97)
= 1904, i.e. recall >= 0.952: asserting recall >= 0.95 fails with probability below
1e-6 for an index that is at least that good. The index is built single-threaded
with a fixed seed, so the measured value is also reproducible (pinned loosely).

Re-score (hnswlib proposes c·k candidates, the gather scores them exactly): with
``ef >= n`` and ``c·k >= n`` the result must be the exact top-k bit for bit, and the
recall with re-score is compared with the recall without on the same seeded index
(deterministic: single-threaded build, fixed seed, fixed queries; see the test).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from intercascade_core import Entry, empty_repository, retrieve, update
from intercascade_core.core._topk_numpy import gather
from intercascade_core.storage.hnsw import HnswParams, ensure_index, index_stats, search, tune_ef
from tests.strategies import clustered_unit

pytest.importorskip("hnswlib")

PARAMS = HnswParams(M=16, ef_construction=100, ef=64, seed=7, threads=1)


def _repo(v: np.ndarray, tenants: list[str] | None = None):  # type: ignore[no-untyped-def]
    es = [
        Entry(f"q{i}", "a", "s", tenant=tenants[i] if tenants else "default") for i in range(len(v))
    ]
    return update(empty_repository(v.shape[1]), es, v)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2024)
    x = clustered_unit(rng, 6200, 384, clusters=40, spread=0.5)
    return x[:6000], x[6000:]  # queries drawn around the same centres


def test_recall_on_clustered_data(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    v, q = clustered
    repo = _repo(v)
    ensure_index(repo, PARAMS)
    approx = retrieve(repo, q, 10, backend="hnsw")
    exact = retrieve(repo, q, 10, backend="numpy")
    r = recall(approx.indices, exact.indices)
    assert r >= 0.95, r
    assert (np.diff(approx.scores, axis=1) <= 0).all()
    # scores returned are the true cosines of the returned rows
    np.testing.assert_allclose(
        approx.scores, np.einsum("mkd,md->mk", repo.vectors[approx.indices], q), atol=1e-5
    )


def test_grows_incrementally_and_respects_versions(
    clustered: tuple[np.ndarray, np.ndarray],
) -> None:
    v, q = clustered
    r1 = _repo(v[:3000])
    index = ensure_index(r1, PARAMS)
    assert index_stats(r1)["count"] == 3000
    r2 = update(r1, [Entry("n", "a", "s")] * 3000, v[3000:])
    got2 = retrieve(r2, q, 5, backend="hnsw")
    assert ensure_index(r2) is index  # same index object: grown, not rebuilt
    assert index_stats(r2)["count"] == 6000
    assert got2.indices.max() >= 3000  # the newer rows are findable from r2 ...
    got1 = retrieve(r1, q, 5, backend="hnsw")
    assert got1.indices.max() < 3000  # ... but never from r1
    exact1 = retrieve(r1, q, 5, backend="numpy")
    assert recall(got1.indices, exact1.indices) >= 0.95
    # rows near the old version's queries that only exist in r2 force the filter path
    r3 = update(r1, [Entry("b", "a", "s")] * 1, q[:1])  # branch: its own arena and index
    assert index_stats(r3) == {"count": 0, "capacity": 0}
    assert retrieve(r3, q[0], 1, backend="hnsw").indices[0, 0] == 3000
    assert ensure_index(r3) is not index
    tiny = retrieve(r1, q[0], 3000, backend="hnsw", ef=8)
    assert tiny.indices.shape == (1, 3000) and tiny.indices.max() < 3000


def test_tenant_filter(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    v, q = clustered
    tenants = ["a" if i % 4 else "b" for i in range(2000)]
    repo = _repo(v[:2000], tenants)
    ensure_index(repo, PARAMS)
    got = retrieve(repo, q, 5, backend="hnsw", tenant="b")
    assert all(tenants[i] == "b" for i in got.indices.ravel())
    exact = retrieve(repo, q, 5, backend="numpy", tenant="b")
    assert recall(got.indices, exact.indices) >= 0.95
    assert retrieve(repo, q, 5, backend="hnsw", tenant="zzz").indices.shape == (200, 0)


def test_k_larger_than_repo_and_empty() -> None:
    v = clustered_unit(np.random.default_rng(3), 20, 16, clusters=2)
    repo = _repo(v)
    got = retrieve(repo, v[:2], 50, backend="hnsw")
    assert got.indices.shape == (2, 20)
    assert sorted(got.indices[0].tolist()) == list(range(20))
    assert retrieve(empty_repository(16), v[0], 3, backend="hnsw").indices.shape == (1, 0)
    with pytest.raises(ValueError):
        retrieve(repo, v[0], 3, backend="hnsw", ef=0)


def test_hnsw_is_a_registered_name_and_hnswlib_loads_on_first_search() -> None:
    """``import intercascade_core`` makes backend="hnsw" available (the core names it
    through its index registry) without importing hnswlib; the first search does."""
    code = (
        "import sys, numpy as np, intercascade_core as ic\n"
        "from intercascade_core.core.retrieve import backend_names\n"
        "loaded = 'hnswlib' in sys.modules\n"
        "r = ic.update(ic.empty_repository(2), [ic.Entry('q', 'a', 's')] * 2,"
        " np.array([[1, 0], [0, 1]], np.float32))\n"
        "ic.CascadeConfig(backend='hnsw')\n"
        "top = ic.retrieve(r, np.array([0, 1], np.float32), 1, backend='hnsw')\n"
        "print(loaded, 'hnsw' in backend_names(), top.indices.tolist(), 'hnswlib' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "[[1]]", "True"]


def test_rescore_is_the_exact_top_k_when_the_walk_sees_every_row() -> None:
    """ef >= n and c·k >= n: hnswlib proposes every row and the exact re-score picks
    the exact top-k: the numpy backend's indices and scores, bit for bit, including
    the tie order of duplicated rows (lower index first)."""
    rng = np.random.default_rng(77)
    v = clustered_unit(rng, 300, 97, clusters=6, spread=0.3)
    v[150:160] = v[40:50]  # exact ties: duplicated rows
    q = np.concatenate([v[40:45], clustered_unit(rng, 20, 97, clusters=6, spread=0.3)])
    repo = _repo(v)
    ensure_index(repo, PARAMS)
    k = 5
    got_i, got_s = search(repo, q, k, ef=300, rescore=60)
    exact = retrieve(repo, q, k, backend="numpy")
    np.testing.assert_array_equal(got_i, exact.indices)
    np.testing.assert_array_equal(got_s.view(np.uint32), exact.scores.view(np.uint32))
    assert (got_i[:5, 0] == np.arange(40, 45)).all()  # the duplicate at 150+ loses the tie
    # a tenant-filtered search takes the over-fetch path and is exact the same way
    tenants = ["a" if i % 3 else "b" for i in range(300)]
    trepo = _repo(v, tenants)
    ensure_index(trepo, PARAMS)
    code = trepo.tenant_code("b")
    ti, ts = search(trepo, q, k, tenant_code=code, ef=300, rescore=60)
    texact = retrieve(trepo, q, k, backend="numpy", tenant="b")
    np.testing.assert_array_equal(ti, texact.indices)
    np.testing.assert_array_equal(ts.view(np.uint32), texact.scores.view(np.uint32))


def test_rescore_recall_at_least_plain(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    """Same index, same queries: recall with re-score (c = 4) >= without, at a small ef
    (where the c·k over-fetch widens the walk) and at ef >= c·k (the same walk; the
    re-score only reorders it by exact scores). The index, queries and walk are all
    deterministic (seeded single-threaded build), so this compares two fixed numbers:
    it cannot fail at random, only if the re-score path loses neighbours."""
    v, q = clustered
    repo = _repo(v)
    ensure_index(repo, PARAMS)
    exact = retrieve(repo, q, 10, backend="numpy")
    for ef in (10, 64):
        plain, _ = search(repo, q, 10, ef=ef, rescore=0)
        rescored, scores = search(repo, q, 10, ef=ef, rescore=4)
        assert recall(rescored, exact.indices) >= recall(plain, exact.indices), ef
        # the scores are exact: the numpy twin's gather of the returned rows
        np.testing.assert_array_equal(scores, gather(repo.vectors, q, rescored))
    with pytest.raises(ValueError, match="rescore"):
        search(repo, q, 5, rescore=-1)


def test_tune_ef_picks_the_smallest_ef_that_meets_the_target(
    clustered: tuple[np.ndarray, np.ndarray],
) -> None:
    """The choice is re-measured: searching at the chosen ef gives the recall it
    reported (>= target), every smaller ef tried fell short, and a target of 1.0 with
    ef >= n is met with the exact top-k. The index is the seeded single-threaded
    one, so the walk and these numbers are fixed: no random failure."""
    v, q = clustered
    repo = _repo(v)
    ensure_index(repo, PARAMS)
    exact = retrieve(repo, q, 10, scan="f32").indices
    efs = (10, 20, 40, 80, 160, 6000)
    choice = tune_ef(repo, q, 10, 0.99, efs=efs)
    assert choice.met and choice.recall >= 0.99
    assert [e for e, _ in choice.curve] == list(efs[: efs.index(choice.ef) + 1])
    assert all(r < 0.99 for _, r in choice.curve[:-1])
    assert recall(search(repo, q, 10, ef=choice.ef)[0], exact) == choice.recall
    full = tune_ef(repo, q, 10, 1.0, efs=(6000,), rescore=600)
    assert full.met and full.recall == 1.0
    np.testing.assert_array_equal(search(repo, q, 10, ef=6000, rescore=600)[0], exact)
    # an unreachable target: the largest ef, reported as not met
    low = tune_ef(repo, q, 10, 1.0, efs=(10,), rescore=1)
    assert not low.met and low.ef == 10 and low.recall < 1.0
    for bad in ({"target": 0.0}, {"target": 1.5}, {"target": 0.9, "efs": (64, 32)},
                {"target": 0.9, "efs": ()}):
        with pytest.raises(ValueError):
            tune_ef(repo, q, 10, **bad)
