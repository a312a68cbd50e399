"""Deterministic simulated cascade levels behind ``httpx.MockTransport``: a user's
cascade test runs the real HTTP client (:class:`~intercascade_core.models.chat.ChatModel`)
against :class:`~intercascade_core.models.sim.SimBackend` in-process, with no network."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from ..core.cascade import Level
from ..core.tasks import Query
from ..errors import InvalidArgumentError
from ..models.chat import ChatModel
from ..models.hashing import HashingEmbedder
from ..models.sim import Faults, SimBackend, templated_math_stream

__all__ = ["SimCascade", "simulated_levels"]

#: the base URL the simulated models are addressed by (never resolved: the transport answers)
SIM_BASE_URL = "http://sim.invalid/v1"


@dataclass(frozen=True, slots=True, eq=False)
class SimCascade:
    """Simulated levels (weakest first) sharing one mock-transport client.

    ``embedder`` is a deterministic :class:`HashingEmbedder` so that
    :func:`~intercascade_core.run_stream` needs no model files either.
    :meth:`queries` gives templated problems the simulated models can answer; use
    disjoint seeds for the calibration split and the stream.
    """

    levels: tuple[Level, ...]
    backend: SimBackend
    client: httpx.Client
    embedder: HashingEmbedder

    def queries(self, n: int, *, seed: int, n_templates: int = 10) -> tuple[Query, ...]:
        """``n`` seeded templated math problems with gold answers."""
        return templated_math_stream(n, n_templates=n_templates, seed=seed)


@contextmanager
def simulated_levels(
    models: Sequence[str] = ("sim-weak", "sim-strong"),
    *,
    seed: int = 0,
    faults: Faults | None = None,
    embedding_dim: int = 64,
    max_retries: int = 2,
) -> Iterator[SimCascade]:
    """Yield a :class:`SimCascade` of ``models`` (names of the simulator's profiles:
    ``sim-weak``, ``sim-mid``, ``sim-strong``) and close its client afterwards.

    Everything is a pure function of ``seed`` and the requests: the same test sees the
    same answers and confidences on every run. ``faults`` injects 429/500/timeouts or
    malformed replies; retries do not sleep.
    """
    backend = SimBackend(seed=seed, faults=faults if faults is not None else Faults())
    unknown = [m for m in models if m not in backend.profiles]
    if isinstance(models, str) or not models or unknown:
        raise InvalidArgumentError(
            "models", f"must name simulator profiles {sorted(backend.profiles)}, got {models!r}"
        )
    with httpx.Client(transport=backend.transport()) as client:
        levels = tuple(
            Level(ChatModel(SIM_BASE_URL, name, client=client, max_retries=max_retries, sleep=_no_sleep))
            for name in models
        )
        yield SimCascade(levels, backend, client, HashingEmbedder(dim=embedding_dim, seed=seed))


def _no_sleep(_seconds: float) -> None:
    """Retries of simulated faults need no backoff."""
