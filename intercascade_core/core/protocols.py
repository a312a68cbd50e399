"""The interfaces the pure core is written against, and nothing else.

The cascade never imports an adapter: it calls objects that satisfy these protocols,
and the caller injects them (an HTTP client, ONNX MiniLM, a simulator, a test stub).

* :class:`TextModel` answers chat messages with a :class:`Generation` (text, per-token
  logprobs, confidence, token counts, cost); :class:`~intercascade_core.models.chat.ChatModel`
  is the OpenAI-compatible one.
* :class:`Embedder` maps texts to unit-norm float32 rows;
  :class:`~intercascade_core.models.minilm.MiniLMEmbedder` is the real one.
* :class:`SearchBackend` answers top-k cosine queries over strategies it holds itself
  (a PostgreSQL/pgvector table, a user's vector database); pass one as ``backend=`` to
  :func:`~intercascade_core.core.retrieve.retrieve` or in ``CascadeConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError

__all__ = ["Embedder", "Generation", "SearchBackend", "TextModel", "TopK", "validate_texts"]


@dataclass(frozen=True, slots=True)
class Generation:
    """One completion. ``latency_s`` and ``attempts`` are excluded from equality: they
    depend on the wall clock and the network, not on what the model said."""

    text: str
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    confidence: float
    prompt_tokens: int
    completion_tokens: int
    model: str
    cost: float | None  # USD; None when the model has no known price
    finish_reason: str | None = None
    latency_s: float = field(default=0.0, compare=False)
    attempts: int = field(default=1, compare=False)

    def __post_init__(self) -> None:
        # any TextModel may build one: refuse what would crash grading or corrupt usage
        if not isinstance(self.text, str):
            raise InvalidArgumentError("text", f"must be a str, got {type(self.text).__name__}")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)):
            raise InvalidArgumentError(
                "confidence", f"must be a number (NaN defers), got {self.confidence!r:.40}"
            )
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(name, f"must be an int >= 0, got {value!r:.40}")
        if self.cost is not None and (
            isinstance(self.cost, bool)
            or not isinstance(self.cost, (int, float))
            or not self.cost >= 0.0
        ):
            raise InvalidArgumentError("cost", f"must be None or a number >= 0, got {self.cost!r:.40}")




class TextModel(Protocol):
    """What the cascade needs from a model (``ChatModel`` and test stubs)."""

    @property
    def model(self) -> str: ...
    def generate(self, messages: Sequence[Mapping[str, str]], **params: Any) -> Generation: ...




@runtime_checkable
class Embedder(Protocol):
    """Maps texts to unit-norm vectors.

    Contract of :meth:`embed`:

    * ``texts`` is a sequence of ``str`` (a bare ``str`` is rejected: it is a sequence of
      characters, almost always a bug). Non-``str`` items (``None``, ``bytes``, numbers)
      raise :class:`~intercascade_core.errors.InvalidArgumentError`.
    * Returns a ``float32`` array of shape ``(len(texts), dim)``, C-contiguous, each row of
      L2 norm 1 (up to float32 rounding). An empty sequence gives shape ``(0, dim)``.
    * Deterministic: the same text always gives the same row.
    """

    @property
    def dim(self) -> int: ...

    @property
    def model_id(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...




@dataclass(frozen=True, slots=True, eq=False)
class TopK:
    """Result of a top-k search (:func:`~.retrieve.retrieve`, a :class:`SearchBackend`): row ``i`` holds query ``i``'s best rows, best first."""

    indices: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        self.indices.flags.writeable = False
        self.scores.flags.writeable = False


@runtime_checkable
class SearchBackend(Protocol):
    """Top-k cosine search over strategies the backend holds itself.

    ``search(queries, k, tenant=...)`` takes validated unit-norm float32 rows of shape
    ``(m, dim)`` and returns a :class:`~intercascade_core.core.retrieve.TopK` whose
    indices are the backend's own ids (``-1`` pads a row with fewer than ``k`` hits).
    :func:`~intercascade_core.core.retrieve.retrieve` does the validating (and checks
    that one row comes back per query); named indexes over a repository's own rows
    (``"hnsw"``) are another door, :func:`~intercascade_core.core.retrieve.register_index`.
    """

    @property
    def dim(self) -> int: ...
    def search(
        self, query_vectors: npt.NDArray[np.float32], k: int, *, tenant: str | None = None
    ) -> TopK: ...


def validate_texts(texts: object, argument: str = "texts") -> list[str]:
    """Check that ``texts`` is a sequence of ``str`` and return it as a list.

    Raises :class:`InvalidArgumentError` naming the first bad item. ``bytes`` items are
    rejected (decode them yourself; we never guess an encoding). Strings that cannot be
    encoded as UTF-8 (lone surrogates, e.g. from ``bytes.decode(errors="surrogateescape")``)
    are rejected too.
    """
    if isinstance(texts, (str, bytes, bytearray)):
        raise InvalidArgumentError(
            argument,
            f"expected a sequence of str, got a single {type(texts).__name__}; wrap it in a list",
        )
    if not isinstance(texts, Sequence):
        raise InvalidArgumentError(
            argument, f"expected a sequence of str, got {type(texts).__name__}"
        )
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            hint = " (decode bytes to str first)" if isinstance(t, (bytes, bytearray)) else ""
            raise InvalidArgumentError(
                f"{argument}[{i}]", f"expected str, got {type(t).__name__}: {t!r:.80}{hint}"
            )
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgumentError(
                f"{argument}[{i}]",
                f"not valid Unicode text (cannot encode as UTF-8: {e.reason} "
                f"at position {e.start})",
            ) from None
    return out


