"""The embedded default of ``intercascade serve --demo``: the simulated cascade.

Two simulated levels (``sim-weak``, ``sim-strong``; :mod:`~intercascade_core.models.sim`)
answer in-process through ``httpx.MockTransport``: no network, no key, deterministic.
The cascade runs the library's default configuration (:func:`demo_config`: retrieval,
k = 2, the strong level answering and writing its strategy in one call, so its confidence
is read on the answer line). Its thresholds are calibrated at start-up on a seeded split
of built-in math templates, with the prompts it deploys (:func:`demo_calibration`; a few
seconds), because a simulated pair has no saved calibration to load. Clients can draw problems of the same templates with
:func:`demo_problems`; a seed other than the calibration's gives unseen problems.

The pieces are public so that a test can run :func:`~intercascade_core.core.cascade.run_stream`
over exactly the levels and thresholds the server uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import httpx

from ..core.calibrate import Calibration
from ..core.cascade import CascadeConfig, Level, calibrate_levels
from ..core.retrieve import extension_available
from ..core.tasks import Query
from ..models.async_chat import AsyncChatModel
from ..models.chat import ChatModel
from ..models.sim import SimBackend, templated_math_stream
from .engine import AsyncLevel

__all__ = [
    "DEMO_MODELS",
    "DEMO_PARAMS",
    "demo_async_levels",
    "demo_calibration",
    "demo_config",
    "demo_levels",
    "demo_problems",
]

#: the simulated models, weakest first
DEMO_MODELS = ("sim-weak", "sim-strong")
#: request parameters of every demo call
DEMO_PARAMS = {"temperature": 0, "max_tokens": 512}
#: where each level reads its confidence: the strong level's reply also holds a strategy
DEMO_SPANS: tuple[Literal["all", "answer"], ...] = ("all", "answer")
_BASE_URL = "http://sim.invalid/v1"
_TEMPLATES = 10
_CALIBRATION_SEED = 1_000_003  # far from the seeds clients draw problems with


def demo_problems(n: int, *, seed: int = 0) -> tuple[Query, ...]:
    """``n`` seeded problems of the demo's templates (with gold answers)."""
    return templated_math_stream(n, n_templates=_TEMPLATES, seed=seed)


def demo_config() -> CascadeConfig:
    """The cascade's configuration: the library default, searched by the C extension
    when it is built."""
    return CascadeConfig(backend="exact" if extension_available() else "numpy")


def demo_levels(backend: SimBackend) -> tuple[Level, ...]:
    """The synchronous levels (calibration, and the service's own :meth:`ask`)."""
    client = httpx.Client(transport=backend.transport())
    return tuple(
        Level(ChatModel(_BASE_URL, m, client=client, confidence_span=span), name=m,
              params=DEMO_PARAMS)
        for m, span in zip(DEMO_MODELS, DEMO_SPANS, strict=True)
    )


def demo_async_levels(backend: SimBackend) -> tuple[AsyncLevel, ...]:
    """The async twins the gateway calls (the same simulator, the same answers)."""
    client = httpx.AsyncClient(transport=httpx.MockTransport(backend.handler()))
    return tuple(
        AsyncLevel(AsyncChatModel(_BASE_URL, m, client=client, confidence_span=span), name=m,
                   params=DEMO_PARAMS)
        for m, span in zip(DEMO_MODELS, DEMO_SPANS, strict=True)
    )


def demo_calibration(
    levels: Sequence[Level], *, config: CascadeConfig | None = None, alpha: float = 0.2,
    delta: float = 0.1, n: int = 400,
) -> tuple[Calibration, ...]:
    """The thresholds of the demo: every level calibrated on ``n`` seeded problems with
    the prompt it deploys with under ``config`` (default :func:`demo_config`)."""
    queries = templated_math_stream(n, n_templates=_TEMPLATES, seed=_CALIBRATION_SEED)
    cfg = demo_config() if config is None else config
    return calibrate_levels(queries, levels, alpha=alpha, delta=delta, config=cfg).calibrations
