"""The cascade's values: its configuration, its state and what one query produced.

A :class:`CascadeState` is a value: the calibrated thresholds per level, the strategy
repositories (one per level but the last) and the run :class:`Counters`. The
:class:`~.machine.QueryMachine` reads it and :func:`~.machine.apply` returns the next one;
:class:`Outcome` records how one query ended. The drivers live in :mod:`.cascade`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal, get_args

from ..errors import InvalidArgumentError
from .calibrate import Calibration
from .protocols import Generation, TextModel
from .repository import Repository, empty_repository
from .retrieve import backend_names

__all__ = [
    "CascadeConfig",
    "CascadeState",
    "Counters",
    "Level",
    "Outcome",
    "StrategyUse",
    "Usage",
    "init_state",
    "initial_state",
]

Policy = Literal["jung", "random", "retrieval"]
Teach = Literal["all_weaker", "previous"]
StrategyMode = Literal["two_call", "single_call"]
StoreRule = Literal["paper", "strict"]
Status = Literal["accepted", "discarded"]


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True, slots=True)
class Level:
    """One model of the cascade. ``params`` are extra request parameters (e.g.
    ``{"temperature": 0, "max_tokens": 1024}``) sent with each of its calls."""

    model: TextModel
    name: str = ""
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not callable(getattr(self.model, "generate", None)):
            raise InvalidArgumentError(
                "model", f"needs a .generate(messages, **params) method, got {self.model!r}"
            )
        if not self.name:
            object.__setattr__(self, "name", str(getattr(self.model, "model", "")) or "model")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


@dataclass(frozen=True, slots=True)
class CascadeConfig:
    """How the cascade uses strategies.

    policy: ``"retrieval"`` (Inter-Cascade), ``"random"`` (the random-strategy control) or
    ``"jung"`` (no strategies, no teaching: the baseline). k: strategies per prompt.
    backend: the ``retrieve`` backend *name* searched over the level's repository version
    (``"exact"``, ``"numpy"``, or a registered index such as ``"hnsw"``). An external
    :class:`~.protocols.SearchBackend` (a PostgreSQL table) is not searched per query: its
    strategies reach the cascade through the repository (``storage.sync``), so the machine
    stays free of I/O.
    teach: which weaker repositories a confident level >= 1 writes to.
    strategy_mode: ``"single_call"`` (the paper: the last level answers and writes the
    strategy in one generation; its model should then use ``confidence_span="answer"``, and
    it must be calibrated on that prompt, which :func:`~.cascade.calibrate_levels` does when
    given this config) or ``"two_call"`` (answer with the baseline prompt, then a separate
    strategy call on acceptance, counted as teaching).
    store_rule: ``"paper"`` stores every strategy whose strong answer cleared the threshold
    (a reply without a non-empty ``Strategy:`` section has nothing to store); ``"strict"``
    also rejects strategies that are too short or too long or that quote three or more of
    the problem's multi-digit numbers (:func:`~.prompts.parse_strategy`). Rejections are
    counted (``Counters.n_rejected_strategies``, ``Outcome.strategy_rejected``).
    seed: seeds the random policy. tenant: the repository tenant a query retrieves from and
    stores into; None means ``"default"`` (never "every tenant"), and ``""`` is refused.
    """

    policy: Policy = "retrieval"
    k: int = 2
    backend: str = "exact"
    teach: Teach = "all_weaker"
    strategy_mode: StrategyMode = "single_call"
    store_rule: StoreRule = "paper"
    seed: int = 0
    tenant: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in get_args(Policy):
            raise InvalidArgumentError(
                "policy", f"expected one of {get_args(Policy)}, got {self.policy!r}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise InvalidArgumentError("k", f"must be an int >= 0, got {self.k!r}")
        if not isinstance(self.backend, str) or self.backend not in backend_names():
            raise InvalidArgumentError(
                "backend", f"expected one of {backend_names()}, got {self.backend!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidArgumentError("seed", f"must be an int >= 0, got {self.seed!r}")
        if self.tenant is not None and (not isinstance(self.tenant, str) or not self.tenant):
            raise InvalidArgumentError(
                "tenant", f"must be a non-empty str or None ('default'), got {self.tenant!r}"
            )
        if self.teach not in get_args(Teach):
            raise InvalidArgumentError(
                "teach", f"expected one of {get_args(Teach)}, got {self.teach!r}"
            )
        if self.strategy_mode not in get_args(StrategyMode):
            raise InvalidArgumentError(
                "strategy_mode",
                f"expected one of {get_args(StrategyMode)}, got {self.strategy_mode!r}",
            )
        if self.store_rule not in get_args(StoreRule):
            raise InvalidArgumentError(
                "store_rule", f"expected one of {get_args(StoreRule)}, got {self.store_rule!r}"
            )

    @property
    def tenant_name(self) -> str:
        """The tenant queries read and write: ``tenant``, or ``"default"``."""
        return self.tenant or "default"

    @property
    def teaches(self) -> bool:
        return self.policy != "jung"


# ----------------------------------------------------------------------------- state
@dataclass(frozen=True, slots=True)
class Counters:
    """The run counters of a state, as a value that adds and subtracts field by field.

    A concurrent shell rebases a request's effect as ``current + (mine - base)``; since
    ``+`` and ``-`` walk every field, a counter added here can never be dropped there.
    Tuples (per-level counts) add element-wise; an empty tuple is the zero of any length.
    ``rng_counter`` with the config's seed keys the random policy's draws, so a run
    resumed from a state draws exactly what the uninterrupted run would have drawn.
    """

    n_queries: int = 0
    calls: tuple[int, ...] = ()
    accepted: tuple[int, ...] = ()
    n_discarded: int = 0
    n_failed_calls: int = 0
    n_stored: int = 0
    n_rejected_strategies: int = 0
    rng_counter: int = 0

    @classmethod
    def zero(cls, n_levels: int) -> Counters:
        return cls(calls=(0,) * n_levels, accepted=(0,) * n_levels)

    def _combine(self, other: Counters, sign: int) -> Counters:
        if not isinstance(other, Counters):
            return NotImplemented
        values: dict[str, Any] = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, tuple):
                a, b = a or (0,) * len(b), b or (0,) * len(a)
                if len(a) != len(b):
                    raise InvalidArgumentError(
                        f.name, f"per-level counters of {len(a)} and {len(b)} levels"
                    )
                values[f.name] = tuple(x + sign * y for x, y in zip(a, b, strict=True))
            else:
                values[f.name] = a + sign * b
        return Counters(**values)

    def __add__(self, other: Counters) -> Counters:
        return self._combine(other, +1)

    def __sub__(self, other: Counters) -> Counters:
        return self._combine(other, -1)


@dataclass(frozen=True, slots=True, eq=False)
class CascadeState:
    """Everything a step reads and returns, as a value.

    ``repositories[i]`` serves level i (there is none for the last level);
    ``counters`` holds the run counters (also readable as attributes: ``state.calls``).
    """

    calibrations: tuple[Calibration, ...]
    repositories: tuple[Repository, ...]
    counters: Counters = Counters()

    def __post_init__(self) -> None:
        cals, repos = self.calibrations, self.repositories
        if not isinstance(cals, tuple) or not cals or not all(
            isinstance(c, Calibration) for c in cals
        ):
            raise InvalidArgumentError("calibrations", "must be a non-empty tuple of Calibration")
        if not isinstance(repos, tuple) or not all(isinstance(r, Repository) for r in repos):
            raise InvalidArgumentError("repositories", "must be a tuple of Repository")
        if len(repos) != len(cals) - 1:
            raise InvalidArgumentError(
                "repositories",
                f"needs one per level but the last ({len(cals) - 1}), got {len(repos)}",
            )
        if not isinstance(self.counters, Counters):
            raise InvalidArgumentError(
                "counters", f"must be Counters, got {type(self.counters).__name__}"
            )

    @property
    def thresholds(self) -> tuple[float, ...]:
        return tuple(c.threshold for c in self.calibrations)

    @property
    def n_levels(self) -> int:
        return len(self.calibrations)

    @property
    def n_queries(self) -> int:
        return self.counters.n_queries

    @property
    def calls(self) -> tuple[int, ...]:
        return self.counters.calls

    @property
    def accepted(self) -> tuple[int, ...]:
        return self.counters.accepted

    @property
    def n_discarded(self) -> int:
        return self.counters.n_discarded

    @property
    def n_failed_calls(self) -> int:
        return self.counters.n_failed_calls

    @property
    def n_stored(self) -> int:
        return self.counters.n_stored

    @property
    def n_rejected_strategies(self) -> int:
        return self.counters.n_rejected_strategies

    @property
    def rng_counter(self) -> int:
        return self.counters.rng_counter


def init_state(calibrations: Sequence[Calibration], dim: int) -> CascadeState:
    """A fresh state: the given thresholds, empty repositories of ``dim``-d embeddings."""
    cals = tuple(calibrations)
    if len(cals) < 1:
        raise InvalidArgumentError("calibrations", "at least one level is required")
    for c in cals:
        if not isinstance(c, Calibration):
            raise InvalidArgumentError(
                "calibrations", f"expected Calibration records, got {type(c).__name__}"
            )
    n = len(cals)
    return CascadeState(
        calibrations=cals,
        repositories=tuple(empty_repository(dim) for _ in range(n - 1)),
        counters=Counters.zero(n),
    )


def initial_state(
    state: CascadeState | None, calibrations: Sequence[Calibration] | None, dim: int
) -> CascadeState:
    """The state a run starts from: ``state`` to resume, or a fresh one from
    ``calibrations``; exactly one of the two must be given."""
    if (state is None) == (calibrations is None):
        raise InvalidArgumentError("state", "pass exactly one of state= or calibrations=")
    if state is None:
        assert calibrations is not None
        return init_state(calibrations, dim)
    if not isinstance(state, CascadeState):
        raise InvalidArgumentError("state", f"expected a CascadeState, got {type(state).__name__}")
    return state


# ----------------------------------------------------------------------------- outcome
@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and cost of the calls of one kind at one level (``cost`` None = unknown price)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, g: Generation) -> Usage:
        cost = None if self.cost is None or g.cost is None else self.cost + g.cost
        return Usage(
            self.calls + 1,
            self.prompt_tokens + g.prompt_tokens,
            self.completion_tokens + g.completion_tokens,
            cost,
        )

    def __add__(self, other: Usage) -> Usage:
        cost = None if self.cost is None or other.cost is None else self.cost + other.cost
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            cost,
        )


@dataclass(frozen=True, slots=True)
class StrategyUse:
    """A strategy placed in a prompt: its repository entry id and cosine similarity."""

    entry_id: int
    similarity: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one query ended. Per-level tuples have one slot per level (None = not asked).

    ``status`` is ``"accepted"`` (``level`` answered) or ``"discarded"``; ``kind`` names
    it as the paper does (``weak_accepted``, ``strong_accepted``, ``level<i>_accepted``,
    ``discarded``). ``failure`` is the first model failure's reason (``failures`` has all
    of them per level); ``stored_in`` lists the repositories that received this query's
    strategy and ``strategy_rejected`` why none did when a teacher tried.
    ``latency_s`` is wall time and excluded from equality.
    """

    index: int
    query_id: str
    status: Status
    level: int | None
    answer: str | None
    correct: bool | None
    unparseable: bool
    confidences: tuple[float | None, ...]
    level_answers: tuple[str | None, ...]
    level_correct: tuple[bool | None, ...]
    strategies: tuple[tuple[StrategyUse, ...], ...]
    usage: tuple[Usage, ...]
    teach_usage: tuple[Usage, ...]
    failures: tuple[str | None, ...]
    stored_in: tuple[int, ...] = ()
    strategy_rejected: str | None = None
    template: str | None = None
    latency_s: float = field(default=0.0, compare=False)

    @property
    def n_levels(self) -> int:
        return len(self.confidences)

    @property
    def kind(self) -> str:
        if self.status == "discarded":
            return "discarded"
        if self.level == 0:
            return "weak_accepted"
        if self.level == self.n_levels - 1:
            return "strong_accepted"
        return f"level{self.level}_accepted"

    @property
    def failure(self) -> str | None:
        return next((f for f in self.failures if f is not None), None)

    @property
    def failed(self) -> bool:
        return any(f is not None for f in self.failures)


# ----------------------------------------------------------------------------- step
