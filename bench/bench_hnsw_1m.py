"""ANN at 1M perturbed-MiniLM rows: build curves, then one recall/latency run.

    python -m bench.bench_hnsw_1m build-hnsw 16 100     # M, ef_construction (2 threads)
    python -m bench.bench_hnsw_1m build-faiss 40         # faiss IndexHNSWFlat(384, 32), efConstruction
    python -m bench.bench_hnsw_1m curve                  # every saved index, one process

Builds go through the project's own index class (``storage.hnsw._AnnIndex``, the
same ``init_index``/``add_items``/``resize_index`` calls a repository makes), fed in
250k-row chunks so the time-vs-rows curve costs nothing extra; each index is saved
under ``bench/data/hnsw1m/`` with a JSON record (wall time per chunk, ``uptime``
load before/after, file size, RSS growth). ``curve`` loads every saved index through
:func:`~intercascade_core.storage.hnsw.load_index` (header and sampled rows checked)
and measures, interleaved point by point on the same queries (each point after 64
warm-up queries of its own; plain and re-score alternate which goes first): plain hnswlib
(``rescore=0``), hnswlib + exact float32 re-score (the C gather), faiss HNSW32
(single-threaded search), and the exact C float32 scan as the baseline.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import data
from intercascade_core import Entry, empty_repository, retrieve, update
from intercascade_core.storage import hnsw as _ann

N = int(os.environ.get("BENCH_N", "1000000"))
K = 5
DIR = data.DATA / "hnsw1m"
CHUNK = 250_000
SEED = 100


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    """CPU seconds of this process (user + system, all threads): on a shared box the
    build's wall time depends on the others' load, its CPU time much less."""
    t = os.times()
    return t.user + t.system


def _repo(n: int) -> Any:
    v = np.asarray(data.perturbed(n))
    return update(empty_repository(v.shape[1]), [Entry("q", "a", "s")] * n, v)


def _tag(m: int, efc: int) -> str:
    return f"hnsw_perturbed_{N}_M{m}_efc{efc}"


def _build_in_chunks(rec: dict[str, Any], rss0: float, add: Callable[[int, int], None]) -> None:
    """Add rows ``[a, b)`` chunk by chunk, recording the build curve (wall, CPU, load) in ``rec``."""
    t0, c0 = time.perf_counter(), _cpu_s()
    chunks = []
    for a in range(0, N, CHUNK):
        b = min(N, a + CHUNK)
        add(a, b)
        chunks.append({"rows": b, "elapsed_s": round(time.perf_counter() - t0, 1),
                       "cpu_s": round(_cpu_s() - c0, 1), "load": os.getloadavg()[0]})
        print(chunks[-1], flush=True)
    rec["build_s"] = round(time.perf_counter() - t0, 1)
    rec["build_cpu_s"] = round(_cpu_s() - c0, 1)
    rec["chunks"] = chunks
    rec["load_after"] = os.getloadavg()
    rec["rss_delta_mib"] = round(_rss_mib() - rss0, 1)


def build_hnsw(m: int, efc: int) -> dict[str, Any]:
    DIR.mkdir(parents=True, exist_ok=True)
    v = _repo(N).vectors  # the repository's rows (renormalised): what load_index checks
    params = _ann.HnswParams(M=m, ef_construction=efc, seed=SEED, threads=2)
    rec: dict[str, Any] = {
        "M": m,
        "ef_construction": efc,
        "threads": 2,
        "n": N,
        "load_before": os.getloadavg(),
        "start": time.strftime("%H:%M:%S"),
    }
    rss0 = _rss_mib()
    idx = _ann._AnnIndex(v.shape[1], params)
    _build_in_chunks(rec, rss0, lambda a, b: idx.grow_to(v, b))
    path = DIR / f"{_tag(m, efc)}.bin"
    idx.index.save_index(str(path))
    rec["index_file_mib"] = round(path.stat().st_size / 2**20, 1)
    path.with_suffix(".json").write_text(json.dumps(rec, indent=1))
    return rec


def build_faiss(m: int = 32, efc: int = 40) -> dict[str, Any]:
    import faiss

    DIR.mkdir(parents=True, exist_ok=True)
    v = np.ascontiguousarray(_repo(N).vectors)
    faiss.omp_set_num_threads(2)
    rec: dict[str, Any] = {
        "M": m,
        "efConstruction": efc,
        "threads": 2,
        "n": N,
        "load_before": os.getloadavg(),
        "start": time.strftime("%H:%M:%S"),
    }
    rss0 = _rss_mib()
    fx = faiss.IndexHNSWFlat(v.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    fx.hnsw.efConstruction = efc
    _build_in_chunks(rec, rss0, lambda a, b: fx.add(v[a:b]))
    path = DIR / f"faiss_hnsw{m}_perturbed_{N}_efc{efc}.index"
    faiss.write_index(fx, str(path))
    rec["index_file_mib"] = round(path.stat().st_size / 2**20, 1)
    path.with_suffix(".json").write_text(json.dumps(rec, indent=1))
    return rec


def _pct(times: list[float]) -> tuple[float, float, float]:
    p50, p90, p99 = np.percentile(times, [50, 90, 99]) * 1e3
    return float(p50), float(p90), float(p99)


def curve(
    m: int = 1000,
    efs: tuple[int, ...] = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
    c: int = 4,
    adds: int = 200,
) -> dict[str, Any]:
    """One process, same queries, interleaved: at each ef every index is measured
    before the next ef starts. Returns every point plus the baselines."""
    import faiss

    out: dict[str, Any] = {
        "n": N,
        "k": K,
        "m": m,
        "c": c,
        "nproc": os.cpu_count(),
        "load_start": os.getloadavg(),
        "start": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    repo = _repo(N)
    q = np.ascontiguousarray(data.perturbed_queries(2048)[:m])
    t0 = time.perf_counter()
    truth = retrieve(repo, q, K, scan="f32").indices
    out["truth_batch_s"] = round(time.perf_counter() - t0, 2)
    truth_sets = [set(r.tolist()) for r in truth]

    # the exact C scans, one query at a time (the ratio baseline)
    exact: dict[str, Any] = {}
    for name, kw in (
        ("exact f32 (C, 2t)", {"scan": "f32", "threads": 2}),
        ("exact f32 (C, 1t)", {"scan": "f32", "threads": 1}),
        ("exact int8+f32 re-score (C, 2t)", {"scan": "int8", "threads": 2}),
    ):
        times, same = [], 0
        for i in range(40):
            t = time.perf_counter()
            got = retrieve(repo, q[i : i + 1], K, **kw).indices  # type: ignore[arg-type]
            times.append(time.perf_counter() - t)
            same += int((got[0] == truth[i]).all())
        exact[name] = {"p50": _pct(times)[0], "p99": _pct(times)[2], "topk_equal": same / 40}
        print(name, exact[name], flush=True)
    out["exact"] = exact

    # every saved hnswlib index: load (checked), keep the object, swap it in per point
    hnsw: dict[str, Any] = {}
    for meta in sorted(DIR.glob(f"hnsw_perturbed_{N}_M*_efc*.json")):
        rec = json.loads(meta.read_text())
        params = _ann.HnswParams(
            M=rec["M"], ef_construction=rec["ef_construction"], seed=SEED, rescore=c
        )
        t = time.perf_counter()
        _ann.load_index(repo, meta.with_suffix(".bin"), params)
        idx = repo.derived("hnsw", lambda prev, r: prev)
        hnsw[f"M={rec['M']} efc={rec['ef_construction']}"] = (idx, rec)
        print("loaded", meta.name, f"{time.perf_counter() - t:.1f}s", flush=True)
    fxs: dict[str, Any] = {}
    out["faiss_builds"] = {}
    for fpath in sorted(
        DIR.glob(f"faiss_hnsw32_perturbed_{N}_efc*.index"), key=lambda p: len(p.name)
    ):
        rec = json.loads(fpath.with_suffix(".json").read_text())
        name = f"faiss HNSW32 efc={rec['efConstruction']}"
        fxs[name] = faiss.read_index(str(fpath))
        out["faiss_builds"][name] = rec
    faiss.omp_set_num_threads(1)
    out["builds"] = {name: rec for name, (_, rec) in hnsw.items()}

    def swap(idx: Any) -> None:
        repo.derived("hnsw", lambda prev, r: idx)

    warm = np.ascontiguousarray(data.perturbed_queries(2048)[1024 + 512 : 1024 + 512 + 64])

    def point(call: Any) -> dict[str, float]:
        for i in range(len(warm)):  # other queries first: the index's upper layers in cache
            call(warm[i : i + 1])
        times, hits = [], 0
        for i in range(m):
            t = time.perf_counter()
            got = call(q[i : i + 1])
            times.append(time.perf_counter() - t)
            hits += len(set(np.asarray(got).ravel().tolist()) & truth_sets[i])
        p50, p90, p99 = _pct(times)
        return {"recall": hits / (m * K), "p50": p50, "p90": p90, "p99": p99}

    points: list[dict[str, Any]] = []
    for j, ef in enumerate(efs):
        for name, (idx, _) in hnsw.items():
            swap(idx)
            for cc in (0, c) if j % 2 == 0 else (c, 0):  # neither always goes first
                r = point(lambda x, ef=ef, cc=cc: _ann.search(repo, x, K, ef=ef, rescore=cc)[0])
                label = f"hnswlib {name}" + (f" + re-score (c={cc})" if cc else "")
                points.append({"index": label, "ef": ef, **r})
                print(points[-1], flush=True)
        for name, fx in fxs.items():
            fx.hnsw.efSearch = ef
            r = point(lambda x, fx=fx: fx.search(x, K)[1])
            points.append({"index": name, "ef": ef, **r})
            print(points[-1], flush=True)
    out["points"] = points

    # median latency of one add (update + growing the index by that row), per index
    extra = np.asarray(data.perturbed_queries(2048))[1024:]
    state = {"repo": repo}
    add_lat: dict[str, Any] = {}
    for name, (idx, _) in hnsw.items():
        swap(idx)
        _ann.ensure_index(state["repo"])  # catch up on rows other indexes' adds appended
        times = []
        for i in range(adds):
            t = time.perf_counter()
            state["repo"] = update(state["repo"], [Entry("q", "a", "s")], extra[i % 1024][None])
            _ann.ensure_index(state["repo"])
            times.append(time.perf_counter() - t)
        p50, p90, p99 = _pct(times)
        add_lat[name] = {"p50": p50, "p90": p90, "p99": p99}
        print("add", name, add_lat[name], flush=True)
    out["add"] = add_lat
    out["load_end"] = os.getloadavg()
    out["end"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out


def _best(points: list[dict[str, Any]], index: str, target: float) -> dict[str, Any] | None:
    """The lowest-p50 point of ``index`` whose recall reaches ``target``."""
    ok = [p for p in points if p["index"] == index and p["recall"] >= target]
    return min(ok, key=lambda p: p["p50"]) if ok else None


def report(path: Path, png: Path | None = None) -> str:
    """Markdown tables (and a recall/latency PNG) from a ``curve`` JSON file."""
    res = json.loads(path.read_text())
    pts: list[dict[str, Any]] = res["points"]
    names = list(dict.fromkeys(p["index"] for p in pts))
    ef_order = sorted({p["ef"] for p in pts})
    lines = [
        f"n={res['n']}, k={res['k']}, {res['m']} single queries per point, c={res['c']}; "
        f"nproc={res['nproc']}; {res['start']} → {res['end']} UTC; "
        f"load (1/5/15 min) at start {tuple(round(x, 2) for x in res['load_start'])}, "
        f"at end {tuple(round(x, 2) for x in res['load_end'])}",
        "",
        "**Builds** (2 threads; `cpu s` = user+system CPU seconds of the build, which the",
        "other jobs' load inflates far less than wall time):",
        "",
        "| index | rows | wall s | cpu s | load 1-min | file MiB | RSS growth MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    builds = dict(res["builds"])
    if "faiss_build" in res:  # the first run's single peer
        builds["faiss HNSW32 efc=40"] = res["faiss_build"]
    builds.update(res.get("faiss_builds", {}))
    for name, rec in builds.items():
        for ch in rec["chunks"]:
            last = ch["rows"] == rec["n"]
            lines.append(
                f"| {name} | {ch['rows']:,} | {ch['elapsed_s']} | {ch.get('cpu_s', '—')} | "
                f"{ch['load']:.1f} | {rec['index_file_mib'] if last else ''} | "
                f"{rec['rss_delta_mib'] if last else ''} |"
            )
    lines += ["", "**Exact scan, one query** (40 queries; the ratio baseline):", ""]
    lines += ["| scan | p50 ms | p99 ms | top-k equal to f32 |", "|---|---|---|---|"]
    for name, e in res["exact"].items():
        lines.append(f"| {name} | {e['p50']:.2f} | {e['p99']:.2f} | {e['topk_equal']:.2f} |")
    base = res["exact"]["exact f32 (C, 2t)"]["p50"]
    lines += ["", "**Curve** (recall@5 vs the exact f32 top-5; latency of one query):", ""]
    lines += ["| index | ef | recall@5 | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name in names:
        for ef in ef_order:
            p = next((p for p in pts if p["index"] == name and p["ef"] == ef), None)
            if p:
                lines.append(
                    f"| {name} | {ef} | {p['recall']:.4f} | {p['p50']:.3f} | {p['p90']:.3f} | "
                    f"{p['p99']:.3f} |"
                )
    lines += ["", "**Same-run ratios**: re-score p50 / plain p50 at equal ef:", ""]
    for name in names:
        if "+ re-score" not in name:
            continue
        plain = name.split(" + re-score")[0]
        row = []
        for ef in ef_order:
            a = next((p for p in pts if p["index"] == plain and p["ef"] == ef), None)
            b = next((p for p in pts if p["index"] == name and p["ef"] == ef), None)
            if a and b:
                row.append(f"ef={ef} {b['p50'] / a['p50']:.2f}×")
        lines.append(f"- {name}: " + ", ".join(row))
    lines += ["", "**Fastest point reaching each recall** (speed-up = exact f32 2t p50 / p50):", ""]
    lines += ["| index | recall ≥ | ef | recall@5 | p50 ms | p99 ms | speed-up vs exact |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for target in (0.95, 0.99):
        for name in names:
            b = _best(pts, name, target)
            if b is None:
                top = max((p for p in pts if p["index"] == name), key=lambda p: p["recall"])
                lines.append(
                    f"| {name} | {target} | — (best {top['recall']:.4f} at ef={top['ef']}, "
                    f"{top['p50']:.3f} ms) | | | | |"
                )
            else:
                lines.append(
                    f"| {name} | {target} | {b['ef']} | {b['recall']:.4f} | {b['p50']:.3f} | "
                    f"{b['p99']:.3f} | {base / b['p50']:.0f}× |"
                )
    lines += [
        "",
        "**One add** (update + growing the index by that row; 1M rows + earlier adds):",
        "",
    ]
    lines += ["| index | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|"]
    for name, a in res["add"].items():
        lines.append(f"| {name} | {a['p50']:.3f} | {a['p90']:.3f} | {a['p99']:.3f} |")
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for name in names:
            if max(p["recall"] for p in pts if p["index"] == name) < 0.9:
                continue  # off the chart's scale (named in the tables)
            xs = [p["p50"] for p in pts if p["index"] == name]
            ys = [p["recall"] for p in pts if p["index"] == name]
            style = "--" if "re-score" not in name and "faiss" not in name else "-"
            ax.plot(xs, ys, style, marker="o", ms=3, label=name)
        ax.axhline(0.99, color="grey", lw=0.5)
        ax.axhline(0.95, color="grey", lw=0.5)
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.axvline(0.3, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_ylim(0.9, 1.002)
        ax.set_xlabel("p50 latency of one query, ms (log)")
        ax.set_ylabel("recall@5 vs exact")
        ax.set_title(f"{res['n']:,} perturbed-MiniLM rows, one run ({res['start']} UTC)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
    return "\n".join(lines)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "build-hnsw":
        print(json.dumps(build_hnsw(int(sys.argv[2]), int(sys.argv[3]))))
    elif cmd == "build-faiss":
        print(json.dumps(build_faiss(efc=int(sys.argv[2]) if len(sys.argv) > 2 else 40)))
    elif cmd == "curve":
        res = curve()
        dest = DIR / f"curve_{time.strftime('%Y%m%d_%H%M')}.json"
        dest.write_text(json.dumps(res, indent=1))
        print("wrote", dest)
    elif cmd == "report":
        print(report(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None))
    else:
        raise SystemExit(__doc__)
