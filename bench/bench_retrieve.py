"""Retrieval at 1M x 384: exact (C float32, C int8 + float32 re-score), numpy, faiss, hnsw.

    bench/run.sh                     # the fixed flags; results: bench/results/retrieval.md
    BENCH_N=100000 bench/run.sh      # smaller, faster

Baselines in the same run (ratios in the results file are same-run medians):
* numpy: ``V @ q`` + ``np.argpartition`` (+ sort of the k best), batches in chunks
  of 64 queries (a 1024 x 1M score matrix would need 4 GiB);
* faiss ``IndexFlatIP`` when faiss-cpu is installed.
Every timed call is checked: ``extra_info["correct"]`` says whether its top-k equals
the exact float32 top-k (exact paths) or gives ``recall@5`` (hnsw). Data is built and
loaded outside the timed functions (``bench/data.py``).
"""

from __future__ import annotations

import itertools
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import data
from intercascade_core import Entry, empty_repository, retrieve, update
from intercascade_core.storage import hnsw as _ann

_retrieve_mod = sys.modules["intercascade_core.core.retrieve"]
N = int(os.environ.get("BENCH_N", "1000000"))
K = 5
HNSW = _ann.HnswParams(M=16, ef_construction=100, ef=64, seed=100, threads=2)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _info(benchmark: Any, group: str, impl: str, **extra: Any) -> None:
    benchmark.group = group
    caps = _retrieve_mod._ext.capabilities() if _retrieve_mod._ext else ()
    benchmark.extra_info.update(
        impl=impl, n=N, k=K, cpu=_cpu(), capabilities=list(caps), load=os.getloadavg()[0], **extra
    )


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Set:
    def __init__(self, name: str, vectors: np.ndarray, queries: np.ndarray) -> None:
        self.name = name
        entries = [Entry("q", "a", "s")] * len(vectors)
        self.repo = update(empty_repository(vectors.shape[1]), entries, np.asarray(vectors))
        self.queries = np.ascontiguousarray(queries)
        _retrieve_mod._int8_copy(self.repo)  # build the scan copy outside the timings
        self.exact = retrieve(self.repo, self.queries, K, scan="f32")  # the truth for flags


@pytest.fixture(scope="module")
def perturbed() -> _Set:
    return _Set("perturbed-MiniLM", data.perturbed(N), data.perturbed_queries(2048))


@pytest.fixture(scope="module")
def mixed() -> _Set:
    return _Set("mixed-MiniLM", data.mixed(N), data.mixed_queries(2048))


@pytest.fixture(scope="module")
def uniform() -> _Set:
    return _Set("uniform", data.uniform(N), data.uniform(2048, seed=data.SEED + 3))


def _numpy_topk(v: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((q.shape[0], k), np.int64)
    for a in range(0, q.shape[0], 64):
        s = q[a : a + 64] @ v.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(s, part, axis=1)
        out[a : a + 64] = np.take_along_axis(part, np.argsort(-top, axis=1, kind="stable"), axis=1)
    return out


def _exact_call(s: _Set, impl: str, q: np.ndarray) -> np.ndarray:
    if impl == "numpy":
        return _numpy_topk(s.repo.vectors, q, K)
    scan, threads = {
        "f32-1t": ("f32", 1),
        "f32-2t": ("f32", 2),
        "int8-2t": ("int8", 2),
        "int8-1t": ("int8", 1),
    }[impl]
    return retrieve(s.repo, q, K, scan=scan, threads=threads).indices


@pytest.mark.parametrize("dataset", ["uniform", "perturbed"])
@pytest.mark.parametrize("impl", ["numpy", "f32-1t", "f32-2t", "int8-1t", "int8-2t", "faiss"])
def test_one_query(benchmark: Any, request: pytest.FixtureRequest, dataset: str, impl: str) -> None:
    s: _Set = request.getfixturevalue(dataset)
    qs = itertools.cycle(range(64))
    if impl == "faiss":
        faiss = pytest.importorskip("faiss")
        faiss.omp_set_num_threads(2)
        index = faiss.IndexFlatIP(s.repo.dim)
        index.add(np.asarray(s.repo.vectors))
        call = lambda: index.search(s.queries[next(qs)][None], K)[1]  # noqa: E731
        got = np.concatenate([index.search(s.queries[i][None], K)[1] for i in range(8)])
    else:
        call = lambda: _exact_call(s, impl, s.queries[next(qs)][None])  # noqa: E731
        got = np.concatenate([_exact_call(s, impl, s.queries[i][None]) for i in range(8)])
    correct = bool((got == s.exact.indices[:8]).all())
    _info(benchmark, f"1 query, {s.name}, n={N}", impl, correct=correct)
    benchmark.pedantic(call, rounds=15, iterations=1, warmup_rounds=1)
    assert correct or impl in ("numpy", "faiss")  # baselines may order exact ties differently


@pytest.mark.parametrize("batch", [64, 1024])
@pytest.mark.parametrize("impl", ["numpy", "f32-2t", "int8-2t"])
def test_batch(benchmark: Any, perturbed: _Set, batch: int, impl: str) -> None:
    q = perturbed.queries[:batch]
    got = _exact_call(perturbed, impl, q)
    correct = bool((got == perturbed.exact.indices[:batch]).all())
    _info(benchmark, f"batch {batch}, {perturbed.name}, n={N}", impl, correct=correct, batch=batch)
    rounds = 3 if batch == 64 else 1
    benchmark.pedantic(lambda: _exact_call(perturbed, impl, q), rounds=rounds, iterations=1)
    benchmark.extra_info["queries_per_s"] = batch / benchmark.stats.stats.median


def _hnsw(s: _Set, tag: str) -> tuple[_Set, dict[str, float]]:
    path = data.DATA / f"hnsw_{tag}_{N}_M{HNSW.M}_efc{HNSW.ef_construction}.bin"
    stats: dict[str, float] = {}
    rss0 = _rss_mib()
    if path.exists():  # built earlier by this fixture (same rows, same params): load it
        _ann.load_index(s.repo, str(path), HNSW)
        stats["build_s"] = float((path.with_suffix(".build_s")).read_text())
    else:
        t = time.perf_counter()
        _ann.ensure_index(s.repo, HNSW)
        stats["build_s"] = time.perf_counter() - t
        _ann.save_index(s.repo, str(path))
        path.with_suffix(".build_s").write_text(f"{stats['build_s']:.1f}")
    stats["index_file_mib"] = path.stat().st_size / 2**20
    stats["rss_delta_mib"] = _rss_mib() - rss0
    return s, stats


@pytest.fixture(scope="module")
def hnsw_perturbed(perturbed: _Set) -> tuple[_Set, dict[str, float]]:
    return _hnsw(perturbed, "perturbed")


@pytest.fixture(scope="module")
def hnsw_mixed(mixed: _Set) -> tuple[_Set, dict[str, float]]:
    return _hnsw(mixed, "mixed")


@pytest.mark.parametrize("dataset", ["hnsw_perturbed", "hnsw_mixed"])
@pytest.mark.parametrize("ef", [16, 32, 64, 128, 256])
def test_hnsw_query(benchmark: Any, request: pytest.FixtureRequest, dataset: str, ef: int) -> None:
    s, stats = request.getfixturevalue(dataset)
    m = 1000
    approx = np.concatenate(
        [retrieve(s.repo, s.queries[i], K, backend="hnsw", ef=ef).indices for i in range(m)]
    )
    pairs = zip(approx, s.exact.indices[:m], strict=True)
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in pairs)
    recall = hits / (m * K)
    _info(benchmark, f"hnsw 1 query, {s.name}, n={N}", f"hnsw ef={ef}", recall_at_5=recall, **stats)
    qs = itertools.cycle(range(m))
    benchmark.pedantic(
        lambda: retrieve(s.repo, s.queries[next(qs)], K, backend="hnsw", ef=ef),
        rounds=300,
        iterations=1,
    )


def test_hnsw_add_one(benchmark: Any, hnsw_mixed: tuple[_Set, dict[str, float]]) -> None:
    """One incremental add: update() + growing the index by that row (on the newest version)."""
    s, _ = hnsw_mixed
    state = {"repo": s.repo, "i": 0}
    extra = np.asarray(data.perturbed_queries(2048))[1024:]
    e = Entry("q", "a", "s")

    def add() -> None:
        row = extra[state["i"] % 1024][None]
        state["i"] += 1
        state["repo"] = update(state["repo"], [e], row)
        _ann.ensure_index(state["repo"])

    _info(benchmark, f"incremental add, n={N}", "update+hnsw add")
    benchmark.pedantic(add, rounds=200, iterations=1)
    got = retrieve(state["repo"], extra[(state["i"] - 1) % 1024], 1, backend="hnsw").indices[0, 0]
    benchmark.extra_info["newest_found"] = bool(got == len(state["repo"]) - 1)


def test_update_one(benchmark: Any, uniform: _Set) -> None:
    state = {"repo": uniform.repo}
    row = np.asarray(uniform.queries[:1])
    e = Entry("q", "a", "s")

    def add() -> None:
        state["repo"] = update(state["repo"], [e], row)

    _info(benchmark, f"update one entry, n={N}", "update")
    benchmark.pedantic(add, rounds=2000, iterations=1)
    assert len(state["repo"]) == N + 2000


@pytest.mark.parametrize("threads", [1, 2])
def test_read_pass(benchmark: Any, uniform: _Set, threads: int) -> None:
    """The read bound: one read-only pass over the n x 384 float32 matrix (numpy's
    vectorised integer OR-reduction over a uint64 view; halves in 2 threads)."""
    from concurrent.futures import ThreadPoolExecutor

    words = np.asarray(uniform.repo.vectors).view(np.uint64)
    halves = [words[: len(words) // 2], words[len(words) // 2 :]]
    pool = ThreadPoolExecutor(2)

    def one() -> None:
        np.bitwise_or.reduce(words, axis=None)

    def two() -> None:
        list(pool.map(lambda h: np.bitwise_or.reduce(h, axis=None), halves))

    _info(benchmark, f"read pass, n={N}", f"read {threads}t")
    benchmark.pedantic(one if threads == 1 else two, rounds=10, iterations=1)
    pool.shutdown()


def _report(path: str) -> str:
    """Markdown tables (median, ratio to the same group's numpy/read baseline) from a
    pytest-benchmark JSON file: ``python -m bench.bench_retrieve results.json``."""
    import json
    from collections import defaultdict

    doc = json.loads(Path(path).read_text())
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for b in doc["benchmarks"]:
        groups[b["group"]].append(b)
    lines = []
    for group, items in groups.items():
        base = next((b for b in items if b["extra_info"].get("impl") == "numpy"), None)
        lines += [
            f"### {group}",
            "",
            "| impl | median | ratio vs numpy (speed-up) | check | load |",
            "|---|---|---|---|---|",
        ]
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            e, med = b["extra_info"], b["stats"]["median"]
            unit = f"{med * 1e3:.3f} ms" if med < 10 else f"{med:.2f} s"
            if "queries_per_s" in e:
                unit += f" ({e['queries_per_s']:.1f} q/s)"
            ratio = f"{base['stats']['median'] / med:.2f}×" if base else "—"
            check = (
                f"recall@5={e['recall_at_5']:.4f}"
                if "recall_at_5" in e
                else f"top-k equal={e['correct']}"
                if "correct" in e
                else ""
            )
            lines.append(f"| {e['impl']} | {unit} | {ratio} | {check} | {e['load']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def hnsw_curve(n: int, m: int = 500, efs: tuple[int, ...] = (16, 32, 64, 128, 256, 512)) -> str:
    """One run, one process: the recall@5 / p50 curve of plain hnswlib (``rescore=0``)
    and hnswlib + exact re-score (``rescore=4``: 4k candidates through the C gather),
    faiss ``IndexHNSWFlat(M=32)`` as the peer when installed, and the median of one
    incremental add; on ``n`` perturbed-MiniLM rows, ``m`` single queries per point
    (each timed alone; recall from the same calls). ``python -m bench.bench_retrieve
    --curve 200000``."""
    s = _Set("perturbed-MiniLM", data.perturbed(n), data.perturbed_queries(2048))
    truth = retrieve(s.repo, s.queries[:m], K, scan="f32").indices
    params = _ann.HnswParams(M=16, ef_construction=100, ef=64, seed=100, threads=2)
    t = time.perf_counter()
    _ann.ensure_index(s.repo, params)
    build = time.perf_counter() - t
    lines = [
        f"n={n}, d=384, k={K}, {m} single queries per point; nproc={os.cpu_count()}, "
        f"load at start {os.getloadavg()}",
        f"hnswlib M=16 ef_construction=100 build (2 threads): {build:.1f} s",
        "",
        "| index | ef | recall@5 | p50 ms | p90 ms |",
        "|---|---|---|---|---|",
    ]

    def point(name: str, ef: int, call: Any) -> tuple[float, float]:
        times, hits = [], 0
        for i in range(m):
            t0 = time.perf_counter()
            got = call(s.queries[i : i + 1])
            times.append(time.perf_counter() - t0)
            hits += len(set(np.asarray(got).ravel().tolist()) & set(truth[i].tolist()))
        p50, p90 = np.percentile(times, [50, 90]) * 1e3
        lines.append(f"| {name} | {ef} | {hits / (m * K):.4f} | {p50:.3f} | {p90:.3f} |")
        return hits / (m * K), float(p50)

    curve: dict[tuple[str, int], tuple[float, float]] = {}
    for ef in efs:
        for c in (0, 4):
            name = "hnswlib" if c == 0 else "hnswlib + re-score (c=4)"
            curve[(name, ef)] = point(
                name, ef, lambda q, ef=ef, c=c: _ann.search(s.repo, q, K, ef=ef, rescore=c)[0]
            )
    try:
        import faiss
    except ImportError:
        lines.append("| faiss HNSW32 | — | not installed | | |")
    else:
        faiss.omp_set_num_threads(2)
        fx = faiss.IndexHNSWFlat(384, 32, faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        fx.add(np.ascontiguousarray(s.repo.vectors))
        fbuild = time.perf_counter() - t
        lines.insert(2, f"faiss IndexHNSWFlat(M=32, efConstruction=40) build (2 threads): {fbuild:.1f} s")
        faiss.omp_set_num_threads(1)
        for ef in efs:
            fx.hnsw.efSearch = ef
            curve[("faiss", ef)] = point("faiss HNSW32", ef, lambda q: fx.search(q, K)[1])
    extra = np.asarray(data.perturbed_queries(2048))[1024:]
    state = {"repo": s.repo}
    adds = []
    for i in range(200):
        t0 = time.perf_counter()
        state["repo"] = update(state["repo"], [Entry("q", "a", "s")], extra[i][None])
        _ann.ensure_index(state["repo"])
        adds.append(time.perf_counter() - t0)
    lines += ["", f"incremental add (update + hnsw add), 200 rounds: median {np.median(adds) * 1e3:.3f} ms"]
    lines += ["", "same-run ratios, p50 re-score / p50 plain at equal ef:"]
    for ef in efs:
        a, b = curve[("hnswlib", ef)], curve[("hnswlib + re-score (c=4)", ef)]
        lines.append(f"- ef={ef}: {b[1] / a[1]:.2f}× (recall {a[0]:.4f} -> {b[0]:.4f})")
    lines.append(f"load at end {os.getloadavg()}")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--curve":
        print(hnsw_curve(int(sys.argv[2])))
    else:
        print(_report(sys.argv[1]))
