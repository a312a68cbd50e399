"""One query through the cascade as a sans-I/O state machine.

A :class:`QueryMachine` decides and never performs I/O: it never calls a model or an
embedder. :meth:`QueryMachine.next` says what it needs, as a small frozen record:

* :class:`Embed` — the query's embedding row (asked lazily: only when a level has
  strategies to retrieve, or a strategy is to be stored);
* :class:`Ask` — a model call at one level, ``purpose="answer"`` or ``"teach"`` (the
  strategy call of the two-call mode);
* :class:`Done` — the query's :class:`~.cascade.Outcome` (without wall latency), the
  counters it adds and the strategies it teaches, still *pending*.

The driver performs the request and hands back the result with
:meth:`QueryMachine.feed`: an embedding row, a :class:`~.protocols.Generation`, or the
:class:`~intercascade_core.errors.ModelError` the model raised. Retrieval over the
in-memory repositories is pure computation and happens inside. Because the machine holds
all the decision logic, a synchronous driver (:func:`~.cascade.step`) and an asynchronous
one share it unchanged; only the way a request is performed differs.

:func:`apply` turns a :class:`Done` into the next state. Its teachings are kept apart from
the outcome so that a concurrent shell can append them to whichever repository version is
newest when it commits, not only to the one the query started from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from ..errors import InvalidArgumentError, MalformedStrategy, ModelError
from .prompts import (
    answer_and_strategy_prompt,
    as_messages,
    parse_strategy,
    strategy_free_prompt,
    strategy_generation_prompt,
    weak_prompt,
)
from .protocols import Generation
from .repository import Entry, Repository, unit_rows, update
from .retrieve import retrieve
from .sanitize import sanitize_entry
from .state import (
    CascadeConfig,
    CascadeState,
    Counters,
    Outcome,
    Status,
    StrategyUse,
    Usage,
)
from .tasks import Query, grade

__all__ = [
    "Ask",
    "Call",
    "Done",
    "Embed",
    "QueryMachine",
    "Request",
    "Teaching",
    "accepts",
    "answer_prompt",
    "apply",
    "select_strategies",
    "teach_targets",
    "teaching_entry",
]


# ----------------------------------------------------------------------------- requests
@dataclass(frozen=True, slots=True)
class Embed:
    """The machine needs the embedding row of ``text`` (the query): to select strategies
    for a prompt, or to store the strategy it was taught. It asks at most once per query."""
    text: str


@dataclass(frozen=True, slots=True)
class Ask:
    """The machine needs level ``level``'s reply to ``prompt``: its answer, or (``"teach"``)
    the strategy it writes after a confident answer."""
    level: int
    prompt: str
    purpose: Literal["answer", "teach"]

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat messages to send (a fresh list on every access)."""
        return as_messages(self.prompt)


@dataclass(frozen=True, slots=True, eq=False)
class Teaching:
    """A strategy to store: the entry, its read-only unit query row and the repository
    indexes it goes to. Equal when all three are (the row compared element-wise)."""
    entry: Entry
    vector: npt.NDArray[np.float32]
    targets: tuple[int, ...]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Teaching):
            return NotImplemented
        return (
            self.entry == other.entry
            and self.targets == other.targets
            and np.array_equal(self.vector, other.vector)
        )

    __hash__ = None  # type: ignore[assignment]  # holds an array: unhashable, like a list


@dataclass(frozen=True, slots=True, eq=False)
class Done:
    """The query is finished. ``outcome.latency_s`` is 0 (the driver measures time);
    ``counters`` is this query's delta; ``teachings`` are not in any repository yet."""
    outcome: Outcome
    counters: Counters
    teachings: tuple[Teaching, ...]


Call: TypeAlias = Embed | Ask  # what a driver performs
Request: TypeAlias = Embed | Ask | Done


# ----------------------------------------------------------------------------- decisions
def wants_strategies(state: CascadeState, level: int, config: CascadeConfig) -> bool:
    """Whether ``level``'s prompt draws strategies (every level but the last, when the
    policy teaches, ``k > 0`` and its repository is not empty)."""
    return (
        level < state.n_levels - 1
        and config.teaches
        and config.k > 0
        and len(state.repositories[level]) > 0
    )


def select_strategies(
    repo: Repository, qvec: np.ndarray, config: CascadeConfig, rng_key: tuple[int, int]
) -> tuple[list[Entry], tuple[StrategyUse, ...]]:
    """The strategies for one prompt: top-k by cosine, or k uniformly drawn (seeded)."""
    if config.policy == "retrieval":

        top = retrieve(
            repo, qvec[None, :], config.k, backend=config.backend, tenant=config.tenant_name
        )
        idx = [int(i) for i in top.indices[0] if i >= 0]
        sims = [float(s) for s in top.scores[0][: len(idx)]]
    else:  # random: uniform without replacement over this tenant's entries
        pool = np.arange(len(repo))
        pool = pool[repo.tenant_codes == repo.tenant_code(config.tenant_name)]
        rng = np.random.default_rng(list(rng_key))
        take = min(config.k, len(pool))
        idx = [int(i) for i in rng.choice(pool, size=take, replace=False)] if take else []
        sims = [float(repo.vectors[i] @ qvec) for i in idx]
    entries = [repo.entries[i] for i in idx]
    return entries, tuple(StrategyUse(e.id, s) for e, s in zip(entries, sims, strict=True))


def single_call(level: int, n_levels: int, config: CascadeConfig) -> bool:
    """Whether ``level`` answers and writes its strategy in one call (the last level only)."""
    return (
        level == n_levels - 1
        and level >= 1
        and config.teaches
        and config.strategy_mode == "single_call"
    )


def answer_prompt(
    query: Query, level: int, n_levels: int, config: CascadeConfig, entries: Sequence[Entry]
) -> str:
    """The prompt of ``level``: strategies first for weaker levels, the baseline prompt
    for the last (or the answer-and-strategy prompt in single-call mode)."""
    if single_call(level, n_levels, config):
        return answer_and_strategy_prompt(query)
    if level == n_levels - 1:
        return strategy_free_prompt(query)
    return weak_prompt(query, entries)


def accepts(confidence: float, threshold: float) -> bool:
    """A level's answer is output iff ``confidence >= threshold`` (NaN never clears it)."""
    return confidence >= threshold


def teach_targets(level: int, config: CascadeConfig) -> tuple[int, ...]:
    """The repositories a confident ``level`` writes to (none for level 0 or ``jung``)."""
    if level < 1 or not config.teaches:
        return ()
    return tuple(range(level)) if config.teach == "all_weaker" else (level - 1,)


def teaching_entry(
    query: Query, answer: str | None, reply: str, level: int, name: str, position: int,
    tenant: str | None, *, strict: bool = False,
) -> Entry:
    """The repository entry taught by ``reply``; raises :class:`MalformedStrategy`.

    ``strict``: the extra length and instance-number filter (``store_rule="strict"``);
    without it every reply with a non-empty ``Strategy:`` section is stored, as the paper
    stores every strategy whose answer cleared the threshold.

    The strategy is LLM-written and the query and answer come from outside, so the whole
    entry is stored sanitised; ``created_at`` is the stream position, not wall time, so
    runs are reproducible.
    """
    strategy = parse_strategy(reply, problem=query.text, strict=strict).strategy
    entry = Entry(
        query=query.text,
        answer=answer if answer is not None else "",
        strategy=strategy,
        source_level=level,
        source_model=name,
        created_at=float(position),
        tenant=tenant or "default",
    )
    return sanitize_entry(entry)  # every driver stores the same sanitised entry


# ----------------------------------------------------------------------------- the trace
@dataclass(frozen=True, slots=True)
class _LevelTrace:
    """What happened at one level of one query."""
    asked: bool = False
    strategies: tuple[StrategyUse, ...] = ()
    confidence: float | None = None
    answer: str | None = None
    correct: bool | None = None
    unparseable: bool = False
    usage: Usage = field(default_factory=Usage)
    teach_usage: Usage = field(default_factory=Usage)
    failure: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class _Trace:
    """The machine's whole progress: the level in hand, what it waits for, and so far."""
    level: int
    levels: tuple[_LevelTrace, ...]
    request: Request | None = None
    qvec: npt.NDArray[np.float32] | None = None
    draws: int = 0  # random-policy draws, each keyed by its own rng_counter
    accepted_at: int | None = None
    entry: Entry | None = None
    rejected: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class _Query:
    """What stays fixed while one query runs."""
    state: CascadeState
    query: Query
    names: tuple[str, ...]
    config: CascadeConfig
    index: int

    @property
    def n(self) -> int:
        return self.state.n_levels


def _at(t: _Trace, i: int, **changes: object) -> _Trace:
    """``t`` with level ``i``'s trace changed."""
    levels = list(t.levels)
    levels[i] = replace(levels[i], **changes)  # type: ignore[arg-type]
    return replace(t, levels=tuple(levels))


# ----------------------------------------------------------------------------- transitions
def _enter(c: _Query, t: _Trace) -> _Trace:
    """Start level ``t.level``: retrieve its strategies (after the query row) and ask it;
    past the last level the query is discarded."""
    i = t.level
    if i == c.n:
        return _finish(c, t)
    entries: list[Entry] = []
    if wants_strategies(c.state, i, c.config):
        if t.qvec is None:
            return replace(t, request=Embed(c.query.text))
        key = (c.config.seed, c.state.rng_counter + t.draws)
        entries, uses = select_strategies(c.state.repositories[i], t.qvec, c.config, key)
        t = _at(t, i, strategies=uses)
        if c.config.policy == "random":
            t = replace(t, draws=t.draws + 1)
    prompt = answer_prompt(c.query, i, c.n, c.config, entries)
    return replace(_at(t, i, asked=True), request=Ask(i, prompt, "answer"))


def _on_answer(c: _Query, t: _Trace, gen: Generation) -> _Trace:
    """Grade the answer, then accept (and maybe teach) or defer to the next level."""
    i = t.level
    g = grade(gen.text, c.query.gold, c.query.family)
    t = _at(
        t, i, usage=t.levels[i].usage.add(gen), confidence=gen.confidence,
        answer=g.answer, correct=g.correct, unparseable=g.unparseable,
    )
    if not accepts(gen.confidence, c.state.calibrations[i].threshold):
        return _enter(c, replace(t, level=i + 1))
    t = replace(t, accepted_at=i)
    if not teach_targets(i, c.config):
        return _finish(c, t)
    if single_call(i, c.n, c.config):
        return _taught(c, t, gen.text)
    shown = g.answer if g.answer is not None else "(no parseable answer)"
    return replace(t, request=Ask(i, strategy_generation_prompt(c.query, shown), "teach"))


def _on_answer_failure(c: _Query, t: _Trace, err: ModelError) -> _Trace:
    """A failed level cannot accept: record why and defer."""
    i = t.level
    t = _at(t, i, failure=f"level {i} ({c.names[i]}): {err.reason}")
    return _enter(c, replace(t, level=i + 1))


def _on_teaching(c: _Query, t: _Trace, gen: Generation) -> _Trace:
    t = _at(t, t.level, teach_usage=t.levels[t.level].teach_usage.add(gen))
    return _taught(c, t, gen.text)


def _on_teaching_failure(c: _Query, t: _Trace, err: ModelError) -> _Trace:
    return _finish(c, replace(t, rejected=f"strategy call failed: {err.reason}"))


def _taught(c: _Query, t: _Trace, reply: str) -> _Trace:
    """Parse the teacher's reply into an entry; it then needs the query row to be stored."""
    i = t.level
    try:
        entry = teaching_entry(
            c.query, t.levels[i].answer, reply, i, c.names[i], c.state.n_queries, c.config.tenant_name,
            strict=c.config.store_rule == "strict",
        )
    except MalformedStrategy as e:
        return _finish(c, replace(t, rejected=e.reason))
    t = replace(t, entry=entry)
    if t.qvec is None:
        return replace(t, request=Embed(c.query.text))
    return _finish(c, t)


def _on_vector(c: _Query, t: _Trace, row: npt.NDArray[np.float32]) -> _Trace:
    """The query row: store the taught entry if one waits for it, else select and ask."""
    t = replace(t, qvec=row)
    return _finish(c, t) if t.entry is not None else _enter(c, t)


def _finish(c: _Query, t: _Trace) -> _Trace:
    return replace(t, request=_done(c, t))


def _done(c: _Query, t: _Trace) -> Done:
    """The outcome, the counters delta and the pending teaching of a finished query."""
    lv, at = t.levels, t.accepted_at
    teachings: tuple[Teaching, ...] = ()
    if t.entry is not None:
        assert t.qvec is not None and at is not None
        teachings = (Teaching(t.entry, t.qvec, teach_targets(at, c.config)),)
    status: Status = "accepted" if at is not None else "discarded"
    outcome = Outcome(
        index=c.index,
        query_id=c.query.id,
        status=status,
        level=at,
        answer=lv[at].answer if at is not None else None,
        correct=lv[at].correct if at is not None else None,
        unparseable=lv[at].unparseable if at is not None else False,
        confidences=tuple(x.confidence for x in lv),
        level_answers=tuple(x.answer for x in lv),
        level_correct=tuple(x.correct for x in lv),
        strategies=tuple(x.strategies for x in lv),
        usage=tuple(x.usage for x in lv),
        teach_usage=tuple(x.teach_usage for x in lv),
        failures=tuple(x.failure for x in lv),
        stored_in=teachings[0].targets if teachings else (),
        strategy_rejected=t.rejected,
        template=c.query.template,
    )
    counters = Counters(
        n_queries=1,
        calls=tuple(int(x.asked) for x in lv),
        accepted=tuple(int(i == at) for i in range(len(lv))),
        n_discarded=int(at is None),
        n_failed_calls=sum(x.failure is not None for x in lv),
        n_stored=int(bool(teachings)),
        n_rejected_strategies=int(t.rejected is not None),
        rng_counter=t.draws,
    )
    return Done(outcome, counters, teachings)


# ----------------------------------------------------------------------------- the machine
class QueryMachine:
    """One query's decisions, driven from outside (see the module docstring)::

        machine = QueryMachine(state, query, names, config)
        while not isinstance(request := machine.next(), Done):
            machine.feed(perform(request))   # a row, a Generation or a ModelError

    ``names`` are the levels' names (used in failure text and as ``Entry.source_model``).
    ``index`` labels the outcome (default: ``state.n_queries``). The machine reads
    ``state`` and never changes it.
    """
    __slots__ = ("_c", "_t")

    def __init__(
        self,
        state: CascadeState,
        query: Query,
        names: Sequence[str],
        config: CascadeConfig = CascadeConfig(),
        *,
        index: int | None = None,
    ) -> None:
        if not isinstance(state, CascadeState):
            raise InvalidArgumentError(
                "state", f"expected a CascadeState, got {type(state).__name__}"
            )
        if not isinstance(query, Query):
            raise InvalidArgumentError("query", f"expected a tasks.Query, got {type(query).__name__}")
        if not isinstance(config, CascadeConfig):
            raise InvalidArgumentError(
                "config", f"expected a CascadeConfig, got {type(config).__name__}"
            )
        if isinstance(names, str) or len(names) != state.n_levels:
            raise InvalidArgumentError(
                "names", f"state has {state.n_levels} calibrated levels, got names {names!r}"
            )
        if not all(isinstance(x, str) for x in names):
            raise InvalidArgumentError("names", f"level names must be str, got {names!r}")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise InvalidArgumentError("index", f"must be an int or None, got {index!r}")
        position = state.n_queries if index is None else index
        self._c = _Query(state, query, tuple(names), config, position)
        self._t = _enter(self._c, _Trace(0, (_LevelTrace(),) * state.n_levels))

    def next(self) -> Request:
        """What the machine needs now (the same record until it is fed), or :class:`Done`."""
        assert self._t.request is not None
        return self._t.request

    @property
    def done(self) -> bool:
        """Whether the query is finished (:meth:`next` returns :class:`Done`)."""
        return isinstance(self._t.request, Done)

    def feed(self, result: object) -> None:
        """Hand back the result of :meth:`next`'s request.

        :class:`Embed` takes a 1-D float array of the repositories' dimension; :class:`Ask`
        takes a :class:`Generation` or the :class:`ModelError` the call raised. Any other
        result, or any result after :class:`Done`, raises :class:`InvalidArgumentError`
        and leaves the machine as it was.
        """
        c, t, req = self._c, self._t, self.next()
        if isinstance(req, Done):
            raise InvalidArgumentError("result", "the query is done; there is nothing to feed")
        if isinstance(req, Embed):
            self._t = _on_vector(c, t, self._row(result))
        elif isinstance(result, Generation):
            self._t = (_on_answer if req.purpose == "answer" else _on_teaching)(c, t, result)
        elif isinstance(result, ModelError):
            on_error = _on_answer_failure if req.purpose == "answer" else _on_teaching_failure
            self._t = on_error(c, t, result)
        else:
            raise InvalidArgumentError(
                "result",
                f"{req.purpose} call at level {req.level} needs a Generation or a ModelError, "
                f"got {type(result).__name__}",
            )

    def _row(self, result: object) -> npt.NDArray[np.float32]:
        """The fed embedding as a private read-only float32 row (bit-identical values)."""
        dim = self._c.state.repositories[0].dim
        if (
            not isinstance(result, np.ndarray)
            or result.dtype.kind != "f"
            or result.shape != (dim,)
        ):
            got = (
                f"an array of shape {result.shape} and dtype {result.dtype}"
                if isinstance(result, np.ndarray)
                else type(result).__name__
            )
            raise InvalidArgumentError(
                "result", f"an Embed request needs a float row of shape ({dim},), got {got}"
            )
        row = np.array(result, dtype=np.float32)  # a copy: the caller may reuse its buffer
        # the repository's one check (finite, unit norm), now rather than after the model calls
        unit_rows(row, dim, count=1, argument="result", renormalise=False)
        row.flags.writeable = False
        return row

    def __repr__(self) -> str:
        return f"QueryMachine(query={self._c.query.id!r}, level={self._t.level}, next={self.next()!r})"


# ----------------------------------------------------------------------------- applying
def apply(state: CascadeState, done: Done) -> CascadeState:
    """``state`` with a finished query's teachings appended (:func:`update`) and its
    counters added. ``state`` need not be the one the query started from: any version
    with the same levels takes the same teachings."""
    if not isinstance(state, CascadeState):
        raise InvalidArgumentError("state", f"expected a CascadeState, got {type(state).__name__}")
    if not isinstance(done, Done):
        raise InvalidArgumentError("done", f"expected a Done record, got {type(done).__name__}")
    repos = list(state.repositories)
    for teaching in done.teachings:
        for j in teaching.targets:
            if not 0 <= j < len(repos):
                raise InvalidArgumentError(
                    "done", f"a teaching targets repository {j}; the state has {len(repos)}"
                )
    for teaching in done.teachings:
        row = teaching.vector[None, :]
        for j in teaching.targets:
            repos[j] = update(repos[j], [teaching.entry], row)
    return dataclasses.replace(
        state, repositories=tuple(repos), counters=state.counters + done.counters
    )
