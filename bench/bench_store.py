"""Benchmark: a durable store of 1M x 384 — checkpoint, open, the first exact query after
open (the persisted int8 scan copy, memory-mapped), an hnsw index saved and loaded with
the store, and the journal's append cost.

    python -m pytest bench/bench_store.py -p no:cacheprovider -o python_files='bench_*.py' \\
        --benchmark-only --benchmark-disable-gc --benchmark-warmup=off \\
        --benchmark-columns=median,min,max,rounds --benchmark-group-by=group -q -s
    BENCH_STORE_N=100000 BENCH_STORE_HNSW_N=50000 python -m pytest bench/bench_store.py ...

Data: ``bench.data.uniform`` (Gaussian-normalised rows, the exact scan's worst case: no
structure for the int8 bound to exploit) and ~150-character strategies, 3 tenants.

Baselines in the same run:

* first query: the same query on the same files opened *without* the derived data
  (``open_repository(..., derived=False)``), which rebuilds the int8 copy — what every
  open cost before the copy was persisted;
* hnsw: building the index from the rows (what every open cost before it was saved).

The files are read from the page cache (they were just written; dropping caches needs
root and would disturb other jobs on the machine), so open times are warm-cache times.
Timings that ``-s`` prints as ``[bench_store]`` lines are single measurements of steps
too slow to repeat (a build, a checkpoint).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.data import uniform
from intercascade_core.core.repository import Entry, Repository, empty_repository, update
from intercascade_core.core.retrieve import int8_scan_copy, retrieve
from intercascade_core.storage import hnsw
from intercascade_core.storage.journal import CURRENT, DurableStore, Journal
from intercascade_core.storage.store import open_repository

N = int(os.environ.get("BENCH_STORE_N", "1000000"))
HNSW_N = int(os.environ.get("BENCH_STORE_HNSW_N", "200000"))
DIM = 384
MODEL = "all-MiniLM-L6-v2"
ROUNDS = 7
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


def _say(msg: str) -> None:
    print(f"\n[bench_store] {msg}", flush=True)


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def store() -> Iterator[dict[str, Any]]:
    """A checkpointed 1M store (snapshot with its int8 scan copy, empty journal)."""
    vectors = np.ascontiguousarray(uniform(N))
    entries = _entries(N)
    repo, t_build = _timed(update, empty_repository(DIM), entries, vectors)
    root = Path(tempfile.mkdtemp(prefix="bench_store_")) / "store"
    ds = DurableStore.open(root, dim=DIM, model_id=MODEL)
    _, t_int8 = _timed(int8_scan_copy, repo)
    _, t_ckpt = _timed(ds.checkpoint, repo)
    # a second checkpoint after 1000 more rows: the copy is extended, not rebuilt
    extra = update(repo, _entries(1000), np.ascontiguousarray(uniform(1000, seed=7)))
    ds.log(extra.entries[N:], extra.vectors[N:])
    _, t_ckpt2 = _timed(ds.checkpoint, extra)
    ds.close()
    snap = root / (root / CURRENT).read_text().strip()
    size = sum(f.stat().st_size for f in snap.iterdir())
    scan = sum(f.stat().st_size for f in snap.glob("scan.*"))
    info = {
        "n": N,
        "build_in_memory_s": t_build,
        "int8_build_s": t_int8,
        "checkpoint_s": t_ckpt,
        "checkpoint_after_1000_more_s": t_ckpt2,
        "snapshot_bytes": size,
        "scan_copy_bytes": scan,
    }
    _say(
        f"n={N} update={t_build:.1f}s int8 build={t_int8:.1f}s checkpoint (write + fsync + "
        f"sha256, copy already built)={t_ckpt:.1f}s checkpoint after 1000 more rows={t_ckpt2:.1f}s "
        f"snapshot={size / 1e9:.2f} GB (scan copy {scan / 1e9:.2f} GB)"
    )
    q = np.ascontiguousarray(uniform(64, seed=99))
    yield {"root": root, "snap": snap, "queries": q, "info": info, "n": N + 1000}
    shutil.rmtree(root.parent, ignore_errors=True)


def test_open_size_verify(benchmark: Any, store: dict[str, Any]) -> None:
    benchmark.group = f"open n={store['n']}"
    benchmark.extra_info.update(store["info"])

    def op() -> None:
        DurableStore.open(store["root"], dim=DIM, model_id=MODEL, verify="size").close()

    benchmark.pedantic(op, rounds=ROUNDS, iterations=1)


def test_open_full_verify(benchmark: Any, store: dict[str, Any]) -> None:
    benchmark.group = f"open n={store['n']}"

    def op() -> None:
        DurableStore.open(store["root"], dim=DIM, model_id=MODEL, verify="full").close()

    benchmark.pedantic(op, rounds=1, iterations=1)


def test_first_exact_query_after_open(benchmark: Any, store: dict[str, Any]) -> None:
    """Each round opens the store afresh (verify="size") and times its first exact
    query (k=10, scan="auto": the int8 copy mapped from the snapshot)."""
    benchmark.group = f"first exact query after open n={store['n']}"
    opened: list[DurableStore] = []
    i = iter(range(1000))

    def setup() -> tuple[tuple[Repository, np.ndarray], dict[str, Any]]:
        for prev in opened:
            prev.close()  # one writer at a time: release the lock of the previous round
        ds = DurableStore.open(store["root"], dim=DIM, model_id=MODEL, verify="size")
        opened.append(ds)
        k = next(i) % len(store["queries"])
        return (ds.repository, store["queries"][k : k + 1]), {}

    def first(repo: Repository, q: np.ndarray) -> None:
        top = retrieve(repo, q, 10, backend="exact")
        assert top.indices.shape == (1, 10)

    benchmark.pedantic(first, setup=setup, rounds=ROUNDS, iterations=1)
    for ds in opened:
        ds.close()


def test_first_exact_query_baseline_rebuilds_the_copy(
    benchmark: Any, store: dict[str, Any]
) -> None:
    """The same files opened without the derived data: the first query builds the copy."""
    benchmark.group = f"first exact query after open n={store['n']}"

    def setup() -> tuple[tuple[Repository, np.ndarray], dict[str, Any]]:
        got = open_repository(store["snap"], verify="size", derived=False).repository
        return (got, store["queries"][:1]), {}

    def first(repo: Repository, q: np.ndarray) -> None:
        retrieve(repo, q, 10, backend="exact")

    benchmark.pedantic(first, setup=setup, rounds=1, iterations=1)


@pytest.mark.parametrize("scan", ["auto", "f32"])
def test_query_latency_on_the_opened_store(
    benchmark: Any, store: dict[str, Any], scan: str
) -> None:
    """Steady state on the opened (mapped) store: one query, k=10."""
    benchmark.group = f"exact query on the opened store n={store['n']}"
    ds = DurableStore.open(store["root"], dim=DIM, model_id=MODEL, verify="size", readonly=True)
    q = store["queries"][5:6]
    retrieve(ds.repository, q, 10, scan=scan)  # type: ignore[arg-type]
    benchmark(retrieve, ds.repository, q, 10, scan=scan)
    ds.close()


# ----------------------------------------------------------------------------- hnsw at HNSW_N
@pytest.fixture(scope="module")
def hnsw_store() -> Iterator[dict[str, Any]]:
    vectors = np.ascontiguousarray(uniform(N)[:HNSW_N])
    repo = update(empty_repository(DIM), _entries(HNSW_N), vectors)
    _, t_build = _timed(hnsw.ensure_index, repo)
    root = Path(tempfile.mkdtemp(prefix="bench_store_hnsw_")) / "store"
    ds = DurableStore.open(root, dim=DIM, model_id=MODEL)
    _, t_ckpt = _timed(ds.checkpoint, repo)
    ds.close()
    snap = root / (root / CURRENT).read_text().strip()
    isize = (snap / "hnsw.bin").stat().st_size
    _say(
        f"hnsw n={HNSW_N}: build={t_build:.1f}s; checkpoint with index + scan copy="
        f"{t_ckpt:.1f}s; index file {isize / 1e9:.2f} GB"
    )
    yield {
        "root": root,
        "repo": repo,
        "build_s": t_build,
        "queries": np.ascontiguousarray(uniform(8, seed=98)),
    }
    shutil.rmtree(root.parent, ignore_errors=True)


def test_hnsw_open_loads_the_saved_index(benchmark: Any, hnsw_store: dict[str, Any]) -> None:
    """Open (verify="size": the index file is checksummed anyway, then loaded and
    checked) and the first hnsw query; the build it replaces is in extra_info."""
    benchmark.group = f"hnsw open + first query n={HNSW_N}"
    benchmark.extra_info["build_s"] = hnsw_store["build_s"]

    def op() -> None:
        ds = DurableStore.open(hnsw_store["root"], dim=DIM, model_id=MODEL, verify="size")
        assert hnsw.index_stats(ds.repository)["count"] == HNSW_N
        retrieve(ds.repository, hnsw_store["queries"][:1], 10, backend="hnsw")
        ds.close()

    benchmark.pedantic(op, rounds=3, iterations=1)


# ----------------------------------------------------------------------------- journal
@pytest.mark.parametrize("fsync", ["always", "never"])
@pytest.mark.parametrize("batch", [1, 64])
def test_journal_append(benchmark: Any, tmp_path: Path, fsync: str, batch: int) -> None:
    entries = _entries(batch)
    vec = np.ascontiguousarray(uniform(batch, seed=5))
    j = Journal(tmp_path / "journal.log", dim=DIM, model_id="m", fsync=fsync)  # type: ignore[arg-type]
    lsn = [0]

    def append() -> None:
        lsn[0] += 1
        j.append(lsn[0], entries, vec)

    benchmark.group = f"journal append batch={batch}"
    benchmark.extra_info["entries_per_call"] = batch
    benchmark(append)
    j.close()
