"""Benchmark: the PostgreSQL + pgvector shared repository against the local paths.

For each size N (clustered synthetic 384-d unit vectors, seeded) on a fresh pgserver
instance (PostgreSQL 16 + pgvector 0.6, unix socket, same machine):

* insert throughput — ``PgVectorStore.push`` with the HNSW index maintained on insert
  (the first ``--incremental`` rows, batches of 500: what steady-state writes pay), then
  a bulk import (``drop_ann_index``, batches of ``--batch``, ``create_ann_index``: the
  index build time is reported separately), entries/s; and single-entry pushes (what a
  cascade does per taught strategy), ms each;
* sync latency — one deployment pushes one entry, another's ``PgSync.pull`` applies
  it: ms per round; plus the initial full pull of N entries (entries/s);
* top-5 latency per single query — server HNSW (``ef_search`` 64), server exact
  (sequential scan), local ``retrieve(backend="exact")`` (C extension) and
  ``retrieve(backend="hnsw")`` (hnswlib), median and p95; recall@5 of both
  approximate paths against exact.

    python bench/bench_pgvector.py --sizes 100000 --out bench/results/pgvector.md

Runs as root too (pgserver then runs PostgreSQL as a ``pgserver`` system user).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384


def clustered(n: int, seed: int, n_clusters: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, DIM), np.float32)
    for a in range(0, n, 50_000):
        b = min(n, a + 50_000)
        x = centers[rng.integers(0, n_clusters, b - a)] + 0.06 * rng.standard_normal((b - a, DIM)).astype(np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def entries(lo: int, hi: int, prefix: str = "q") -> list[Any]:
    from intercascade_core.core.repository import Entry

    return [Entry(f"{prefix} {i}: what is the answer", f"{i}", f"strategy {prefix} {i}: reduce to a known form")
            for i in range(lo, hi)]


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(n: int, batch: int, n_queries: int, n_exact_queries: int, n_incremental: int, ann_max: int,
        mwm: str = "1GB") -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    from intercascade_core.core.retrieve import retrieve
    from intercascade_core.storage.pgvector import PgVectorStore
    from intercascade_core.storage.sync import PgSync

    base = Path(tempfile.mkdtemp(prefix="intercascade-pg-bench-"))
    base.chmod(0o755)
    srv = pgserver.get_server(base / "data", cleanup_mode="stop")
    res: dict[str, Any] = {"n": n}
    try:
        url = srv.get_uri()
        x = clustered(n, seed=n)
        rng = np.random.default_rng(1)
        qi = rng.choice(n, n_queries, replace=False)
        q = x[qi] + 0.03 * rng.standard_normal((n_queries, DIM)).astype(np.float32)
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        with PgVectorStore.connect(url, DIM) as store:
            # insert throughput, HNSW index maintained row by row (what steady-state writes pay)
            n_inc = min(n, n_incremental)
            t_inc = timed(lambda: [store.push(entries(a, min(n_inc, a + 500)), x[a:min(n_inc, a + 500)])
                                   for a in range(0, n_inc, 500)])
            res["insert_indexed_eps"], res["n_inc"] = n_inc / t_inc, n_inc
            # bulk import: drop the index, load the rest, build the index once
            store.drop_ann_index()
            t_bulk = timed(lambda: [store.push(entries(a, min(n, a + batch)), x[a:min(n, a + batch)])
                                    for a in range(n_inc, n, batch)])
            res["insert_bulk_eps"] = (n - n_inc) / t_bulk if n > n_inc else float("nan")
            ann = n <= ann_max
            res["index_build_s"] = timed(lambda: store.create_ann_index(maintenance_work_mem=mwm)) if ann else None
            # single-entry pushes
            xs = clustered(100, seed=7)
            res["push1_ms"] = [1e3 * timed(lambda i=i: store.push(entries(i, i + 1, "one"), xs[i:i + 1]))
                               for i in range(100)]
            # initial full pull by a fresh deployment
            reader = PgSync(store)
            t_pull = timed(reader.pull)
            res["full_pull_eps"] = len(reader.repo) / t_pull
            res["full_pull_s"] = t_pull
            # sync latency: push one entry from another deployment, pull it here
            writer = PgSync(store)
            ys = clustered(100, seed=9)
            lat = []
            for i in range(100):
                writer.push(entries(i, i + 1, "sync"), ys[i:i + 1])
                lat.append(1e3 * timed(reader.pull))
            res["sync_ms"] = lat
            res["pull_only_ms"] = [1e3 * timed(reader.pull) for _ in range(50)]  # nothing new

            # local copy of exactly the server's rows (id order) for the local paths
            local = reader.repo
            ids = np.array([e.id for e in local.entries])
            # server top-5
            srv_hnsw, t_sh = [], []
            for i in range(n_queries if ann else 0):
                t = time.perf_counter()
                r = store.search(q[i:i + 1], 5)
                t_sh.append(1e3 * (time.perf_counter() - t))
                srv_hnsw.append(r.indices[0])
            t_se, srv_exact = [], []
            for i in range(n_exact_queries):
                t = time.perf_counter()
                r = store.search(q[i:i + 1], 5, exact=True)
                t_se.append(1e3 * (time.perf_counter() - t))
                srv_exact.append(r.indices[0])
            res["srv_hnsw_ms"], res["srv_exact_ms"] = t_sh, t_se
        # local paths
        retrieve(local, q[:1], 5, backend="exact")  # int8 copy built outside the timing
        t_le, loc_exact = [], []
        for i in range(n_queries):
            t = time.perf_counter()
            r = retrieve(local, q[i:i + 1], 5, backend="exact")
            t_le.append(1e3 * (time.perf_counter() - t))
            loc_exact.append(ids[r.indices[0]])
        t_build = timed(lambda: retrieve(local, q[:1], 5, backend="hnsw")) if ann else None
        t_lh, loc_hnsw = [], []
        for i in range(n_queries if ann else 0):
            t = time.perf_counter()
            r = retrieve(local, q[i:i + 1], 5, backend="hnsw")
            t_lh.append(1e3 * (time.perf_counter() - t))
            loc_hnsw.append(ids[r.indices[0]])
        res["loc_exact_ms"], res["loc_hnsw_ms"], res["loc_hnsw_build_s"] = t_le, t_lh, t_build

        def recall(got: list[Any]) -> float:
            if not got:
                return float("nan")
            return sum(len(set(g.tolist()) & set(e.tolist())) for g, e in zip(got, loc_exact)) / (5 * len(got))

        res["recall_srv_hnsw"] = recall(srv_hnsw)
        res["recall_loc_hnsw"] = recall(loc_hnsw)
        agree = sum(np.array_equal(a, b) for a, b in zip(srv_exact, loc_exact))
        res["exact_agree"] = f"{agree}/{len(srv_exact)}"
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            srv.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    return res


def report(results: list[dict[str, Any]], cmd: str) -> str:
    def ms(xs: list[float]) -> str:
        return f"{pct(xs, 50):.3g} / {pct(xs, 95):.3g}" if xs else "not run (no index at this size)"

    def build(r: dict[str, Any]) -> str:
        return "not built" if r["index_build_s"] is None else f"{r['index_build_s']:.0f} s"

    def med(xs: list[float]) -> float:
        return pct(xs, 50) if xs else float("nan")

    lines = [
        "# PostgreSQL + pgvector shared repository — benchmark",
        "",
        f"`{cmd}` — {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        "(shared with other jobs, so absolute times are noisy); PostgreSQL 16.2 + pgvector 0.6.2 "
        "from pgserver on a unix socket on the same machine, default postgresql.conf; "
        "clustered synthetic 384-d unit vectors (200 clusters, seeded).",
        "",
        "Latencies are per single query / operation, median / p95 in ms.",
        "",
        "| N | insert, HNSW maintained (first rows, batches of 500) | bulk insert, no index | HNSW index build "
        "| push 1 entry (ms) | full pull | sync: pull applying 1 new entry (ms) | pull, nothing new (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']:,} | {r['insert_indexed_eps']:,.0f} entries/s (first {r['n_inc']:,}) "
            f"| {r['insert_bulk_eps']:,.0f} entries/s | {build(r)} | {ms(r['push1_ms'])} "
            f"| {r['full_pull_eps']:,.0f} entries/s ({r['full_pull_s']:.1f} s) | {ms(r['sync_ms'])} "
            f"| {ms(r['pull_only_ms'])} |"
        )
    lines += [
        "",
        "| N | server HNSW top-5 | server exact top-5 | local exact (C) top-5 | local hnsw top-5 "
        "| recall@5 server HNSW | recall@5 local hnsw | server exact == local exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']:,} | {ms(r['srv_hnsw_ms'])} | {ms(r['srv_exact_ms'])} | {ms(r['loc_exact_ms'])} "
            f"| {ms(r['loc_hnsw_ms'])} | {r['recall_srv_hnsw']:.3f} | {r['recall_loc_hnsw']:.3f} "
            f"| {r['exact_agree']} queries |"
        )
    lines += [
        "",
        "Ratios (median latency, server / local exact C): "
        + ", ".join(
            f"N={r['n']:,}: server HNSW {med(r['srv_hnsw_ms']) / med(r['loc_exact_ms']):.2g}x, "
            f"server exact {pct(r['srv_exact_ms'], 50) / pct(r['loc_exact_ms'], 50):.2g}x"
            for r in results
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=20)
    ap.add_argument("--incremental", type=int, default=2000, help="rows inserted with the index in place")
    ap.add_argument("--ann-max", type=int, default=200_000,
                    help="above this size skip the HNSW index builds (server and local)")
    ap.add_argument("--maintenance-work-mem", default="1GB", help="for the server's HNSW build")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    results = []
    for n in a.sizes:
        t = time.perf_counter()
        results.append(run(n, a.batch, a.queries, a.exact_queries, a.incremental, a.ann_max, a.maintenance_work_mem))
        print(f"N={n}: done in {time.perf_counter() - t:.0f} s", flush=True)
    cmd = "python bench/bench_pgvector.py --sizes " + " ".join(map(str, a.sizes))
    text = report(results, cmd)
    print(text)
    if a.out:
        a.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
