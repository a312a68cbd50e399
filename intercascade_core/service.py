"""A thread-safe :class:`Cascade` shell over the pure core.

The decisions of one query belong to the sans-I/O
:class:`~intercascade_core.core.machine.QueryMachine`. :class:`Cascade` holds the current
:class:`~intercascade_core.core.cascade.CascadeState` value and serves concurrent
:meth:`Cascade.ask` calls:

1. under the lock: read the **published** state ``base`` and take the outcome index;
2. outside the lock: drive the machine over ``base``
   (:func:`~intercascade_core.core.cascade.drive`) — embedding, retrieval and all model
   calls run concurrently with other requests. It ends in a
   :class:`~intercascade_core.core.machine.Done` whose teachings are still pending (their
   entries already sanitised by the machine);
3. under the lock: **reserve**. The pending teachings are appended to the newest
   repository versions (the *tail*, which includes every earlier reservation), in place:
   appending to the newest version of an arena writes past its end and never copies it.
   The counters become ``tail.counters + done.counters``, and the request gets the next
   sequence number;
4. outside the lock: write the request's journal records (with a ``store``);
5. under the lock: **publish**, in sequence order, and return.

Snapshot isolation: a request retrieves from the repositories as they were published when
it started (it does not see strategies committed while its model calls were in flight).

At reservation, before a strategy is stored, the shell suppresses near-duplicates
(``dedupe_distance``): an entry whose query embedding lies within that cosine distance of
a stored or reserved entry of the **same tenant** is not stored; the returned
:class:`~intercascade_core.core.cascade.Outcome` then has ``stored_in=()`` and
``strategy_rejected`` naming the duplicate. At publication it

* counts usage: each entry placed in the request's prompt gets one use (an int64 counter
  per row, :attr:`Cascade.uses`), the input of least-used eviction;
* enforces the cap (``max_entries``): when a repository grows past it, it is pruned to
  ``max_entries - evict_batch`` rows (:func:`~intercascade_core.core.prune.evict`; rows are
  renumbered and a durable store is checkpointed).

Durability and order (``store``: one
:class:`~intercascade_core.storage.journal.DurableStore` per taught level in
``<store>/level<i>``). The journal is written and fsynced outside the lock; the order
argument:

* reservations are serialised by the lock and numbered 1, 2, ...; the tail after ``s`` is
  the tail after ``s - 1`` plus the effect of ``s``;
* request ``s`` writes its records only on its *turn* (``published == s - 1``), and
  ``published`` becomes ``s`` only after those writes returned: records are written one
  request at a time, in sequence order, so replaying the journal appends every row at the
  position its reservation gave it;
* publishing ``s`` makes the tail after ``s`` the state: all of ``1..s``, nothing later.
  A later commit never becomes visible before an earlier one;
* :meth:`ask` returns after publishing, hence after its own records and every earlier
  one are durable: a SIGKILL loses at most requests that have not returned;
* usage counters change at publication, so a snapshot (always of the published state)
  holds a request's uses exactly when it holds its journal record. Snapshots are taken
  while no record is being written: ``checkpoint_every`` by the publisher, still on its
  turn; :meth:`checkpoint`, :meth:`prune`, :meth:`close` and eviction first stop new
  reservations and wait until every reserved request is published and no journal write
  is in progress (*drain*);
* a commit that could push a repository past ``max_entries`` drains and then commits
  alone (journal under the lock: once per ``evict_batch`` commits), because eviction
  renumbers the rows that reserved requests' records refer to;
* pruned repositories (eviction, :meth:`prune`) become the state only after every store
  has checkpointed them, so no journal record is ever numbered by rows that are not on
  disk.

Failures. A request reserved but never published would hold every later one back, so
from its reservation to its publication any exception, an interrupt included, *stops*
the service; so does a failed checkpoint, which may leave a store midway (its snapshot
written, its journal not reset), where no record may be appended any more. Once stopped,
every call but :meth:`close` raises :class:`~intercascade_core.errors.ServiceClosedError`
whose ``__cause__`` is the failure, and :meth:`close` skips its checkpoint. What a caller
sees:

* the request whose journal write failed raises that error: it was not committed
  (with several taught levels, the levels journalled before the failing one do hold it
  after a reopen);
* requests reserved after it raise :class:`ServiceClosedError`: not committed either;
* a checkpoint that fails after a commit was published (``checkpoint_every``, eviction)
  is not that commit's failure: :meth:`ask` returns its outcome (it is durable) and the
  error is logged; the *next* call raises :class:`ServiceClosedError` from it. An
  explicit :meth:`checkpoint`, :meth:`prune` or :meth:`close` raises it;
* nothing acknowledged is lost: reopening the store gives every acknowledged commit
  (with eviction or :meth:`prune` interrupted, the rows before or after pruning).

Per-request tenants: ``ask(query, tenant="a")`` retrieves only tenant ``a``'s strategies
and stores the new strategy under ``a``.

Other drivers. :meth:`Cascade.ask` is :meth:`Cascade.begin` (step 1: a
:class:`Ticket` holding the query's machine), the synchronous driver (step 2) and
:meth:`Cascade.finish` (steps 3-5). :meth:`Cascade.aask` awaits the machine's requests
through a caller's coroutine instead (the gateway's async models and batched embedder) and
runs the same :meth:`finish` on an executor thread, because a commit may wait for its
turn and for the journal; any driver therefore makes the same decisions and the same commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt

from .core.calibrate import Calibration
from .core.cascade import (
    CascadeConfig,
    CascadeState,
    Counters,
    Level,
    Outcome,
    check_levels,
    drive,
    initial_state,
    log_outcome,
)
from .core.machine import Call, Done, Embed, QueryMachine
from .core.protocols import Embedder
from .core.prune import Policy, dedupe, evict, find_near_duplicate
from .core.repository import Entry, Repository, update
from .core.tasks import Query
from .errors import InvalidArgumentError, ServiceClosedError
from .storage.journal import DurableStore, Fsync
from .storage.store import Verify

__all__ = ["Cascade", "Ticket"]

log = logging.getLogger(__name__)


class _Uses:
    """Usage counters of one repository: a growable int64 array owned by the shell
    (mutated only under the shell's lock); :meth:`view` returns a read-only copy."""

    __slots__ = ("buf", "n")

    def __init__(self, initial: npt.ArrayLike) -> None:
        arr = np.asarray(initial, dtype=np.int64)
        self.buf = np.zeros(max(16, 2 * len(arr)), dtype=np.int64)
        self.buf[: len(arr)] = arr
        self.n = len(arr)

    def resize(self, n: int) -> None:
        if n > len(self.buf):
            buf = np.zeros(max(n, 2 * len(self.buf)), dtype=np.int64)
            buf[: self.n] = self.buf[: self.n]
            self.buf = buf
        if n > self.n:
            self.buf[self.n : n] = 0
        self.n = n

    def add(self, rows: Sequence[int]) -> None:
        if len(rows) <= 8:  # a request's k strategies: np.add.at costs more to set up
            for r in rows:
                self.buf[r] += 1
        else:
            np.add.at(self.buf, np.asarray(rows, dtype=np.int64), 1)

    def view(self) -> npt.NDArray[np.int64]:
        out = self.buf[: self.n].copy()
        out.flags.writeable = False
        return out


@dataclass(frozen=True, slots=True)
class _Log:
    """What one request adds to repository ``level``: entries with their rows as stored,
    and the rows (of the version it started from) whose usage it counts."""

    level: int
    entries: tuple[Entry, ...]
    rows: npt.NDArray[np.float32]
    used: tuple[int, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Ticket:
    """One query begun by :meth:`Cascade.begin`: its machine (to be driven to
    :class:`~.core.machine.Done`), the published state it reads and when it started."""

    machine: QueryMachine
    base: CascadeState
    epoch: int
    started: float


@dataclass(frozen=True, slots=True, eq=False)
class _Reservation:
    """A reserved commit: its sequence number, the tail state after it, its journal."""

    seq: int
    state: CascadeState
    logs: tuple[_Log, ...]


# ----------------------------------------------------------------------------- arguments
def _optional_int(argument: str, value: object, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(argument, f"must be None or an int >= {minimum}, got {value!r}")
    return value


def _optional_distance(argument: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 2.0:
        raise InvalidArgumentError(
            argument, f"must be None or a cosine distance in [0, 2], got {value!r}"
        )
    return float(value)


def _evict_batch(value: object, max_entries: int | None) -> int:
    """The rows evicted below the cap at once (default: a tenth of it)."""
    if value is None:
        return 0 if max_entries is None else max(1, max_entries // 10)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 0
        or (max_entries is not None and value >= max_entries)
    ):
        raise InvalidArgumentError(
            "evict_batch", f"must be an int in [0, max_entries), got {value!r}"
        )
    return value


def _tenants(tenant: object, n: int) -> list[str | None]:
    """``ask_many``'s tenant argument as one tenant per query."""
    if tenant is None or isinstance(tenant, str):
        return [tenant] * n
    if not isinstance(tenant, Sequence):
        raise InvalidArgumentError(
            "tenant", f"must be a str, None or one per query, got {type(tenant).__name__}"
        )
    tenants = list(tenant)
    if len(tenants) != n:
        raise InvalidArgumentError(
            "tenant", f"needs one tenant per query ({n}), got {len(tenants)}"
        )
    for t in tenants:
        if t is not None and not isinstance(t, str):
            raise InvalidArgumentError("tenant", f"must be a str or None, got {t!r:.80}")
    return tenants


def _check_query(query: object) -> None:
    if not isinstance(query, Query):
        raise InvalidArgumentError("query", f"expected a tasks.Query, got {type(query).__name__}")


def _open_stores(
    root: Path, n: int, embedder: Embedder, fsync: Fsync, verify: Verify
) -> tuple[DurableStore, ...]:
    """One durable store per repository, ``<root>/level<j>`` (all or none stay open)."""
    stores: list[DurableStore] = []
    try:
        for j in range(n):
            stores.append(
                DurableStore.open(
                    root / f"level{j}",
                    dim=int(embedder.dim),
                    model_id=str(embedder.model_id),
                    fsync=fsync,
                    verify=verify,
                )
            )
    except BaseException:
        for ds in stores:
            ds.close()
        raise
    return tuple(stores)


def _deduped(
    out: Outcome, counters: Counters, stored_in: tuple[int, ...], reason: str | None
) -> tuple[Outcome, Counters]:
    """The outcome and counters of a request once near-duplicate suppression decided
    where its strategy is stored (``stored_in``; ``reason``: the last duplicate found)."""
    if stored_in == out.stored_in:
        return out, counters
    rejected = out.strategy_rejected
    newly_rejected = not stored_in and reason is not None and rejected is None
    if newly_rejected:
        rejected = reason
    counters = dataclasses.replace(
        counters,
        n_stored=1 if stored_in else 0,
        n_rejected_strategies=counters.n_rejected_strategies + int(newly_rejected),
    )
    return dataclasses.replace(out, stored_in=stored_in, strategy_rejected=rejected), counters


class Cascade:
    """Serve queries concurrently over one evolving :class:`CascadeState`.

    Parameters
    ----------
    levels, embedder, config:
        As for :func:`~intercascade_core.core.cascade.step`.
    calibrations / state:
        Exactly one: the thresholds of a fresh state, or a state to continue from.
    store:
        Optional directory for durability (see the module docstring); its repositories
        replace the (empty) ones of the initial state. ``fsync``/``verify`` are passed to
        :meth:`DurableStore.open`.
    checkpoint_every:
        Write a snapshot (and reset the journals) after this many commits (None: only on
        :meth:`checkpoint`, :meth:`close` and pruning).
    dedupe_distance, max_entries, eviction, evict_batch:
        Repository bounds (module docstring).
    """

    def __init__(
        self,
        levels: Sequence[Level],
        embedder: Embedder,
        *,
        calibrations: Sequence[Calibration] | None = None,
        state: CascadeState | None = None,
        config: CascadeConfig = CascadeConfig(),
        store: str | Path | None = None,
        fsync: Fsync = "always",
        verify: Verify = "full",
        checkpoint_every: int | None = None,
        dedupe_distance: float | None = None,
        max_entries: int | None = None,
        eviction: Policy = "least_used",
        evict_batch: int | None = None,
        on_outcome: Callable[[Outcome], object] | None = None,
    ) -> None:
        if on_outcome is not None and not callable(on_outcome):
            raise InvalidArgumentError(
                "on_outcome", f"must be callable, got {type(on_outcome).__name__}"
            )
        self._on_outcome = on_outcome
        if not isinstance(config, CascadeConfig):
            raise InvalidArgumentError(
                "config", f"expected a CascadeConfig, got {type(config).__name__}"
            )
        state = initial_state(state, calibrations, int(embedder.dim))
        if not isinstance(levels, Sequence):
            raise InvalidArgumentError(
                "levels", f"expected a sequence of Level records, got {type(levels).__name__}"
            )
        check_levels(state, levels)
        if eviction not in ("least_used", "oldest"):
            raise InvalidArgumentError(
                "eviction", f"must be 'least_used' or 'oldest', got {eviction!r}"
            )
        self._levels = tuple(levels)
        self._names = tuple(lv.name for lv in levels)
        self._embedder = embedder
        self._config = config
        self._dedupe = _optional_distance("dedupe_distance", dedupe_distance)
        self._max_entries = _optional_int("max_entries", max_entries, 1)
        self._evict_batch = _evict_batch(evict_batch, self._max_entries)
        self._eviction: Policy = eviction
        self._checkpoint_every = _optional_int("checkpoint_every", checkpoint_every, 1)

        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._failed: BaseException | None = None  # what stopped the service
        self._failure = ""  # ... in words
        self._epoch = 0  # bumped whenever rows are renumbered (pruning)
        self._reserved = 0  # sequence number of the last reservation
        self._published = 0  # ... and of the last publication (<= _reserved)
        self._writer: int | None = None  # the request writing its journal records now
        self._barriers = 0  # drains in progress: no new reservation meanwhile

        self._stores: tuple[DurableStore, ...] = ()
        uses = [np.zeros(len(r), np.int64) for r in state.repositories]
        if store is not None:
            if any(len(r) for r in state.repositories):
                raise InvalidArgumentError(
                    "state", "with store=, the repositories come from the store: pass empty ones"
                )
            self._stores = _open_stores(
                Path(store), len(state.repositories), embedder, fsync, verify
            )
            state = dataclasses.replace(
                state, repositories=tuple(ds.repository for ds in self._stores)
            )
            uses = [np.asarray(ds.uses) for ds in self._stores]
        self._uses = [_Uses(u) for u in uses]
        self._state = state  # published: what readers and new requests see
        self._tail = state  # reserved: the published state plus every reservation after it
        self._next_index = state.n_queries

    # -- reading -------------------------------------------------------------------------
    @property
    def state(self) -> CascadeState:
        """The published state value (immutable; later requests never change it)."""
        with self._cond:
            return self._state

    @property
    def config(self) -> CascadeConfig:
        """How the cascade uses strategies (every request's, but for its tenant)."""
        return self._config

    @property
    def names(self) -> tuple[str, ...]:
        """The levels' names, weakest first."""
        return self._names

    @property
    def repositories(self) -> tuple[Repository, ...]:
        return self.state.repositories

    @property
    def uses(self) -> tuple[npt.NDArray[np.int64], ...]:
        """Usage counters per repository (read-only copies, aligned with the rows)."""
        with self._cond:
            return tuple(u.view() for u in self._uses)

    # -- serving -------------------------------------------------------------------------
    def begin(self, query: Query, *, tenant: str | None = None) -> Ticket:
        """Start one query (step 1 of the module docstring): its machine over the
        published state, with the next outcome index. Drive ``ticket.machine`` to
        :class:`~.core.machine.Done`, then :meth:`finish` it."""
        _check_query(query)  # before an outcome index is taken
        if tenant is not None and (not isinstance(tenant, str) or not tenant):
            raise InvalidArgumentError(
                "tenant", f"must be a non-empty str or None ('default'), got {tenant!r:.40}"
            )
        cfg = self._config if tenant is None else dataclasses.replace(self._config, tenant=tenant)
        with self._cond:
            self._check_open("is closed")
            base, epoch, index = self._state, self._epoch, self._next_index
            self._next_index += 1
        machine = QueryMachine(base, query, self._names, cfg, index=index)
        return Ticket(machine, base, epoch, time.perf_counter())

    def finish(self, ticket: Ticket, done: Done) -> Outcome:
        """Commit a driven ticket (steps 3-5); thread-safe, blocking (it may wait for its
        turn and for the journal). ``latency_s`` is the time from :meth:`begin` to now.
        An :class:`Exception` from it means the query was not committed (module
        docstring, *Failures*)."""
        if not isinstance(ticket, Ticket):
            raise InvalidArgumentError(
                "ticket", f"expected a Ticket from begin(), got {type(ticket).__name__}"
            )
        if not isinstance(done, Done) or ticket.machine.next() is not done:
            raise InvalidArgumentError("done", "expected the Done record of this ticket's machine")
        latency = time.perf_counter() - ticket.started
        out = dataclasses.replace(self._commit(ticket.base, ticket.epoch, done), latency_s=latency)
        log_outcome(out)
        if self._on_outcome is not None:
            self._on_outcome(out)  # after the commit: its errors are the caller's, not ours
        return out

    def ask(self, query: Query, *, tenant: str | None = None) -> Outcome:
        """Run one query through the cascade and commit its effect; thread-safe. Returns
        once the effect is published (and journalled, with a store)."""
        ticket = self.begin(query, tenant=tenant)
        done = drive(ticket.machine, self._levels, self._embedder)
        return self.finish(ticket, done)

    async def aask(
        self,
        query: Query,
        *,
        tenant: str | None = None,
        perform: Callable[[Call], Awaitable[object]],
        executor: Executor | None = None,
        retrieve_off_loop: bool = False,
        retrieve_executor: Executor | None = None,
    ) -> Outcome:
        """:meth:`ask` for an event loop: ``await perform(request)`` carries out each of
        the machine's requests (an embedding row, or a level's
        :class:`~.core.protocols.Generation` or :class:`~intercascade_core.errors.ModelError`);
        the commit runs on ``executor`` (default: the loop's). With ``retrieve_off_loop``
        the embedding row is fed on ``retrieve_executor`` (default: ``executor``): the
        retrieval it triggers is a scan of the repository in C with the GIL released,
        which the loop need not wait out. (A pool of its own keeps retrievals from queueing
        behind commits that wait for their turn to write.) Cancelled before the commit,
        the query leaves no trace but its index; once the commit has started it completes
        even if the awaiting task is cancelled."""
        ticket = self.begin(query, tenant=tenant)
        loop = asyncio.get_running_loop()
        feed_on = executor if retrieve_executor is None else retrieve_executor
        while not isinstance(request := ticket.machine.next(), Done):
            result = await perform(request)
            if retrieve_off_loop and isinstance(request, Embed):
                await loop.run_in_executor(feed_on, ticket.machine.feed, result)
            else:
                ticket.machine.feed(result)
        return await asyncio.shield(loop.run_in_executor(executor, self.finish, ticket, request))

    def ask_many(
        self,
        queries: Sequence[Query],
        *,
        threads: int = 8,
        tenant: str | Sequence[str | None] | None = None,
    ) -> list[Outcome]:
        """:meth:`ask` every query from ``threads`` worker threads; outcomes in input
        order. ``tenant`` is one tenant for all or one per query. The arguments are
        checked before any query starts."""
        qs = list(queries)
        for q in qs:
            _check_query(q)
        tenants = _tenants(tenant, len(qs))
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidArgumentError("threads", f"must be an int >= 1, got {threads!r}")
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cascade") as pool:
            return list(
                pool.map(lambda qt: self.ask(qt[0], tenant=qt[1]), zip(qs, tenants, strict=True))
            )

    # -- the commit ----------------------------------------------------------------------
    def _commit(self, base: CascadeState, epoch: int, done: Done) -> Outcome:
        """Reserve, journal (outside the lock, on this request's turn) and publish.

        From the reservation to the publication any exit, an interrupt included, stops
        the service: an unpublished reservation would hold every later one back forever.
        """
        seq = 0  # this request's sequence number, once it is about to reserve
        try:
            with self._cond:
                self._cond.wait_for(
                    lambda: not self._barriers or self._closed or self._failed is not None
                )
                self._check_open("was closed while the query was in flight")
                if self._may_overflow(done):
                    with self._drained():
                        self._check_open("was closed while the query was in flight")
                        seq = self._reserved + 1
                        return self._commit_alone(base, epoch, done)
                seq = self._reserved + 1
                res, out = self._reserve(base, epoch, done)
                if not (self._stores and res.logs) and seq == self._published + 1:
                    self._publish(res)  # nothing to write and nothing before it: done
                    self._after_publish(seq, may_evict=False)
                    return out
                self._cond.wait_for(lambda: self._published == seq - 1 or self._failed is not None)
                if self._failed is not None:  # (not _closed: close() waits for us)
                    self._check_open("is closed")
                self._writer = seq  # our turn: nobody else writes until we publish
            self._write(res)
            with self._cond:
                self._writer = None
                self._publish(res)
                self._after_publish(seq, may_evict=False)
            return out
        except BaseException as exc:
            with self._cond:
                if self._writer == seq:
                    self._writer = None
                if self._published < seq <= self._reserved:  # reserved, never published
                    self._fail(exc, "a reserved commit was never published")
            raise

    def _commit_alone(self, base: CascadeState, epoch: int, done: Done) -> Outcome:
        """(Lock held, drained.) A commit that may trigger eviction, all under the lock."""
        res, out = self._reserve(base, epoch, done)
        self._write(res)
        self._publish(res)
        self._after_publish(res.seq, may_evict=True)
        return out

    def _may_overflow(self, done: Done) -> bool:
        """Whether this request's teachings could push a repository past the cap."""
        if self._max_entries is None:
            return False
        return any(
            len(repo) + sum(j in t.targets for t in done.teachings) > self._max_entries
            for j, repo in enumerate(self._tail.repositories)
        )

    def _reserve(self, base: CascadeState, epoch: int, done: Done) -> tuple[_Reservation, Outcome]:
        """(Lock held.) Append the request's teachings that are not near-duplicates to
        the tail, in place, and add its counters; nothing is visible to readers yet."""
        tail = self._tail
        repos = list(tail.repositories)
        logs: list[_Log] = []
        stored_in: list[int] = []
        reason: str | None = None
        for j, repo in enumerate(tail.repositories):
            kept, dup = self._kept(j, repo, done)
            reason = dup or reason
            rows = np.empty((0, repo.dim), np.float32)
            if kept:
                # the newest version of its arena: update appends in place, O(dim) per row
                repos[j] = update(repo, [e for e, _ in kept], np.stack([v for _, v in kept]))
                rows = repos[j].vectors[len(repo) :]  # as stored: replay is bit-exact
                stored_in.append(j)
            added = tuple(e for e, _ in kept)  # ids -1: replay numbers them by row
            used = self._used_rows(base, epoch, j, done.outcome)
            if added or used:
                logs.append(_Log(j, added, rows, used))
        out, mine = _deduped(done.outcome, done.counters, tuple(stored_in), reason)
        # the sequence number first: a reservation half made still stops the service
        self._reserved += 1
        self._tail = dataclasses.replace(
            tail, repositories=tuple(repos), counters=tail.counters + mine
        )
        return _Reservation(self._reserved, self._tail, tuple(logs)), out

    def _kept(
        self, j: int, repo: Repository, done: Done
    ) -> tuple[list[tuple[Entry, npt.NDArray[np.float32]]], str | None]:
        """The teachings for repository ``j`` that are stored (entry, vector), and why the
        last one that is not was dropped."""
        kept: list[tuple[Entry, npt.NDArray[np.float32]]] = []
        reason: str | None = None
        for t in done.teachings:
            if j not in t.targets:
                continue
            dup = self._duplicate(repo, t.entry, t.vector, kept)
            if dup is None:
                kept.append((t.entry, t.vector))
            else:
                row, dist = dup
                reason = (
                    f"near-duplicate of entry {row} in repository {j} "
                    f"(cosine distance {dist:.3g} <= {self._dedupe:g})"
                )
        return kept, reason

    def _used_rows(self, base: CascadeState, epoch: int, j: int, out: Outcome) -> tuple[int, ...]:
        """(Lock held.) The rows of repository ``j`` placed in the request's prompt, if
        they still carry the numbering it read (none after a pruning since)."""
        if epoch != self._epoch:
            return ()
        b_repo = base.repositories[j]
        return tuple(
            su.entry_id
            for su in out.strategies[j]
            if 0 <= su.entry_id < len(b_repo) and b_repo.entries[su.entry_id].id == su.entry_id
        )

    def _duplicate(
        self,
        repo: Repository,
        entry: Entry,
        vector: npt.NDArray[np.float32],
        kept: Sequence[tuple[Entry, npt.NDArray[np.float32]]],
    ) -> tuple[int, float] | None:
        """The row (and cosine distance) that ``entry`` near-duplicates among the tail's
        rows and the ones kept before it in this request, or None."""
        if self._dedupe is None:
            return None
        row = find_near_duplicate(repo, vector, entry.tenant, self._dedupe)
        if row is not None:
            return row, max(0.0, 1.0 - float(vector @ repo.vectors[row]))
        for i, (other, v) in enumerate(kept):
            sim = float(v @ vector)
            if other.tenant == entry.tenant and sim >= 1.0 - self._dedupe:
                return len(repo) + i, max(0.0, 1.0 - sim)
        return None

    def _write(self, res: _Reservation) -> None:
        """Journal the reservation (durable per the fsync policy when it returns)."""
        if self._stores:
            for lg in res.logs:
                self._stores[lg.level].log(lg.entries, lg.rows, lg.used)

    def _publish(self, res: _Reservation) -> None:
        """(Lock held, on the reservation's turn.) Make it the state; count its uses."""
        self._state = res.state
        for j, repo in enumerate(res.state.repositories):
            self._uses[j].resize(len(repo))
        for lg in res.logs:
            self._uses[lg.level].add(lg.used)
        self._published = res.seq
        self._cond.notify_all()

    def _after_publish(self, seq: int, *, may_evict: bool) -> None:
        """(Lock held, still commit ``seq``'s turn, so nothing is being written.) Evict
        past the cap (``may_evict``: drained) and take a due checkpoint.

        The commit is published and durable whatever happens here, so a failure is not
        raised as its error (a caller would retry it and store it twice): it stops the
        service and is logged; the next call raises :class:`ServiceClosedError` from it.
        An interrupt is re-raised.
        """
        what = f"a checkpoint failed after commit {seq}"
        try:
            pruned = self._evicted() if may_evict else None
            if pruned is not None:
                self._snapshot(*pruned, what=what)
            elif self._checkpoint_every is not None and seq % self._checkpoint_every == 0:
                self._snapshot(what=what)
        except BaseException as exc:
            self._fail(exc, what)
            log.error(
                "commit %d is durable, but the checkpoint after it failed; the service stopped: %r",
                seq,
                exc,
            )
            if not isinstance(exc, Exception):
                raise

    def _evicted(self) -> tuple[tuple[Repository, ...], list[_Uses]] | None:
        """(Lock held, drained.) Every repository past the cap pruned below it, with its
        usage counters, or None if none is past it; nothing is installed."""
        cap = self._max_entries
        if cap is None or all(len(r) <= cap for r in self._state.repositories):
            return None
        repos, uses = list(self._state.repositories), list(self._uses)
        for j, repo in enumerate(repos):
            if len(repo) > cap:
                pr = evict(
                    repo, cap - self._evict_batch, policy=self._eviction, uses=uses[j].view()
                )
                repos[j], uses[j] = pr.repository, _Uses(pr.uses)
        return tuple(repos), uses

    def _snapshot(
        self,
        repos: tuple[Repository, ...] | None = None,
        uses: list[_Uses] | None = None,
        *,
        what: str = "a checkpoint failed",
    ) -> None:
        """(Lock held, no journal record being written.) Checkpoint every store with the
        published repositories, or with ``repos``/``uses``, a pruned replacement of them,
        which becomes the state only once every store holds it: until then the journals
        go on numbering rows as on disk. A failure stops the service (module docstring)
        and is raised."""
        try:
            for j, ds in enumerate(self._stores):
                if repos is None or uses is None:
                    ds.checkpoint(self._state.repositories[j], self._uses[j].view())
                else:
                    ds.checkpoint(repos[j], uses[j].view())
        except BaseException as exc:
            self._fail(exc, what)
            raise
        if repos is not None and uses is not None:
            self._state = self._tail = dataclasses.replace(self._state, repositories=repos)
            self._uses = uses
            self._epoch += 1

    def _fail(self, exc: BaseException, what: str) -> None:
        """(Lock held.) Stop serving (module docstring, *Failures*); the first failure
        is the one reported."""
        if self._failed is None:
            self._failed, self._failure = exc, what
        self._cond.notify_all()

    def _check_open(self, closed: str) -> None:
        if self._failed is not None:
            raise ServiceClosedError(
                f"this Cascade stopped: {self._failure} ({self._failed!r}); every "
                "acknowledged commit is in the store: reopen it to continue"
            ) from self._failed
        if self._closed:
            raise ServiceClosedError(f"this Cascade {closed}")

    @contextmanager
    def _drained(self) -> Iterator[None]:
        """(Lock held.) Hold new reservations back and wait until every reserved request
        is published (or, once the service stopped, will never be) and no journal write
        is in progress, so the block runs while no record is being written and no
        reserved request refers to the current row numbering."""
        self._barriers += 1
        try:
            self._cond.wait_for(
                lambda: (
                    self._writer is None
                    and (self._published == self._reserved or self._failed is not None)
                )
            )
            yield
        finally:
            self._barriers -= 1
            self._cond.notify_all()

    @contextmanager
    def _maintenance(self) -> Iterator[None]:
        """Lock and drain a serving Cascade (:class:`ServiceClosedError` once closed or
        stopped, also when that happens during the drain)."""
        with self._cond:
            self._check_open("is closed")
            with self._drained():
                self._check_open("is closed")
                yield

    # -- maintenance ---------------------------------------------------------------------
    def replace_calibrations(self, calibrations: Sequence[Calibration]) -> CascadeState:
        """Serve with new thresholds from now on (a new calibration, or a level set to
        abstain after a risk alarm); returns the state published with them. Requests
        already in flight keep the thresholds they started with; repositories, counters
        and the journal are untouched (thresholds are not journalled: the caller keeps
        its calibration)."""
        cals = tuple(calibrations)
        if len(cals) != len(self._names) or not all(isinstance(c, Calibration) for c in cals):
            raise InvalidArgumentError(
                "calibrations",
                f"expected {len(self._names)} Calibration records, got {cals!r:.200}",
            )
        with self._maintenance():
            # drained: no reservation holds a tail without the new thresholds
            self._state = self._tail = dataclasses.replace(self._state, calibrations=cals)
            return self._state

    def checkpoint(self) -> None:
        """Snapshot every durable repository and reset its journal (no-op without a
        store). A failure is raised and stops the service."""
        with self._maintenance():
            self._snapshot()

    def prune(
        self, *, max_entries: int | None = None, dedupe_distance: float | None = None
    ) -> None:
        """Offline pruning of every repository now: near-duplicates first, then the cap.
        The pruned repositories replace the published ones once checkpointed; a failed
        checkpoint is raised and stops the service (the store then holds the rows
        before or after pruning)."""
        cap = _optional_int("max_entries", max_entries, 0)
        distance = _optional_distance("dedupe_distance", dedupe_distance)
        with self._maintenance():
            repos, uses = list(self._state.repositories), list(self._uses)
            for j, r in enumerate(repos):
                u = uses[j].view()
                if distance is not None:
                    pr = dedupe(r, distance, uses=u)
                    r, u = pr.repository, pr.uses
                if cap is not None:
                    pr = evict(r, cap, policy=self._eviction, uses=u)
                    r, u = pr.repository, pr.uses
                repos[j], uses[j] = r, _Uses(u)
            self._snapshot(tuple(repos), uses)

    def close(self, *, checkpoint: bool = True) -> None:
        """Stop serving: wait for the requests already committing, checkpoint (by
        default; not once the service stopped after a failure, when the journals already
        hold every acknowledged commit) and close the journals. Idempotent; a failed
        checkpoint is raised after the journals are closed."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            try:
                with self._drained():
                    if checkpoint and self._failed is None:
                        self._snapshot()
            finally:
                self._close_stores()

    def _close_stores(self) -> None:
        """Close every store (each releases its directory lock), even if one fails;
        the first failure is raised."""
        errors: list[Exception] = []
        for ds in self._stores:
            try:
                ds.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
