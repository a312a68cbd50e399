"""retrieve(): contract tests run against every available exact implementation
(conftest's ``exact_impl``: the C extension and its numpy twin)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from intercascade_core import Entry, InvalidArgumentError, TopK, empty_repository, retrieve, update
from intercascade_core.core import _topk_numpy
from intercascade_core.core.protocols import SearchBackend
from tests.strategies import clustered_unit, entries, random_unit

# the submodule shares the function's name: reach it through sys.modules (importing
# ``intercascade_core.core.retrieve`` first would bind the package attribute to the module)
retrieve_mod = sys.modules["intercascade_core.core.retrieve"]

BACKENDS = ["numpy", "exact"]


@pytest.fixture(params=["f32", "int8"])
def impl(request: pytest.FixtureRequest) -> dict[str, str]:
    """backend="exact" with each scan: the C float32 scan and the C int8 scan +
    float32 re-score, or (``exact_impl="numpy"``) the numpy twin, which accepts
    ``scan`` and has one."""
    return {"backend": "exact", "scan": request.param}


def _repo(v: np.ndarray, tenants: list[str] | None = None):  # type: ignore[no-untyped-def]
    es = [
        Entry(f"q{i}", "a", "s", tenant=(tenants[i] if tenants else "default"))
        for i in range(len(v))
    ]
    return update(empty_repository(v.shape[1]), es, v)


def test_shapes_dtypes_and_k_prime(impl: dict[str, str]) -> None:
    rng = np.random.default_rng(5)
    v = random_unit(rng, 10, 7)
    repo = _repo(v)
    for k in (0, 1, 3, 10, 25):
        res = retrieve(repo, v[:4], k, **impl)  # type: ignore[arg-type]
        assert res.indices.dtype == np.int64 and res.scores.dtype == np.float32
        assert res.indices.shape == res.scores.shape == (4, min(k, 10))
        assert not res.indices.flags.writeable
        if k:
            assert (np.diff(res.scores, axis=1) <= 0).all()
            np.testing.assert_array_equal(res.indices[:, 0], np.arange(4))  # self-match first
            np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=1e-5)


def test_one_dimensional_query_is_one_row(impl: dict[str, str]) -> None:
    v = random_unit(np.random.default_rng(6), 5, 3)
    res = retrieve(_repo(v), v[2], 2, **impl)  # type: ignore[arg-type]
    assert res.indices.shape == (1, 2) and res.indices[0, 0] == 2


def test_empty_repository_and_empty_queries(impl: dict[str, str]) -> None:
    r = empty_repository(4)
    q = np.array([1, 0, 0, 0], np.float32)
    assert retrieve(r, q, 3, **impl).indices.shape == (1, 0)  # type: ignore[arg-type]
    v = random_unit(np.random.default_rng(7), 3, 4)
    assert retrieve(_repo(v), np.empty((0, 4), np.float32), 3, **impl).indices.shape == (0, 0)  # type: ignore[arg-type]


def test_ties_go_to_lower_index(impl: dict[str, str]) -> None:
    base = random_unit(np.random.default_rng(8), 3, 5)
    v = np.concatenate([base[[1, 0, 1, 2, 1, 0]]] * 3)  # many exact duplicates
    repo = _repo(v)
    res = retrieve(repo, base[1], 7, **impl)  # type: ignore[arg-type]
    assert res.indices[0].tolist()[:7] == [0, 2, 4, 6, 8, 10, 12]
    assert len(set(res.scores[0].tolist())) == 1


def test_tenant_filter(impl: dict[str, str]) -> None:
    rng = np.random.default_rng(9)
    v = random_unit(rng, 40, 6)
    tenants = ["a" if i % 3 else "b" for i in range(40)]
    repo = _repo(v, tenants)
    res = retrieve(repo, v[:5], 100, tenant="b", **impl)  # type: ignore[arg-type]
    nb = tenants.count("b")
    assert res.indices.shape == (5, nb)
    assert all(tenants[i] == "b" for i in res.indices.ravel())
    assert retrieve(repo, v[0], 3, tenant="nobody", **impl).indices.shape == (1, 0)  # type: ignore[arg-type]


def test_old_version_sees_only_its_rows(impl: dict[str, str]) -> None:
    rng = np.random.default_rng(10)
    v = random_unit(rng, 30, 8)
    r1 = _repo(v[:10])
    r2 = update(r1, entries(20), v[10:])
    res1 = retrieve(r1, v[15], 30, **impl)  # type: ignore[arg-type]
    assert res1.indices.shape == (1, 10) and res1.indices.max() < 10
    res2 = retrieve(r2, v[15], 1, **impl)  # type: ignore[arg-type]
    assert res2.indices[0, 0] == 15


def test_matches_reference_on_clustered_data(impl: dict[str, str]) -> None:
    rng = np.random.default_rng(11)
    x = clustered_unit(rng, 3016, 384, clusters=20)
    v, q = x[:3000], x[3000:]
    repo = _repo(v)
    ref = retrieve(repo, q, 10, backend="numpy")
    got = retrieve(repo, q, 10, **impl)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-5)


def test_query_identical_to_stored_returns_it_first(impl: dict[str, str]) -> None:
    v = clustered_unit(np.random.default_rng(12), 500, 32, clusters=3, spread=0.05)
    repo = _repo(v)
    res = retrieve(repo, v[[7, 123, 499]], 1, **impl)  # type: ignore[arg-type]
    np.testing.assert_array_equal(res.indices[:, 0], [7, 123, 499])


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieve_iv(backend: str) -> None:
    v = random_unit(np.random.default_rng(13), 4, 3)
    repo = _repo(v)
    bad_queries = [
        v[0].astype(np.float64),  # wrong dtype
        v[0].tolist(),  # not an array
        np.ones(4, np.float32) / 2,  # wrong dimension
        np.array([np.nan, 0, 0], np.float32),
        np.array([np.inf, 0, 0], np.float32),
        np.array([3.0, 0, 0], np.float32),  # non-unit: rejected
        np.zeros((2, 2, 3), np.float32),
    ]
    for q in bad_queries:
        with pytest.raises(InvalidArgumentError) as info:
            retrieve(repo, q, 1, backend=backend)  # type: ignore[arg-type]
        assert info.value.argument == "query_vectors"
    for k in (-1, 1.5, True, "2"):
        with pytest.raises(InvalidArgumentError) as info:
            retrieve(repo, v[0], k, backend=backend)  # type: ignore[arg-type]
        assert info.value.argument == "k"
    with pytest.raises(InvalidArgumentError):
        retrieve(repo, v[0], 1, backend="faiss")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        retrieve(repo, v[0], 1, backend=backend, tenant=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        retrieve(v, v[0], 1, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        retrieve(repo, v[0], 1, backend=backend, scan="int4")  # type: ignore[arg-type]


def test_inputs_unmodified(impl: dict[str, str]) -> None:
    v = random_unit(np.random.default_rng(14), 50, 9)
    repo = _repo(v)
    before = repo.vectors.copy()
    q = v[:3].copy()
    q_before = q.copy()
    retrieve(repo, q, 5, **impl)  # type: ignore[arg-type]
    np.testing.assert_array_equal(repo.vectors, before)
    np.testing.assert_array_equal(q, q_before)
    assert len(repo) == 50


@pytest.fixture
def no_ext(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(retrieve_mod, "_ext", None)
    monkeypatch.setattr(retrieve_mod, "_fallback_logged", False)
    yield


def test_exact_falls_back_to_numpy_and_logs_once(
    no_ext: None, caplog: pytest.LogCaptureFixture
) -> None:
    v = random_unit(np.random.default_rng(15), 20, 4)
    repo = _repo(v)
    with caplog.at_level(logging.INFO, logger="intercascade_core.core.retrieve"):
        a = retrieve(repo, v[:3], 4)
        b = retrieve(repo, v[:3], 4)
    np.testing.assert_array_equal(a.indices, retrieve(repo, v[:3], 4, backend="numpy").indices)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert sum("numpy path" in r.getMessage() for r in caplog.records) == 1


def test_runtime_switch_disables_extension() -> None:
    """INTERCASCADE_NO_EXT=1 makes backend="exact" use the numpy path (checked in a
    fresh interpreter, since the switch is read at import)."""
    import os
    import subprocess

    code = (
        "import numpy as np, intercascade_core as ic, sys\n"
        "e, v = [ic.Entry('q', 'a', 's')], np.array([[1, 0]], np.float32)\n"
        "r = ic.update(ic.empty_repository(2), e, v)\n"
        "res = ic.retrieve(r, np.array([1, 0], np.float32), 1)\n"
        "m = sys.modules['intercascade_core.core.retrieve']\n"
        "print(m.extension_available(), res.indices.tolist())\n"
    )
    env = dict(os.environ, INTERCASCADE_NO_EXT="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "[[0]]"]


@pytest.mark.needs_ext
def test_int8_copy_grows_with_the_repository() -> None:
    """The int8 scan copy is extended in place as versions grow (partly filled 16-row
    blocks re-packed, capacity doubling) and every version, old or new, still gets
    exactly the float32 top-k."""
    if not retrieve_mod.extension_available():
        pytest.skip("C extension not built or disabled (INTERCASCADE_NO_EXT=1)")
    rng = np.random.default_rng(21)
    x = clustered_unit(rng, 700, 33, clusters=5)
    v, q = x[:680], x[680:]
    repo = empty_repository(33)
    versions = []
    start = 0
    for step in (1, 7, 16, 33, 1, 100, 15, 17, 250, 240):
        repo = update(repo, entries(step), v[start : start + step])
        start += step
        versions.append(repo)
        got = retrieve(repo, q, 6, scan="int8")
        want = retrieve(repo, q, 6, scan="f32")
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.scores, want.scores)
    for old in versions:  # old versions after the copy grew past them
        got = retrieve(old, q, 4, scan="int8")
        np.testing.assert_array_equal(got.indices, retrieve(old, q, 4, scan="f32").indices)
        assert got.indices.max() < len(old)
    branch = update(versions[3], entries(2), v[:2])  # copy-on-branch arena
    np.testing.assert_array_equal(
        retrieve(branch, q, 5, scan="int8").indices, retrieve(branch, q, 5, scan="f32").indices
    )


def test_exact_impl_fixture_selects_the_implementation(
    exact_impl: str | None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """conftest's switch really swaps the implementation behind backend="exact"."""
    assert exact_impl in ("c", "numpy")
    assert retrieve_mod.extension_available() == (exact_impl == "c")
    monkeypatch.setattr(retrieve_mod, "_fallback_logged", False)
    v = random_unit(np.random.default_rng(16), 8, 5)
    with caplog.at_level(logging.INFO, retrieve_mod.__name__):
        assert retrieve(_repo(v), v[6], 1).indices[0, 0] == 6
    assert any("numpy path" in r.getMessage() for r in caplog.records) == (exact_impl == "numpy")


# ----------------------------------------------------------------------------- backends by protocol
class RowsBackend:
    """A SearchBackend over rows it holds itself, ids ``1000 + row`` (a stand-in for a
    user's vector database, answered by the numpy reference)."""

    def __init__(self, vectors: np.ndarray, tenants: list[str]) -> None:
        self.vectors = vectors
        self.tenants = np.array(tenants)
        self.calls: list[tuple[np.ndarray, int, str | None]] = []

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(
        self, query_vectors: np.ndarray, k: int, *, tenant: str | None = None
    ) -> TopK:
        self.calls.append((query_vectors, k, tenant))
        codes = None if tenant is None else (self.tenants == tenant).astype(np.int32)
        i, s = _topk_numpy.topk(self.vectors, query_vectors, k, codes, 1)
        return TopK(i + 1000, s)


def test_a_search_backend_object_answers_for_itself() -> None:
    rng = np.random.default_rng(30)
    own = random_unit(rng, 20, 6)
    tenants = ["a" if i % 2 else "b" for i in range(20)]
    b = RowsBackend(own, tenants)
    assert isinstance(b, SearchBackend)
    assert retrieve_mod.check_backend(b) is b
    local = _repo(random_unit(rng, 3, 6))  # a local repository of the same dim: not searched
    q = own[4] * np.float32(1.0005)  # 1-D, slightly off unit norm
    top = retrieve(local, q, 3, backend=b)
    assert top.indices[0, 0] == 1004 and top.indices.shape == (1, 3)
    seen, k, tenant = b.calls[-1]
    assert seen.shape == (1, 6) and seen.dtype == np.float32 and seen.flags.c_contiguous
    assert abs(float(np.linalg.norm(seen)) - 1) < 1e-6 and (k, tenant) == (3, None)
    top = retrieve(b, own[:2], 4, backend=b, tenant="a")  # the backend itself as repo
    assert b.calls[-1][2] == "a"
    assert all(tenants[i - 1000] == "a" for i in top.indices.ravel())


def test_search_backend_iv() -> None:
    rng = np.random.default_rng(31)
    b = RowsBackend(random_unit(rng, 5, 4), ["t"] * 5)
    q = random_unit(rng, 1, 4)
    cases = [
        ({"repo": _repo(random_unit(rng, 2, 3))}, "repo"),  # another dim
        ({"repo": q}, "repo"),  # not a repository
        ({"query_vectors": q * 2}, "query_vectors"),
        ({"query_vectors": q[:, :3]}, "query_vectors"),
        ({"k": -1}, "k"),
        ({"ef": 10}, "ef"),  # a named index's knob
        ({"tenant": 3}, "tenant"),
        ({"scan": "int4"}, "scan"),
        ({"backend": object()}, "backend"),
        ({"backend": "pgvector"}, "backend"),  # the store object is the backend now
    ]
    for change, argument in cases:
        kw: dict[str, object] = {"repo": b, "query_vectors": q, "k": 2, "backend": b, **change}
        with pytest.raises(InvalidArgumentError) as info:
            retrieve(kw.pop("repo"), kw.pop("query_vectors"), kw.pop("k"), **kw)  # type: ignore[arg-type]
        assert info.value.argument == argument, change
    assert b.calls == []  # nothing bad reached the backend

    class Broken(RowsBackend):
        def search(self, query_vectors, k, *, tenant=None):  # type: ignore[no-untyped-def]
            return (np.zeros((1, k), np.int64), np.zeros((1, k), np.float32))

    broken = Broken(b.vectors, ["t"] * 5)
    with pytest.raises(InvalidArgumentError) as info:
        retrieve(broken, q, 2, backend=broken)
    assert info.value.argument == "backend"


# ----------------------------------------------------------------------------- named indexes
def test_a_registered_index_is_a_backend_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieve_mod, "_INDEXES", dict(retrieve_mod._INDEXES))
    calls: list[tuple[int, int, int | None]] = []

    def reversed_scan(repo, queries, k, *, tenant_code, ef):  # type: ignore[no-untyped-def]
        calls.append((k, tenant_code, ef))
        codes = None if tenant_code < 0 else repo.tenant_codes
        return _topk_numpy.topk(repo.vectors, -queries, k, codes, tenant_code)

    retrieve_mod.register_index("reversed", reversed_scan)
    assert "reversed" in retrieve_mod.backend_names()
    assert retrieve_mod.check_backend("reversed") == "reversed"
    v = random_unit(np.random.default_rng(32), 10, 5)
    repo = _repo(v, ["a" if i % 2 else "b" for i in range(10)])
    top = retrieve(repo, v[3], 2, backend="reversed", tenant="a", ef=7)
    assert calls == [(2, repo.tenant_code("a"), 7)]
    want = retrieve(repo, -v[3], 2, backend="numpy", tenant="a")
    np.testing.assert_array_equal(top.indices, want.indices)
    retrieve(repo, v[3], 0, backend="reversed")  # nothing to find: the index is not asked
    retrieve(empty_repository(5), v[3], 2, backend="reversed")
    assert len(calls) == 1
    for bad in ("exact", "numpy", "", 3):
        with pytest.raises(InvalidArgumentError) as info:
            retrieve_mod.register_index(bad, reversed_scan)  # type: ignore[arg-type]
        assert info.value.argument == "name"
    with pytest.raises(InvalidArgumentError):
        retrieve_mod.register_index("x", "not callable")  # type: ignore[arg-type]
