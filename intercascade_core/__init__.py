"""intercascade_core — Inter-Cascade: an interactive LLM cascade in which the strong
model is both a helper (it answers deferred queries) and a teacher (it writes reusable
strategies that help the weak model on similar future queries).

The core is pure: immutable records and functions that return new values
(:func:`calibrate`, :func:`defer`, :func:`retrieve`, :func:`update`). Adapters
(HTTP models, the ONNX embedder, hnswlib, files) are imported lazily, so
``import intercascade_core`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The pure core is imported eagerly: a submodule whose name equals a function's
# (``calibrate``, ``retrieve``) must be bound before anything imports it, or the
# package attribute would name the module instead of the function.
from .calibrate import (
    Calibration,
    alpha_gain_normal_approx,
    alpha_gain_same_coverage_approx,
    calibrate,
    calibrate_cascade,
    certify,
    defer,
    normal_approx_upper_bound,
    risk_upper_bound,
)
from .embed import Embedder, HashingEmbedder
from .errors import IntercascadeError, InvalidArgumentError
from .repository import Entry, Repository, empty_repository, update
from .retrieve import TopK, retrieve

# Adapters and heavier modules: public name -> submodule, imported on first access (PEP 562)
_EXPORTS: dict[str, str] = {
    # embeddings (onnxruntime, tokenizers)
    "MiniLMEmbedder": "minilm",
    # model access
    "ChatModel": "llm",
    "Generation": "llm",
    "LogprobsUnavailable": "llm",
    "ModelError": "llm",
    # tasks
    "Query": "tasks",
    "grade": "tasks",
    # the cascade
    "CascadeState": "cascade",
    "Outcome": "cascade",
    "Level": "cascade",
    "CascadeConfig": "cascade",
    "StreamResult": "cascade",
    "init_state": "cascade",
    "calibrate_levels": "cascade",
    "step": "cascade",
    "run_stream": "cascade",
    # keeping the guarantee when strategies shift confidences
    "InSituCalibration": "insitu",
    "insitu_calibrate": "insitu",
    "risk_summary": "insitu",
    "AuditConfig": "audit",
    "AuditState": "audit",
    "RiskAlarm": "audit",
    "init_audit": "audit",
    "observe": "audit",
    "audited_stream": "audit",
    "HygienicTeacher": "hygiene",
    "drop_strategies": "hygiene",
    "drop_refuted": "hygiene",
    # durable, multi-tenant repository
    "Cascade": "service",
    "save": "store",
    "open_repository": "store",
    "StoreError": "store",
    "CorruptStoreError": "store",
    "IncompatibleStoreError": "store",
    "DurableStore": "journal",
    "export_finetune": "export",
    "sanitize_strategy": "sanitize",
    "evict": "prune",
    "dedupe": "prune",
    # shared repository on PostgreSQL + pgvector (psycopg)
    "PgVectorStore": "pgvector_store",
    "PgSync": "pgsync",
    "ServerUnavailableError": "pgvector_store",
    "PgVectorMissingError": "pgvector_store",
    # metrics
    "Metrics": "metrics",
    "compute_metrics": "metrics",
}

__all__ = sorted(
    [
        "Calibration", "Embedder", "Entry", "HashingEmbedder", "IntercascadeError",
        "InvalidArgumentError", "Repository", "TopK", "alpha_gain_normal_approx",
        "alpha_gain_same_coverage_approx", "calibrate", "calibrate_cascade", "certify", "defer",
        "empty_repository", "normal_approx_upper_bound", "retrieve", "risk_upper_bound", "update",
        *_EXPORTS,
    ]
)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'intercascade_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
