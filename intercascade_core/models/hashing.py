"""A deterministic **test double** of the :class:`~intercascade_core.core.protocols.Embedder`
protocol: feature hashing, no model.

It is fast, deterministic across processes and platforms, dependency-free, and
semantically meaningless beyond word overlap. It is never used as a default anywhere in
the library; pass it explicitly in tests that need many vectors quickly. The real
embedder is :class:`~intercascade_core.models.minilm.MiniLMEmbedder`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise

import numpy as np

from ..core.protocols import validate_texts
from ..errors import InvalidArgumentError

__all__ = ["HashingEmbedder"]


_WORD = re.compile(r"\w+", re.UNICODE)
_EMPTY = "\x00<empty>"  # the single feature of a text without word characters


@lru_cache(maxsize=65536)
def _feature(token: str, seed: int, dim: int) -> tuple[int, float]:
    # blake2b is keyed, stable across processes (unlike the salted built-in hash()).
    h = hashlib.blake2b(token.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little"))
    v = int.from_bytes(h.digest(), "little")
    return (v >> 1) % dim, (1.0 if v & 1 else -1.0)


class HashingEmbedder:
    """Deterministic **test double** for :class:`Embedder` (never a default).

    Feature hashing of lower-cased word unigrams and bigrams into ``dim`` signed buckets
    (keyed BLAKE2b, so results are identical across processes, platforms and Python
    versions), then L2 normalisation. Texts sharing words get positive cosine; it has no
    notion of meaning beyond that.

    A text with no word characters (e.g. ``""`` or ``"?!"``) hashes a single sentinel
    feature, so every such text maps to the same fixed unit vector (never NaN/zero).
    """

    __slots__ = ("_dim", "_seed")

    def __init__(self, dim: int = 384, seed: int = 0) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InvalidArgumentError("dim", f"expected a positive int, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise InvalidArgumentError("seed", f"expected an int in [0, 2**64), got {seed!r}")
        self._dim = dim
        self._seed = seed

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model_id(self) -> str:
        return f"hashing-test-double/dim={self._dim}/seed={self._seed}"

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self._dim}, seed={self._seed})"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = validate_texts(texts)
        rows: list[int] = []
        cols: list[int] = []
        signs: list[float] = []
        for row, text in enumerate(items):
            words = _WORD.findall(text.lower())
            feats = words + [f"{a} {b}" for a, b in pairwise(words)] or [_EMPTY]
            for f in feats:
                j, sgn = _feature(f, self._seed, self._dim)
                rows.append(row)
                cols.append(j)
                signs.append(sgn)
        out = np.zeros((len(items), self._dim), dtype=np.float64)
        np.add.at(out, (np.asarray(rows, dtype=np.intp), np.asarray(cols, dtype=np.intp)), signs)
        norms = np.linalg.norm(out, axis=1)
        dead = norms == 0.0  # every feature cancelled out: fall back to the sentinel
        if dead.any():
            j, sgn = _feature(_EMPTY, self._seed, self._dim)
            out[dead] = 0.0
            out[dead, j] = sgn
            norms[dead] = 1.0
        out /= norms[:, None]
        return np.ascontiguousarray(out, dtype=np.float32)
