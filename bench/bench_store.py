"""Benchmark: a saved 1M x 384 repository — open time, retrieval latency on the opened
(memory-mapped) version, and the journal's append cost per entry.

    python -m pytest bench/bench_store.py --benchmark-min-rounds=3
    BENCH_STORE_N=100000 python -m pytest bench/bench_store.py   # smaller, faster

Baselines in the same run:

* open: building the same repository in memory with ``update(empty_repository(d), ...)``
  from arrays and entries already in RAM (what an open without memory mapping costs at
  least, before any parsing);
* retrieval: the same query on the in-memory repository the file was saved from (the
  opened version must be as fast: it is the same kernel over the mapped pages).

The files are read from the page cache (they were just written; dropping caches needs
root and would disturb other jobs on the machine), so open times are warm-cache times.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.core.retrieve import retrieve
from intercascade_core.storage.journal import Journal
from intercascade_core.storage.store import open_repository, save

N = int(os.environ.get("BENCH_STORE_N", "1000000"))
DIM = 384
STRATEGY = (
    "Track one running total: start from the initial amount, add what is received and "
    "subtract what is given away, in the order the events happen; check the units."
)


def _entries(n: int) -> list[Entry]:
    return [
        Entry(
            f"Problem {i}: Mia has {i % 97} apples and gives away {i % 13}. How many are left?",
            str(i % 97 - i % 13),
            STRATEGY,
            source_level=1,
            source_model="sim-strong",
            created_at=float(i),
            tenant=("a", "b", "c")[i % 3],
        )
        for i in range(n)
    ]


def _vectors(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, DIM), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


@pytest.fixture(scope="module")
def saved():
    entries, vectors = _entries(N), _vectors(N)
    t0 = time.perf_counter()
    repo = update(empty_repository(DIM), entries, vectors)
    t_build = time.perf_counter() - t0
    root = Path(tempfile.mkdtemp(prefix="bench_store_"))
    t0 = time.perf_counter()
    save(root / "repo", repo, model_id="all-MiniLM-L6-v2")
    t_save = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (root / "repo").iterdir())
    info = {"n": N, "build_in_memory_s": t_build, "save_s": t_save, "bytes": size}
    print(
        f"\n[bench_store] n={N} build(update)={t_build:.2f}s save={t_save:.2f}s size={size / 1e9:.2f} GB"
    )
    yield repo, entries, vectors, root / "repo", info
    shutil.rmtree(root, ignore_errors=True)


def test_open_size_verify(benchmark, saved):
    _repo, _, _, path, info = saved
    benchmark.group = f"open n={N}"
    benchmark.extra_info.update(info)
    got = benchmark(open_repository, path, verify="size")
    assert len(got.repository) == N


def test_open_full_verify(benchmark, saved):
    _, _, _, path, info = saved
    benchmark.group = f"open n={N}"
    benchmark.extra_info.update(info)
    got = benchmark.pedantic(
        open_repository, args=(path,), kwargs={"verify": "full"}, rounds=1, iterations=1
    )
    assert len(got.repository) == N


def test_open_baseline_update_from_ram(benchmark, saved):
    _, entries, vectors, _, _ = saved
    benchmark.group = f"open n={N}"
    r = benchmark.pedantic(
        update, args=(empty_repository(DIM), entries, vectors), rounds=1, iterations=1
    )
    assert len(r) == N


@pytest.mark.parametrize(
    ("source", "scan"), [("opened", "auto"), ("opened", "f32"), ("in_memory", "auto")]
)
@pytest.mark.parametrize("tenant", [None, "b"])
def test_retrieve_latency(benchmark, saved, source, scan, tenant):
    """One query, k=10. ``scan="auto"`` uses the int8 scan copy at this size; its first
    call builds that copy (reported as ``first_query_s``, not part of the timing)."""
    repo, _, vectors, path, _ = saved
    target = open_repository(path, verify="size").repository if source == "opened" else repo
    q = np.ascontiguousarray(vectors[12345 % N][None, :])
    t0 = time.perf_counter()
    retrieve(target, q, 10, backend="exact", tenant=tenant, scan=scan)
    benchmark.extra_info["first_query_s"] = time.perf_counter() - t0
    benchmark.group = f"retrieve exact k=10 n={N} tenant={tenant}"
    top = benchmark(retrieve, target, q, 10, backend="exact", tenant=tenant, scan=scan)
    assert top.indices.shape == (1, 10)


@pytest.mark.parametrize("fsync", ["always", "never"])
@pytest.mark.parametrize("batch", [1, 64])
def test_journal_append(benchmark, tmp_path, fsync, batch):
    entries = _entries(batch)
    vec = _vectors(batch)
    j = Journal(tmp_path / "journal.log", dim=DIM, model_id="m", fsync=fsync)
    lsn = [0]

    def append():
        lsn[0] += 1
        j.append(lsn[0], entries, vec)

    benchmark.group = f"journal append batch={batch}"
    benchmark.extra_info["entries_per_call"] = batch
    benchmark(append)
    j.close()
