"""Benchmark data, built once and cached under ``bench/data/`` (git-ignored).

* ``minilm_base``: real all-MiniLM-L6-v2 embeddings (the project's int8 ONNX
  ``MiniLMEmbedder``) of ``BASE`` real problem texts (reasoning-gym
  ``gsm_symbolic`` questions, seed 0).
* ``perturbed(n)``: ``n`` unit vectors made by seeded perturbation around the base
  embeddings: row i = normalise(base[c_i] + σ_i·g_i/√d), c_i uniform over the base,
  σ_i ~ U(0.15, 0.6), g_i standard normal — so each real problem gets a cloud of
  paraphrase-like neighbours (cosine to its centre ≈ 0.85–0.99), the cluster
  structure of real traffic. Queries are fresh perturbations (a different seed),
  i.e. new arrivals of known problem types.
* ``uniform(n)``: Gaussian-normalised unit vectors — the exact path's worst case
  (no structure), never used to judge the ANN path.

Arrays are saved as ``.npy`` and memory-mapped read-only on load.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
DIM = 384
BASE = 3000
SEED = 20261127


def _cached(name: str, build) -> np.ndarray:  # type: ignore[no-untyped-def]
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{name}.npy"
    if not path.exists():
        arr = build()
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def problem_texts(count: int = BASE) -> list[str]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=0)
    return [ds[i]["question"] for i in range(count)]


def minilm_base() -> np.ndarray:
    def build() -> np.ndarray:
        from intercascade_core.models.minilm import MiniLMEmbedder

        emb = MiniLMEmbedder().embed(problem_texts())
        return np.ascontiguousarray(emb, dtype=np.float32)

    return _cached(f"minilm_base_{BASE}", build)


def _perturb(base: np.ndarray, n: int, seed: int, chunk: int = 1 << 17) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        centre = rng.integers(0, base.shape[0], b - a)
        sigma = rng.uniform(0.15, 0.6, (b - a, 1)).astype(np.float32)
        x = base[centre] + sigma * rng.standard_normal(
            (b - a, base.shape[1]), dtype=np.float32
        ) / np.float32(np.sqrt(base.shape[1]))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    return out


def perturbed(n: int) -> np.ndarray:
    """``n`` perturbed-MiniLM rows (the repository)."""
    base = np.asarray(minilm_base())
    return _cached(f"perturbed_{n}", lambda: _perturb(base, n, SEED))


def perturbed_queries(m: int) -> np.ndarray:
    """``m`` fresh perturbed-MiniLM queries (a seed disjoint from the repository's)."""
    base = np.asarray(minilm_base())
    return _cached(f"perturbed_queries_{m}", lambda: _perturb(base, m, SEED + 1))


def _mix(base: np.ndarray, n: int, seed: int, chunk: int = 1 << 17) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        c = rng.integers(0, base.shape[0], b - a)
        c2 = rng.integers(0, base.shape[0], b - a)
        beta = rng.uniform(0.0, 0.3, (b - a, 1)).astype(np.float32)
        sigma = rng.uniform(0.05, 0.25, (b - a, 1)).astype(np.float32)
        noise = rng.standard_normal((b - a, base.shape[1]), dtype=np.float32) / np.float32(
            np.sqrt(base.shape[1])
        )
        x = base[c] + beta * (base[c2] - base[c]) + sigma * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    return out


def mixed(n: int) -> np.ndarray:
    """``n`` rows of the second perturbation model: row = normalise(base[c] +
    β(base[c2] − base[c]) + σ·g/√d), β ~ U(0, 0.3), σ ~ U(0.05, 0.25) — a real problem
    drifted toward another real problem plus a little isotropic noise (paraphrase and
    topic drift along real embedding directions). ``perturbed`` puts every row of a
    cluster at nearly the same distance from every other (an isotropic ball: top-10
    scores within ~0.004), the hardest case for a graph index; this set is closer to
    how real paraphrases spread."""
    base = np.asarray(minilm_base())
    return _cached(f"mixed_{n}", lambda: _mix(base, n, SEED + 10))


def mixed_queries(m: int) -> np.ndarray:
    base = np.asarray(minilm_base())
    return _cached(f"mixed_queries_{m}", lambda: _mix(base, m, SEED + 11))


def uniform(n: int, seed: int = SEED + 2) -> np.ndarray:
    def build() -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, DIM), np.float32)
        for a in range(0, n, 1 << 17):
            b = min(n, a + (1 << 17))
            x = rng.standard_normal((b - a, DIM), dtype=np.float32)
            out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return _cached(f"uniform_{n}_{seed}", build)


if __name__ == "__main__":  # build the cache: python -m bench.data
    import time

    t = time.perf_counter()
    print("base", minilm_base().shape, f"{time.perf_counter() - t:.1f}s")
    for f, n in ((perturbed, 1_000_000), (perturbed_queries, 2048), (uniform, 1_000_000)):
        t = time.perf_counter()
        print(f.__name__, f(n).shape, f"{time.perf_counter() - t:.1f}s")
