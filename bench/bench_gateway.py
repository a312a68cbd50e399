"""Gateway throughput and overhead: concurrent AsyncOpenAI clients against `intercascade serve`.

    python bench/bench_gateway.py [--clients 64] [--duration 60] [--entries 10000]
                                  [--embedder minilm|hashing] [--no-batching] [--json FILE]

What it does, in order:

1. writes a durable repository of ``--entries`` strategies (the demo's problem templates,
   embedded with the server's embedder) into a temporary store;
2. starts ``intercascade serve --demo`` on it (zero-latency simulated models in-process,
   thresholds calibrated at start-up) and waits for it;
3. runs ``--clients`` AsyncOpenAI clients in one process, each sending the next problem of a
   shared stream and waiting for its answer, for ``--duration`` seconds;
4. measures time to first byte with ``stream=True`` against the plain latency (sequential,
   unloaded);
5. stops the server with SIGTERM and checks that nothing was lost: every request got one
   answer with its own outcome index, the server exited 0, and the store holds the prepared
   strategies plus every one a response said it stored.

Reported: requests/s; per request the gateway overhead (its total minus the time in model
calls, from the ``timing_ms`` of each response) and the client-observed latency, p50/p99;
the share of gateway time spent in model calls, embedding (waiting for and running the
batch), retrieval (the machine: retrieval, grading, prompts) and commit (bookkeeping:
reserve, journal, publish), and the rest (HTTP, JSON, scheduling). The simulated models
run on the server's event loop, so their CPU time competes with everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import platform
import queue
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai

from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.gateway.demo import demo_problems
from intercascade_core.models.sim import template_signature
from intercascade_core.storage.journal import DurableStore

PROBLEM_SEED = 77  # the traffic
REPOSITORY_SEED = 12_345  # the prepared strategies: the same templates, other numbers
CACHE = Path(__file__).parent / "data"  # git-ignored


def make_embedder(kind: str) -> Any:
    if kind == "hashing":
        from intercascade_core.models.hashing import HashingEmbedder

        return HashingEmbedder(384)
    from intercascade_core.models.minilm import MiniLMEmbedder

    return MiniLMEmbedder()


def prepare_store(root: Path, n: int, embedder_kind: str) -> int:
    """A level-0 repository of ``n`` strategies written as the simulated teacher writes
    them (naming the problem's template), embedded with the server's embedder."""
    problems = demo_problems(n, seed=REPOSITORY_SEED)
    emb = make_embedder(embedder_kind)
    key = hashlib.sha256(f"{emb.model_id}|{n}|{REPOSITORY_SEED}".encode()).hexdigest()[:16]
    cache = CACHE / f"gateway-repo-{key}.npy"  # embedding 10k texts with MiniLM takes minutes
    if cache.exists():
        rows = np.load(cache)
    else:
        t0 = time.perf_counter()
        rows = np.concatenate([emb.embed([q.text for q in problems[i : i + 256]])
                               for i in range(0, n, 256)]) if n else np.zeros((0, emb.dim), np.float32)
        print(f"embedded {n} repository entries in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(cache, rows)
    entries = [
        Entry(query=q.text, answer=q.gold or "", source_level=1, source_model="sim-strong",
              created_at=float(i),
              strategy=(f'For problems like "{" ".join(q.text.split()[:6])} ..." (pattern '
                        f"{template_signature(q.text)}): name the quantities, relate them with "
                        "the operations the story describes, in order, and check the unit."))
        for i, q in enumerate(problems)
    ]
    ds = DurableStore.open(root / "level0", dim=emb.dim, model_id=str(emb.model_id))
    try:
        ds.checkpoint(update(empty_repository(emb.dim), entries, rows))
    finally:
        ds.close()
    return n


class Server:
    def __init__(self, store: Path, args: list[str], log: Path) -> None:
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "intercascade_core", "serve", "--demo", "--port", "0",
               "--store", str(store), *args]
        self.command = " ".join(cmd[1:])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        lines: queue.Queue[str] = queue.Queue()
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True).start()
        line = lines.get(timeout=600)
        self.url = line.split("listening on ")[1].split()[0]
        self.root = self.url.removesuffix("/v1")

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.root + "/metrics", timeout=60).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def cpu_s(self) -> float:
        """CPU seconds of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=300)
        self.log.close()
        return code


@dataclass
class Record:
    ok: bool
    latency_s: float
    timing: dict[str, float] = field(default_factory=dict)
    index: int = -1
    stored: bool = False
    error: str = ""


async def load(url: str, clients: int, duration: float) -> tuple[list[Record], float]:
    problems = itertools.cycle(demo_problems(50_000, seed=PROBLEM_SEED))
    records: list[Record] = []
    stop_at = time.perf_counter() + duration

    async def client_loop() -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=300)
        while time.perf_counter() < stop_at:
            q = next(problems)
            t0 = time.perf_counter()
            try:
                r = await client.chat.completions.create(
                    model="intercascade", messages=[{"role": "user", "content": q.text}])
            except openai.OpenAIError as e:
                records.append(Record(False, time.perf_counter() - t0, error=repr(e)[:200]))
                continue
            ext = r.model_extra["intercascade"]
            records.append(Record(True, time.perf_counter() - t0, ext["timing_ms"],
                                  ext["outcome_index"], ext["strategy_stored"]))
        await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return records, time.perf_counter() - t0


async def ttfb(url: str, n: int) -> tuple[dict[str, float], int]:
    """Time to first chunk with stream=True against plain latency, sequential; and the
    strategies these requests stored."""
    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=300)
    problems = demo_problems(2 * n, seed=PROBLEM_SEED + 1)
    firsts, streamed, plain = [], [], []
    timings: list[dict[str, float]] = []
    stored = 0
    for q in problems[:n]:
        t0 = time.perf_counter()
        stream = await client.chat.completions.create(
            model="intercascade", messages=[{"role": "user", "content": q.text}], stream=True)
        first = None
        async for chunk in stream:
            if first is None:
                first = time.perf_counter() - t0
                stored += chunk.model_extra["intercascade"]["strategy_stored"]
        firsts.append(first or 0.0)
        streamed.append(time.perf_counter() - t0)
    for q in problems[n:]:
        t0 = time.perf_counter()
        r = await client.chat.completions.create(
            model="intercascade", messages=[{"role": "user", "content": q.text}])
        stored += r.model_extra["intercascade"]["strategy_stored"]
        timings.append(r.model_extra["intercascade"]["timing_ms"])
        plain.append(time.perf_counter() - t0)
    await client.close()
    total = sum(t["total"] for t in timings)
    unloaded = {p: sum(t[p] for t in timings) / total
                for p in ("model", "embed", "retrieval", "commit")}
    unloaded["rest"] = 1.0 - sum(unloaded.values())
    return {"ttfb_p50_ms": 1e3 * statistics.median(firsts),
            "stream_total_p50_ms": 1e3 * statistics.median(streamed),
            "plain_p50_ms": 1e3 * statistics.median(plain),
            "unloaded_gateway_total_p50_ms": statistics.median(t["total"] for t in timings),
            "unloaded_overhead_p50_ms": statistics.median(t["total"] - t["model"] for t in timings),
            "unloaded_shares": unloaded}, stored


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_once(args: argparse.Namespace, batching: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        store = Path(tmp) / "store"
        prepare_store(store, args.entries, args.embedder)
        extra = ["--embedder", args.embedder, "--fsync", args.fsync]
        if not batching:
            extra.append("--no-batching")
        server = Server(store, extra, Path(tmp) / "serve.log")
        warm_stored = 0
        try:
            for q in demo_problems(20, seed=PROBLEM_SEED + 2):  # warm-up
                r = httpx.post(server.url + "/chat/completions", timeout=120, json={
                    "model": "intercascade", "messages": [{"role": "user", "content": q.text}]})
                warm_stored += r.json()["intercascade"]["strategy_stored"]
            before = server.metrics()
            load_before = os.getloadavg()
            server_cpu0, client_cpu0 = server.cpu_s(), _own_cpu_s()
            records, elapsed = asyncio.run(load(server.url, args.clients, args.duration))
            server_cpu, client_cpu = server.cpu_s() - server_cpu0, _own_cpu_s() - client_cpu0
            load_after = os.getloadavg()
            after = server.metrics()
            first_byte, ttfb_stored = asyncio.run(ttfb(server.url, args.ttfb_requests))
        finally:
            code = server.stop()
        ds = DurableStore.open(store / "level0", dim=384, model_id=_model_id(args.embedder))
        try:
            kept = len(ds.repository)
        finally:
            ds.close()
    ok = [r for r in records if r.ok]
    indexes = [r.index for r in ok]
    stored = sum(r.stored for r in ok)
    overhead = [r.timing["total"] - r.timing["model"] for r in ok]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    request_s = delta('intercascade_request_seconds_sum{endpoint="chat"}')
    phases = {p: delta(f'intercascade_phase_seconds_sum{{phase="{p}"}}')
              for p in ("model", "embed", "retrieval", "commit")}
    shares = {p: v / request_s for p, v in phases.items()} if request_s else {}
    shares["http_json_other"] = 1.0 - sum(shares.values()) if shares else float("nan")
    return {
        "batching": batching,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "first_errors": sorted({r.error for r in records if not r.ok})[:3],
        "seconds": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "overhead_p50_ms": pct(overhead, 50),
        "overhead_p99_ms": pct(overhead, 99),
        "gateway_total_p50_ms": pct([r.timing["total"] for r in ok], 50),
        "model_p50_ms": pct([r.timing["model"] for r in ok], 50),
        "client_latency_p50_ms": 1e3 * pct([r.latency_s for r in ok], 50),
        "client_latency_p99_ms": 1e3 * pct([r.latency_s for r in ok], 99),
        "shares_loaded": shares,
        "server_cpu_ms_per_request": 1e3 * server_cpu / max(1, len(ok)),
        "client_cpu_ms_per_request": 1e3 * client_cpu / max(1, len(ok)),
        "server_cpu_busy": server_cpu / elapsed,
        "mean_embed_batch": delta("intercascade_embed_texts_total")
        / max(1.0, delta("intercascade_embed_batches_total")),
        "embed_ms_per_text": 1e3 * delta("intercascade_embed_seconds_total")
        / max(1.0, delta("intercascade_embed_texts_total")),
        "phase_seconds": phases,
        "unique_outcomes": len(set(indexes)) == len(indexes),
        "stored_by_responses": stored,
        "store_entries_after": kept,
        "store_expected": args.entries + stored + warm_stored + ttfb_stored,
        "exit_code": code,
        "load_before": load_before,
        "load_after": load_after,
        "ttfb": first_byte,
        "command": server.command,
    }


def _model_id(kind: str) -> str:
    return str(make_embedder(kind).model_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--embedder", choices=("minilm", "hashing"), default="minilm")
    ap.add_argument("--fsync", choices=("always", "never"), default="always")
    ap.add_argument("--ttfb-requests", type=int, default=30)
    ap.add_argument("--only", choices=("batching", "no-batching"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = []
    for batching in (True, False):
        if args.only and args.only != ("batching" if batching else "no-batching"):
            continue
        result = run_once(args, batching)
        print(json.dumps(result, indent=1), flush=True)
        runs.append(result)
    doc = {"machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(),
                       "uvicorn_http": "httptools" if find_spec("httptools") else "h11",
                       "uvicorn_loop": "uvloop" if find_spec("uvloop") else "asyncio"},
           "args": vars(args) | {"json": str(args.json)}, "runs": runs}
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
