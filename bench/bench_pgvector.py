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

    python bench/bench_pgvector.py --sizes 100000

``--sweep``: the search curve instead, on a table kept under ``bench/data/pgvector-<N>/``
(built on the first run, reused after): ``ef_search`` x path (plain server HNSW, or
``overfetch·k`` rows re-scored exactly) on calibration queries, ``search(recall=r)`` for
each row of the library's table on held-out queries, per ``--shared-buffers`` setting:

    python bench/bench_pgvector.py --sweep --sizes 1000000 --queries 200 --exact-queries 3 \
        --shared-buffers 128MB 4GB --ef 40 64 100 150 200 300 400 500 600 800 1000 --overfetch 1 2 4

``--index-m`` / ``--index-ef-construction`` build the server's HNSW index with other options
(``PgVectorStore(index_m=, index_ef_construction=)``; cached separately, e.g.
``bench/data/pgvector-200000-m32-efc200/``).

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


def pg_server(pgdata: Path) -> Any:
    """Start (or join) the pgserver instance on ``pgdata``; ``cleanup()`` stops it and
    keeps the data (platformdirs warns at import when XDG_RUNTIME_DIR is unset)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

        return get_server(pgdata, cleanup_mode="stop")


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(n: int, batch: int, n_queries: int, n_exact_queries: int, n_incremental: int, ann_max: int,
        mwm: str = "1GB", m: int = 16, efc: int = 64) -> dict[str, Any]:
    from intercascade_core.core.retrieve import retrieve
    from intercascade_core.storage.pgvector import PgVectorStore
    from intercascade_core.storage.sync import PgSync

    base = Path(tempfile.mkdtemp(prefix="intercascade-pg-bench-"))
    base.chmod(0o755)
    srv = pg_server(base / "data")
    res: dict[str, Any] = {"n": n}
    try:
        url = srv.get_uri()
        x = clustered(n, seed=n)
        rng = np.random.default_rng(1)
        qi = rng.choice(n, n_queries, replace=False)
        q = x[qi] + 0.03 * rng.standard_normal((n_queries, DIM)).astype(np.float32)
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        with PgVectorStore.connect(url, DIM, index_m=m, index_ef_construction=efc) as store:
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
            return sum(len(set(g.tolist()) & set(e.tolist())) for g, e in zip(got, loc_exact, strict=True)) / (5 * len(got))

        res["recall_srv_hnsw"] = recall(srv_hnsw)
        res["recall_loc_hnsw"] = recall(loc_hnsw)
        agree = sum(np.array_equal(a, b) for a, b in zip(srv_exact, loc_exact, strict=False))
        res["exact_agree"] = f"{agree}/{len(srv_exact)}"
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            srv.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    return res


CACHE = Path(__file__).parent / "data"


def cache_dir(cache_root: Path, n: int, m: int, efc: int) -> Path:
    """``pgvector-<n>`` for the library's default index (m 16, ef_construction 64: the
    name the earlier runs used), ``pgvector-<n>-m<m>-efc<efc>`` for any other."""
    return cache_root / (f"pgvector-{n}" if (m, efc) == (16, 64) else f"pgvector-{n}-m{m}-efc{efc}")


def cached_table(n: int, cache_root: Path, mwm: str, m: int = 16, efc: int = 64) -> tuple[Any, dict[str, Any]]:
    """A running pgserver whose default table holds ``clustered(n, seed=n)`` (ids 1..n in
    row order) with an HNSW index built with ``m`` / ``ef_construction`` ``efc``, kept
    under :func:`cache_dir` so that only the first run pays the bulk load and the index
    build (``meta.json``, written last, marks a complete cache and records both times).
    Returns ``(server, meta)``; stop the server with ``server.cleanup()``."""
    import json

    from intercascade_core.storage.pgvector import PgVectorStore

    d = cache_dir(cache_root, n, m, efc)
    meta_path = d / "meta.json"
    if meta_path.exists():
        srv = pg_server(d / "pgdata")
        meta = json.loads(meta_path.read_text())
        meta["reused"] = True
        return srv, meta
    shutil.rmtree(d, ignore_errors=True)  # an unfinished earlier attempt
    d.mkdir(parents=True)
    for p in (d, d.parent):  # the pgserver system user (when run as root) must reach pgdata
        p.chmod(0o755)
    srv = pg_server(d / "pgdata")
    x = clustered(n, seed=n)
    with PgVectorStore.connect(srv.get_uri(), DIM, index_m=m, index_ef_construction=efc) as store:
        store.drop_ann_index()
        t_load = timed(lambda: [store.push(entries(a, min(n, a + 5000)), x[a:min(n, a + 5000)])
                                for a in range(0, n, 5000)])
        t_build = timed(lambda: store.create_ann_index(maintenance_work_mem=mwm))
        if not (store.count() == n == store.max_id()):
            raise RuntimeError(f"cache build: expected ids 1..{n}, got {store.count()} rows, max id {store.max_id()}")
    meta = {"n": n, "seed": n, "dim": DIM, "m": m, "ef_construction": efc, "maintenance_work_mem": mwm,
            "load_s": t_load, "index_build_s": t_build, "nproc": os.cpu_count(),
            "load_avg_at_build": os.getloadavg(), "reused": False}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(meta_path)
    return srv, meta


def query_set(x: np.ndarray, n_queries: int, seed: int) -> np.ndarray:
    """Perturbed copies of random rows (noise 0.03), unit norm: what the earlier runs
    used with seed 1."""
    rng = np.random.default_rng(seed)
    qi = rng.choice(x.shape[0], n_queries, replace=False)
    q = x[qi] + 0.03 * rng.standard_normal((n_queries, DIM)).astype(np.float32)
    out: np.ndarray = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return out


def restart_with(srv: Any, shared_buffers: str) -> Any:
    """Restart the server with ``shared_buffers`` (ALTER SYSTEM; kept in the cache)."""
    import psycopg

    with psycopg.connect(srv.get_uri(), autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}'")
    pgdata = Path(srv.pgdata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        srv.cleanup()
    return pg_server(pgdata)


def recall_lower_bound(hits: list[int], k: int) -> float:
    """One-sided 95% lower confidence bound of the mean recall@k over queries (normal
    approximation over per-query recalls, which are independent across queries while
    the k slots of one query are not)."""
    r = np.asarray(hits, float) / k
    return float(r.mean() - 1.645 * r.std(ddof=1) / np.sqrt(r.size)) if r.size > 1 else float("nan")


def sweep(n: int, n_queries: int, efs: list[int], overfetches: list[int], n_exact: int, cache_root: Path,
          mwm: str, shared_buffers: list[str], k: int = 5, n_explain: int = 20, m: int = 16,
          efc: int = 64) -> dict[str, Any]:
    """The search sweep at size ``n`` on the cached table (see :func:`cached_table`).

    Ground truth: the local reference scan (``_topk_numpy``) over the rows exactly as
    the server stores them (ids 1..n in row order, checked). For each ``shared_buffers``
    setting (server restarted; then 200 warm-up queries of a third seed at the largest
    breadth, untimed): on a calibration query set (seed 1) every (ef_search, path)
    configuration answers every query, in a fresh random order per query, so load
    drifts hit all configurations alike; paths: plain server HNSW (``rescore=False``)
    and fetch ``c·k`` rows + exact re-score for each ``c``. Then on a held-out set
    (seed 2) ``search(recall=r)`` for each row of the library's table, against plain
    HNSW at the default breadth in the same loop.
    """
    import json

    from intercascade_core.core import _topk_numpy
    from intercascade_core.core.repository import unit_rows
    from intercascade_core.storage.pgvector import (
        RECALL_EF_SEARCH,
        PgVectorStore,
        _rounded_unit,
        _Vec,
    )

    t0 = time.perf_counter()
    srv, meta = cached_table(n, cache_root, mwm, m, efc)
    res: dict[str, Any] = {"n": n, "k": k, "meta": meta, "setup_s": time.perf_counter() - t0,
                           "loadavg_start": os.getloadavg(), "runs": []}
    try:
        x = clustered(n, seed=n)
        q_cal, q_val = query_set(x, n_queries, seed=1), query_set(x, n_queries, seed=2)
        q_warm = query_set(x, 200, seed=4)
        for a in range(0, n, 50_000):  # in place: the rows as push() stored them
            x[a:a + 50_000] = _rounded_unit(x[a:a + 50_000])
        # queries as retrieve() and search() score them: renormalised by unit_rows
        ref_cal = _topk_numpy.topk(x, unit_rows(q_cal, DIM), k)
        truth_cal, truth_val = ref_cal[0] + 1, _topk_numpy.topk(x, unit_rows(q_val, DIM), k)[0] + 1
        rng = np.random.default_rng(3)
        for sb in shared_buffers:
            srv = restart_with(srv, sb)
            run: dict[str, Any] = {"shared_buffers": sb}
            res["runs"].append(run)
            with PgVectorStore.connect(srv.get_uri(), DIM, max_size=1, index_m=m,
                                       index_ef_construction=efc) as store:
                with store._conn() as conn:
                    row = conn.execute(
                        "SELECT pg_size_pretty(pg_relation_size('intercascade_strategies_embedding_hnsw')),"
                        " pg_size_pretty(pg_table_size('intercascade_strategies')), current_setting('shared_buffers')"
                    ).fetchone()
                    assert row is not None
                    run["index_size"], run["table_size"], run["shared_buffers_shown"] = row
                head, tail = store.pull_since(0, limit=3), store.pull_since(n - 3)
                assert [e.id for e in head.entries + tail.entries] == [1, 2, 3, n - 2, n - 1, n]
                assert np.array_equal(head.vectors, x[:3]) and np.array_equal(tail.vectors, x[-3:])
                t = time.perf_counter()
                for i in range(q_warm.shape[0]):  # untimed: graph pages into the caches
                    store.search(q_warm[i:i + 1], k, ef_search=max(efs), rescore=False)
                run["warmup_s"] = time.perf_counter() - t
                # the server's exact scan, re-scored, equals the local reference bit for bit
                t_ex, agree = [], 0
                for i in range(n_exact):
                    t = time.perf_counter()
                    r = store.search(q_cal[i:i + 1], k, exact=True)
                    t_ex.append(1e3 * (time.perf_counter() - t))
                    agree += bool(np.array_equal(r.indices[0], truth_cal[i])
                                  and np.array_equal(r.scores[0], ref_cal[1][i]))
                run["exact_ms"], run["exact_agree"] = t_ex, f"{agree}/{n_exact}"
                # inside the server: execution time and buffer traffic of the index scan
                run["explain"] = {}
                for ef in efs:
                    ex_ms, hit, read = [], [], []
                    with store._conn() as conn:
                        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
                        for i in range(min(n_explain, n_queries)):
                            plan = conn.execute(
                                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT id FROM intercascade_strategies"
                                " ORDER BY embedding <=> %s LIMIT %s", (_Vec(_rounded_unit(q_cal[i:i + 1])[0]), k)).fetchone()
                            assert plan is not None
                            top_plan = plan[0][0]
                            ex_ms.append(top_plan["Execution Time"])
                            hit.append(top_plan["Plan"]["Shared Hit Blocks"])
                            read.append(top_plan["Plan"]["Shared Read Blocks"])
                            assert "hnsw" in json.dumps(top_plan)
                    run["explain"][ef] = {"ms": ex_ms, "hit": hit, "read": read}
                configs = [("plain", ef, 0) for ef in efs] + [
                    ("rescore", ef, c) for ef in efs for c in overfetches if c * k <= ef]
                ms: dict[Any, list[float]] = {cfg: [] for cfg in configs}
                hits: dict[Any, list[int]] = {cfg: [] for cfg in configs}
                t = time.perf_counter()
                for i in range(n_queries):
                    for j in rng.permutation(len(configs)):
                        path, ef, c = cfg = configs[j]
                        kw: dict[str, Any] = {"rescore": False} if path == "plain" else {"overfetch": c}
                        t1 = time.perf_counter()
                        r = store.search(q_cal[i:i + 1], k, ef_search=ef, **kw)
                        ms[cfg].append(1e3 * (time.perf_counter() - t1))
                        hits[cfg].append(len(set(r.indices[0].tolist()) & set(truth_cal[i].tolist())))
                run["sweep_s"] = time.perf_counter() - t
                run["curve"] = [{"path": p, "ef": ef, "c": c, "recall": sum(hits[(p, ef, c)]) / (k * n_queries),
                                 "recall_lb": recall_lower_bound(hits[(p, ef, c)], k), "hits": hits[(p, ef, c)],
                                 "ms": ms[(p, ef, c)]} for (p, ef, c) in configs]
                # held-out queries: the recall= parameter against the default plain breadth
                vcfg: list[Any] = [("plain, ef_search 64", None)] + [
                    (f"recall={r} (ef_search {ef})", r) for r, ef in RECALL_EF_SEARCH]
                vms: dict[str, list[float]] = {name: [] for name, _ in vcfg}
                vhits: dict[str, list[int]] = {name: [] for name, _ in vcfg}
                for i in range(n_queries):
                    for j in rng.permutation(len(vcfg)):
                        name, rr = vcfg[j]
                        kw = {"rescore": False, "ef_search": 64} if rr is None else {"recall": rr}
                        t1 = time.perf_counter()
                        top = store.search(q_val[i:i + 1], k, **kw)
                        vms[name].append(1e3 * (time.perf_counter() - t1))
                        vhits[name].append(len(set(top.indices[0].tolist()) & set(truth_val[i].tolist())))
                run["heldout"] = [{"name": name, "recall": sum(vhits[name]) / (k * n_queries),
                                   "target": rr, "ms": vms[name]} for name, rr in vcfg]
    finally:
        res["loadavg_end"] = os.getloadavg()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            srv.cleanup()
    return res


def sweep_report(r: dict[str, Any], cmd: str, wall_s: float) -> str:
    def mp(xs: list[float]) -> str:
        return f"{pct(xs, 50):.3g} / {pct(xs, 95):.3g}"

    meta = r["meta"]
    lines = [
        f"`{cmd}` — {wall_s:.0f} s wall ({r['setup_s']:.0f} s to get the table: "
        + ("cached" if meta["reused"] else "built now")
        + f"; load {meta['load_s']:.0f} s, HNSW build {meta['index_build_s']:.0f} s when built), "
        f"nproc {os.cpu_count()}, load average {r['loadavg_start'][0]:.1f} at start, "
        f"{r['loadavg_end'][0]:.1f} at end. N = {r['n']:,}, k = {r['k']}; HNSW m {meta['m']}, "
        f"ef_construction {meta['ef_construction']} (maintenance_work_mem {meta['maintenance_work_mem']}).",
        "",
    ]
    for run in r["runs"]:
        base = {c["ef"]: c for c in run["curve"] if c["path"] == "plain"}
        cs = sorted({c["c"] for c in run["curve"] if c["path"] == "rescore"})
        lines += [
            f"### shared_buffers {run['shared_buffers_shown']} (index {run['index_size']}, "
            f"table {run['table_size']}; warm-up {run['warmup_s']:.0f} s, sweep {run['sweep_s']:.0f} s, "
            f"{len(run['curve'][0]['ms'])} queries per configuration)",
            "",
            f"Server exact scan + re-score: {mp(run['exact_ms'])} ms; equal to the local reference "
            f"(ids and float32 scores, bit for bit) on {run['exact_agree']} queries.",
            "",
            "| ef_search | in server: execution p50 ms, buffers hit / read | plain HNSW: recall@5 (95% lower bound) "
            "| p50 / p95 ms | "
            + " | ".join(f"re-score c={c}: recall@5 | p50 / p95 ms | p50 vs plain" for c in cs) + " |",
            "|---|---|---|---|" + "---|---|---|" * len(cs),
        ]
        for ef, b in sorted(base.items()):
            e = run["explain"][ef] if ef in run["explain"] else run["explain"][str(ef)]
            row = (f"| {ef} | {pct(e['ms'], 50):.3g}, {pct(e['hit'], 50):,.0f} / {pct(e['read'], 50):,.0f} "
                   f"| {b['recall']:.3f} ({b['recall_lb']:.3f}) | {mp(b['ms'])} |")
            for c in cs:
                m = [x for x in run["curve"] if x["path"] == "rescore" and x["ef"] == ef and x["c"] == c]
                row += (f" {m[0]['recall']:.3f} | {mp(m[0]['ms'])} | "
                        f"{pct(m[0]['ms'], 50) / pct(b['ms'], 50):.2f}x |" if m else " — | — | — |")
            lines.append(row)
        lines += ["", "Held-out queries (another seed), `search(q, 5, recall=r)` with the library's table:", "",
                  "| call | recall@5 | p50 / p95 ms |", "|---|---|---|"]
        for h in run["heldout"]:
            lines.append(f"| {h['name']} | {h['recall']:.3f} | {mp(h['ms'])} |")
        lines.append("")
    return "\n".join(lines)


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
    ap.add_argument("--sweep", action="store_true",
                    help="search sweep (ef_search x over-fetch, re-score vs plain) on a table cached under --cache")
    ap.add_argument("--ef", type=int, nargs="+", default=[40, 64, 100, 150, 200, 300, 400, 600, 800, 1000])
    ap.add_argument("--overfetch", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--shared-buffers", nargs="+", default=["128MB"],
                    help="server settings to sweep under (128MB is PostgreSQL's default)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--index-m", type=int, default=16, help="HNSW m of the server index (pgvector: 2..100)")
    ap.add_argument("--index-ef-construction", type=int, default=64,
                    help="HNSW ef_construction of the server index (pgvector: 2*m..1000)")
    ap.add_argument("--json", type=Path, default=None, help="raw sweep results")
    a = ap.parse_args()
    if a.sweep:
        for n in a.sizes:
            t = time.perf_counter()
            r = sweep(n, a.queries, a.ef, a.overfetch, a.exact_queries, a.cache, a.maintenance_work_mem,
                      a.shared_buffers, m=a.index_m, efc=a.index_ef_construction)
            wall = time.perf_counter() - t
            cmd = (f"python bench/bench_pgvector.py --sweep --sizes {n} --queries {a.queries} "
                   f"--exact-queries {a.exact_queries} --shared-buffers {' '.join(a.shared_buffers)} "
                   f"--ef {' '.join(map(str, a.ef))} --overfetch {' '.join(map(str, a.overfetch))} "
                   f"--index-m {a.index_m} --index-ef-construction {a.index_ef_construction} "
                   f"--maintenance-work-mem {a.maintenance_work_mem}")
            text = sweep_report(r, cmd, wall)
            print(text, flush=True)
            if a.json:
                import json

                a.json.write_text(json.dumps(r))
            if a.out:
                a.out.write_text(text, encoding="utf-8")
        return
    results = []
    for n in a.sizes:
        t = time.perf_counter()
        results.append(run(n, a.batch, a.queries, a.exact_queries, a.incremental, a.ann_max, a.maintenance_work_mem,
                           a.index_m, a.index_ef_construction))
        print(f"N={n}: done in {time.perf_counter() - t:.0f} s", flush=True)
    cmd = "python bench/bench_pgvector.py --sizes " + " ".join(map(str, a.sizes))
    text = report(results, cmd)
    print(text)
    if a.out:
        a.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
