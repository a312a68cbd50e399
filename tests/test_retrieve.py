"""retrieve(): contract tests run against every available exact implementation."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from intercascade_core import Entry, InvalidArgumentError, empty_repository, retrieve, update
from tests.strategies import clustered_unit, entries, random_unit

# the submodule shares the function's name: reach it through sys.modules (importing
# ``intercascade_core.core.retrieve`` first would bind the package attribute to the module)
retrieve_mod = sys.modules["intercascade_core.core.retrieve"]

BACKENDS = ["numpy", "exact"]


@pytest.fixture(params=["numpy", "exact-f32", "exact-int8"])
def impl(request: pytest.FixtureRequest) -> dict[str, str]:
    """Every exact implementation (markupsafe-style): the numpy reference, the C
    float32 scan and the C int8 scan + float32 re-score."""
    if request.param == "numpy":
        return {"backend": "numpy"}
    if not retrieve_mod.extension_available():
        pytest.skip("C extension not built or disabled (INTERCASCADE_NO_EXT=1)")
    return {"backend": "exact", "scan": request.param.split("-")[1]}


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
