"""intercascade_core — Inter-Cascade: an interactive LLM cascade in which the strong
model is both a helper (it answers deferred queries) and a teacher (it writes reusable
strategies that help the weak model on similar future queries).

The package is one house with wings:

* :mod:`.core` — pure: calibration, the repository, retrieval, the cascade machine;
* :mod:`.models` — adapters that answer or embed (HTTP chat client, MiniLM, simulator);
* :mod:`.storage` — durable stores, PostgreSQL/pgvector, the hnswlib index, export;
* :mod:`.lab` — datasets, configs, evaluation and reports;
* :mod:`.service` (the thread-safe shell), :mod:`.cli` and :mod:`.errors`.

This module is the public face: the names below. Adapters are imported on first use
(PEP 562), so ``import intercascade_core`` does not load onnxruntime or httpx.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The pure core is imported eagerly (it needs only numpy and scipy.special).
from .core.calibrate import Calibration, calibrate, calibrate_cascade, certify, defer
from .core.cascade import (
    CascadeConfig,
    CascadeState,
    Level,
    Outcome,
    calibrate_levels,
    run_stream,
    step,
)
from .core.protocols import Embedder, TextModel
from .core.repository import Entry, Repository, empty_repository, update
from .core.retrieve import TopK, retrieve
from .core.sanitize import sanitize_strategy
from .core.tasks import Query
from .errors import IntercascadeError, InvalidArgumentError, LogprobsUnavailable, ModelError
from .storage import hnsw as _hnsw  # noqa: F401  registers backend="hnsw" (hnswlib loads lazily)

# adapters and the service: public name -> module, imported on first access
_LAZY: dict[str, str] = {
    "ChatModel": "models.chat",
    "MiniLMEmbedder": "models.minilm",
    "DurableStore": "storage.journal",
    "Cascade": "service",
}

__all__ = [
    "Calibration",
    "Cascade",
    "CascadeConfig",
    "CascadeState",
    "ChatModel",
    "DurableStore",
    "Embedder",
    "Entry",
    "IntercascadeError",
    "InvalidArgumentError",
    "Level",
    "LogprobsUnavailable",
    "MiniLMEmbedder",
    "ModelError",
    "Outcome",
    "Query",
    "Repository",
    "TextModel",
    "TopK",
    "calibrate",
    "calibrate_cascade",
    "calibrate_levels",
    "certify",
    "defer",
    "empty_repository",
    "retrieve",
    "run_stream",
    "sanitize_strategy",
    "step",
    "update",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'intercascade_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
