"""Tenant isolation: retrieval for tenant A never returns tenant B's strategies — on the
exact, numpy and hnsw backends, after a save/open round trip, and through the service."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.core.retrieve import retrieve
from intercascade_core.storage.store import open_repository, save
from tests.strategies import random_unit

DIM = 12
TENANTS = ["default", "a", "b", "tenant-ü", "t" * 64]


def _build(seed: int, n: int, n_tenants: int, batches: int):
    rng = np.random.default_rng(seed)
    names = TENANTS[:n_tenants]
    labels = [names[int(i)] for i in rng.integers(0, n_tenants, size=n)]
    vec = random_unit(rng, n, DIM)
    repo = empty_repository(DIM)
    cuts = [*sorted({int(c) for c in rng.integers(0, n + 1, size=batches)}), n]
    a = 0
    for b in cuts:  # several versions of one arena (the hnsw index grows incrementally)
        if b > a:
            repo = update(
                repo,
                [Entry(f"q{i}", "a", f"s{i}", tenant=labels[i]) for i in range(a, b)],
                vec[a:b],
            )
            a = b
    return repo, labels, vec, rng


def _check(repo, labels, queries, k: int, backend: str) -> None:
    counts = collections.Counter(labels)
    for tenant in [*TENANTS, "nobody"]:
        top = retrieve(repo, queries, k, backend=backend, tenant=tenant)
        idx = top.indices
        assert idx.shape[1] <= min(k, counts.get(tenant, 0))
        for row in idx:
            for i in row:
                if i >= 0:
                    assert labels[i] == tenant, (backend, tenant, i, labels[i])
                    assert repo.entries[int(i)].tenant == tenant
        if backend != "hnsw":  # exact: the same rows as a scan restricted to the tenant
            own = np.flatnonzero(np.array([t == tenant for t in labels], dtype=bool))
            if own.size:
                sims = queries @ np.asarray(repo.vectors)[own].T
                best = np.sort(sims, axis=1)[:, ::-1][:, : idx.shape[1]]
                np.testing.assert_allclose(top.scores, best, rtol=1e-5, atol=1e-5)
            assert idx.shape[1] == min(k, own.size)


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**20),
    n=st.integers(0, 120),
    n_tenants=st.integers(1, len(TENANTS)),
    batches=st.integers(1, 4),
    k=st.integers(1, 12),
    backend=st.sampled_from(["exact", "numpy", "hnsw"]),
)
def test_tenant_isolation_property(seed, n, n_tenants, batches, k, backend) -> None:
    repo, labels, vec, rng = _build(seed, n, n_tenants, batches)
    # queries: random, and exact copies of other tenants' vectors (the strongest lure)
    queries = random_unit(rng, 4, DIM)
    if n:
        queries = np.vstack([queries, vec[rng.integers(0, n, size=4)]]).astype(np.float32)
    _check(repo, labels, queries, k, backend)


def test_tenant_isolation_large_exact_int8_path() -> None:
    """Past INT8_MIN_ROWS the exact backend scans an int8 copy: still isolated."""
    from intercascade_core.core.retrieve import INT8_MIN_ROWS

    repo, labels, vec, rng = _build(1, INT8_MIN_ROWS + 100, 3, 2)
    queries = vec[rng.integers(0, len(labels), size=16)]
    for tenant in TENANTS[:3]:
        top = retrieve(repo, queries, 10, backend="exact", tenant=tenant)
        assert all(labels[i] == tenant for i in top.indices.ravel())


@settings(max_examples=10)
@given(seed=st.integers(0, 2**20), backend=st.sampled_from(["exact", "hnsw"]))
def test_tenant_isolation_after_round_trip(tmp_path_factory, seed, backend) -> None:
    repo, labels, vec, rng = _build(seed, 60, 4, 2)
    path = tmp_path_factory.mktemp("t") / "r"
    save(path, repo, model_id="m")
    got = open_repository(path).repository
    queries = vec[rng.integers(0, 60, size=6)]
    _check(got, labels, queries, 5, backend)
    # a version opened from disk and then grown keeps isolation for the new rows too
    extra = random_unit(rng, 5, DIM)
    grown = update(got, [Entry(f"n{i}", "a", "s", tenant="new") for i in range(5)], extra)
    _check(grown, labels + ["new"] * 5, extra, 5, backend)


@pytest.mark.parametrize(
    ("policy", "backend"), [("retrieval", "exact"), ("retrieval", "hnsw"), ("random", "numpy")]
)
def test_tenants_through_the_service(policy: str, backend: str) -> None:
    """Per-request tenants: each request only ever sees its own tenant's strategies (top-k
    on exact and hnsw, and the random-strategy control), and its strategy is stored
    under its tenant."""
    from intercascade_core.core.cascade import CascadeConfig
    from tests._crash_worker import make_cascade, stream

    cascade, client = make_cascade(config=CascadeConfig(policy=policy, k=2, backend=backend))
    queries = stream(150, seed=21)
    tenants = [("a", "b", "c")[i % 3] for i in range(len(queries))]
    outs = cascade.ask_many(queries, threads=4, tenant=tenants)
    client.close()
    repo = cascade.state.repositories[0]
    seen = 0
    for o, t in zip(outs, tenants, strict=False):
        for su in o.strategies[0]:
            assert repo.entries[su.entry_id].tenant == t
            seen += 1
    assert seen > 0
    stored = collections.Counter(t for o, t in zip(outs, tenants, strict=False) if o.stored_in)
    assert {t: repo.tenant_size(t) for t in "abc"} == {t: stored[t] for t in "abc"}
    assert collections.Counter(e.tenant for e in repo.entries) == stored


@pytest.mark.parametrize("policy", ["retrieval", "random"])
def test_no_tenant_means_default_never_every_tenant(policy: str) -> None:
    """One rule everywhere: a query without a tenant reads and writes "default" only; it
    never sees another tenant's strategies (before, tenant=None read every tenant)."""
    from intercascade_core.core.cascade import CascadeConfig
    from tests._crash_worker import make_cascade, stream

    cascade, client = make_cascade(config=CascadeConfig(policy=policy, k=2, backend="numpy"))
    queries = stream(120, seed=22)
    tenants = [("acme", None)[i % 2] for i in range(len(queries))]
    outs = cascade.ask_many(queries, threads=4, tenant=tenants)
    client.close()
    repo = cascade.state.repositories[0]
    assert repo.tenant_size("acme") > 0 and repo.tenant_size("default") > 0
    for o, t in zip(outs, tenants, strict=True):
        for su in o.strategies[0]:
            assert repo.entries[su.entry_id].tenant == (t or "default")


def test_an_empty_tenant_is_refused_everywhere() -> None:
    from intercascade_core.core.cascade import CascadeConfig
    from intercascade_core.errors import InvalidArgumentError
    from tests._crash_worker import make_cascade, stream

    with pytest.raises(InvalidArgumentError, match="tenant"):
        CascadeConfig(tenant="")
    repo = update(empty_repository(4), [Entry("q", "a", "s")], np.eye(4, dtype=np.float32)[:1])
    for backend in ("exact", "numpy", "hnsw"):
        with pytest.raises(InvalidArgumentError, match="tenant"):
            retrieve(repo, np.eye(4, dtype=np.float32)[0], 1, backend=backend, tenant="")
    cascade, client = make_cascade(config=CascadeConfig())
    with pytest.raises(InvalidArgumentError, match="tenant"):
        cascade.ask(stream(1, seed=1)[0], tenant="")
    client.close()
