"""A thread-safe :class:`Cascade` shell over the pure core.

The decisions of one query belong to the sans-I/O
:class:`~intercascade_core.core.machine.QueryMachine`. :class:`Cascade` holds the current
:class:`~intercascade_core.core.cascade.CascadeState` value and serves concurrent
:meth:`Cascade.ask` calls:

1. under the lock: read the **published** state ``base`` and take the outcome index;
2. outside the lock: drive the machine over ``base``
   (:func:`~intercascade_core.core.cascade.drive`) — embedding, retrieval and all model
   calls run concurrently with other requests. It ends in a
   :class:`~intercascade_core.core.machine.Done` whose teachings are still pending;
3. under the lock: **reserve**. The pending teachings are appended to the newest
   repository versions (the *tail*, which includes every earlier reservation), in place:
   appending to the newest version of an arena writes past its end and never copies it.
   The counters become ``tail.counters + done.counters``, and the request gets the next
   sequence number;
4. outside the lock: write the request's journal records (with a ``store``);
5. under the lock: **publish**, in sequence order, and return.

Snapshot isolation: a request retrieves from the repositories as they were published when
it started (it does not see strategies committed while its model calls were in flight).

At reservation, before a strategy is stored, the shell also

* sanitises the entry (:func:`~intercascade_core.core.sanitize.sanitize_entry`);
* suppresses near-duplicates (``dedupe_distance``): an entry whose query embedding lies
  within that cosine distance of a stored or reserved entry of the **same tenant** is not
  stored; the returned :class:`~intercascade_core.core.cascade.Outcome` then has
  ``stored_in=()`` and ``strategy_rejected`` naming the duplicate;

and at publication it

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
  reservations and wait until every reserved request is published (*drain*);
* a commit that could push a repository past ``max_entries`` drains and then commits
  alone (journal under the lock: once per ``evict_batch`` commits), because eviction
  renumbers the rows that reserved requests' records refer to;
* if a journal write fails, the requests reserved after it sit on rows that will never
  be published and the lsn sequence cannot skip it: that :meth:`ask` raises the error,
  the ones waiting behind it and every later one raise :class:`ServiceClosedError`.
  Nothing acknowledged is lost.

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
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import numpy.typing as npt

from .core.cascade import CascadeConfig, CascadeState, Level, Outcome, drive, initial_state
from .core.machine import Call, Done, QueryMachine
from .core.prune import Policy, evict, find_near_duplicate
from .core.repository import Entry, Repository, update
from .core.sanitize import sanitize_entry
from .errors import InvalidArgumentError, ServiceClosedError
from .storage.journal import DurableStore, Fsync
from .storage.store import Verify

if TYPE_CHECKING:  # pragma: no cover
    from .core.calibrate import Calibration
    from .core.protocols import Embedder
    from .core.tasks import Query

__all__ = ["Cascade", "Ticket"]


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
        if rows:
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
    dedupe_distance, max_entries, eviction, evict_batch, sanitize:
        Repository bounds and untrusted-text handling (module docstring).
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
        sanitize: bool = True,
    ) -> None:
        state = initial_state(state, calibrations, int(embedder.dim))
        if len(levels) != state.n_levels:
            raise InvalidArgumentError(
                "levels", f"state has {state.n_levels} levels, got {len(levels)} models"
            )
        for lv in levels:
            if not isinstance(lv, Level):
                raise InvalidArgumentError(
                    "levels", f"expected Level records, got {type(lv).__name__}"
                )
        if dedupe_distance is not None and (
            isinstance(dedupe_distance, bool)
            or not isinstance(dedupe_distance, (int, float))
            or not 0.0 <= dedupe_distance <= 2.0
        ):
            raise InvalidArgumentError(
                "dedupe_distance",
                f"must be None or a cosine distance in [0, 2], got {dedupe_distance!r}",
            )
        if max_entries is not None and (
            isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1
        ):
            raise InvalidArgumentError(
                "max_entries", f"must be None or an int >= 1, got {max_entries!r}"
            )
        if eviction not in ("least_used", "oldest"):
            raise InvalidArgumentError(
                "eviction", f"must be 'least_used' or 'oldest', got {eviction!r}"
            )
        if evict_batch is None:
            evict_batch = 0 if max_entries is None else max(1, max_entries // 10)
        if (
            isinstance(evict_batch, bool)
            or not isinstance(evict_batch, int)
            or evict_batch < 0
            or (max_entries is not None and evict_batch >= max_entries)
        ):
            raise InvalidArgumentError(
                "evict_batch", f"must be an int in [0, max_entries), got {evict_batch!r}"
            )
        if checkpoint_every is not None and (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, int)
            or checkpoint_every < 1
        ):
            raise InvalidArgumentError(
                "checkpoint_every", f"must be None or an int >= 1, got {checkpoint_every!r}"
            )

        self._levels = tuple(levels)
        self._names = tuple(lv.name for lv in levels)
        self._embedder = embedder
        self._config = config
        self._dedupe = None if dedupe_distance is None else float(dedupe_distance)
        self._max_entries = max_entries
        self._eviction: Policy = eviction
        self._evict_batch = evict_batch
        self._sanitize = sanitize
        self._checkpoint_every = checkpoint_every
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._failed: BaseException | None = None  # a journal write that failed
        self._epoch = 0  # bumped whenever rows are renumbered (pruning)
        self._reserved = 0  # sequence number of the last reservation
        self._published = 0  # ... and of the last publication (<= _reserved)
        self._barriers = 0  # drains in progress: no new reservation meanwhile
        self._stores: tuple[DurableStore, ...] = ()
        uses: list[npt.NDArray[np.int64]] = [np.zeros(len(r), np.int64) for r in state.repositories]
        if store is not None:
            if any(len(r) for r in state.repositories):
                raise InvalidArgumentError(
                    "state", "with store=, the repositories come from the store: pass empty ones"
                )
            root = Path(store)
            stores = []
            repos = []
            try:
                for j in range(len(state.repositories)):
                    ds = DurableStore.open(
                        root / f"level{j}",
                        dim=int(embedder.dim),
                        model_id=str(embedder.model_id),
                        fsync=fsync,
                        verify=verify,
                    )
                    stores.append(ds)
                    repos.append(ds.repository)
                    uses[j] = np.asarray(ds.uses)
            except BaseException:
                for ds in stores:
                    ds.close()
                raise
            self._stores = tuple(stores)
            state = dataclasses.replace(state, repositories=tuple(repos))
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
        if tenant is not None and not isinstance(tenant, str):
            raise InvalidArgumentError(
                "tenant", f"must be a str or None, got {type(tenant).__name__}"
            )
        with self._cond:
            self._check_open("is closed")
            base, epoch = self._state, self._epoch
            index = self._next_index
            self._next_index += 1
        cfg = self._config if tenant is None else dataclasses.replace(self._config, tenant=tenant)
        machine = QueryMachine(base, query, self._names, cfg, index=index)
        return Ticket(machine, base, epoch, time.perf_counter())

    def finish(self, ticket: Ticket, done: Done) -> Outcome:
        """Commit a driven ticket (steps 3-5); thread-safe, blocking (it may wait for its
        turn and for the journal). ``latency_s`` is the time from :meth:`begin` to now."""
        if not isinstance(ticket, Ticket):
            raise InvalidArgumentError(
                "ticket", f"expected a Ticket from begin(), got {type(ticket).__name__}"
            )
        if not isinstance(done, Done) or ticket.machine.next() is not done:
            raise InvalidArgumentError("done", "expected the Done record of this ticket's machine")
        latency = time.perf_counter() - ticket.started
        out = self._commit(ticket.base, ticket.epoch, done)
        return dataclasses.replace(out, latency_s=latency)

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
    ) -> Outcome:
        """:meth:`ask` for an event loop: ``await perform(request)`` carries out each of
        the machine's requests (an embedding row, or a level's
        :class:`~.core.protocols.Generation` or :class:`~intercascade_core.errors.ModelError`);
        the commit runs on ``executor`` (default: the loop's). Cancelled before the
        commit, the query leaves no trace but its index; once the commit has started it
        completes even if the awaiting task is cancelled."""
        ticket = self.begin(query, tenant=tenant)
        while not isinstance(request := ticket.machine.next(), Done):
            ticket.machine.feed(await perform(request))
        loop = asyncio.get_running_loop()
        return await asyncio.shield(loop.run_in_executor(executor, self.finish, ticket, request))

    def ask_many(
        self,
        queries: Sequence[Query],
        *,
        threads: int = 8,
        tenant: str | Sequence[str | None] | None = None,
    ) -> list[Outcome]:
        """:meth:`ask` every query from ``threads`` worker threads; outcomes in input
        order. ``tenant`` is one tenant for all or one per query."""
        qs = list(queries)
        if isinstance(tenant, str) or tenant is None:
            tenants: list[str | None] = [tenant] * len(qs)
        else:
            tenants = list(tenant)
            if len(tenants) != len(qs):
                raise InvalidArgumentError(
                    "tenant", f"needs one tenant per query ({len(qs)}), got {len(tenants)}"
                )
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidArgumentError("threads", f"must be an int >= 1, got {threads!r}")
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cascade") as pool:
            return list(
                pool.map(lambda qt: self.ask(qt[0], tenant=qt[1]), zip(qs, tenants, strict=True))
            )

    # -- the commit ----------------------------------------------------------------------
    def _commit(self, base: CascadeState, epoch: int, done: Done) -> Outcome:
        """Reserve, journal (outside the lock, on this request's turn) and publish."""
        # sanitising is per entry and the slowest part: done before taking the lock
        entries = tuple(
            sanitize_entry(t.entry) if self._sanitize else t.entry for t in done.teachings
        )
        with self._cond:
            self._cond.wait_for(
                lambda: not self._barriers or self._closed or self._failed is not None
            )
            self._check_open("was closed while the query was in flight")
            if self._may_overflow(done):
                with self._drained():
                    self._check_open("was closed while the query was in flight")
                    return self._commit_alone(base, epoch, done, entries)
            res, out = self._reserve(base, epoch, done, entries)
            if not (self._stores and res.logs) and res.seq == self._published + 1:
                self._publish(res)  # nothing to write and nothing before it: done
                return out
            try:
                self._cond.wait_for(
                    lambda: self._published == res.seq - 1 or self._failed is not None
                )
            except BaseException as exc:  # (an interrupt): an unpublished reservation would
                self._fail(exc)  # hold every later one back forever, so stop instead
                raise
            if self._failed is not None:  # not _closed: close() waits for reserved requests
                self._check_open("is closed")
        try:  # our turn: no other request writes the journals until we publish
            self._write(res)
        except BaseException as exc:
            with self._cond:
                self._fail(exc)
            raise
        with self._cond:
            self._publish(res)
        return out

    def _commit_alone(
        self, base: CascadeState, epoch: int, done: Done, entries: tuple[Entry, ...]
    ) -> Outcome:
        """(Lock held, drained.) A commit that may trigger eviction, all under the lock."""
        res, out = self._reserve(base, epoch, done, entries)
        try:
            self._write(res)
        except BaseException as exc:
            self._fail(exc)
            raise
        self._publish(res, checkpoint=False)
        if self._evict() or self._checkpoint_due(res.seq):
            self._checkpoint_locked()
        return out

    def _may_overflow(self, done: Done) -> bool:
        """Whether this request's teachings could push a repository past the cap."""
        if self._max_entries is None:
            return False
        return any(
            len(repo) + sum(j in t.targets for t in done.teachings) > self._max_entries
            for j, repo in enumerate(self._tail.repositories)
        )

    def _reserve(
        self, base: CascadeState, epoch: int, done: Done, entries: tuple[Entry, ...]
    ) -> tuple[_Reservation, Outcome]:
        """(Lock held.) Append the request's teachings (``entries``: theirs, sanitised) to
        the tail, in place, and add its counters; nothing is visible to readers yet."""
        tail, out = self._tail, done.outcome
        repos = list(tail.repositories)
        logs: list[_Log] = []
        stored_in: list[int] = []
        dup_reason: str | None = None
        for j, repo in enumerate(tail.repositories):
            kept: list[tuple[Entry, npt.NDArray[np.float32]]] = []
            for t, entry in zip(done.teachings, entries, strict=True):
                if j not in t.targets:
                    continue
                dup = self._duplicate(repo, entry, t.vector, kept)
                if dup is None:
                    kept.append((entry, t.vector))
                else:
                    row, dist = dup
                    dup_reason = (
                        f"near-duplicate of entry {row} in repository {j} "
                        f"(cosine distance {dist:.3g} <= {self._dedupe:g})"
                    )
            added: tuple[Entry, ...] = ()
            rows = np.empty((0, repo.dim), np.float32)
            if kept:
                # the newest version of its arena: update appends in place, O(dim) per row
                repos[j] = update(repo, [e for e, _ in kept], np.stack([v for _, v in kept]))
                added = tuple(e for e, _ in kept)  # ids -1: replay numbers them by row
                rows = repos[j].vectors[len(repo) :]  # as stored: replay is bit-exact
                stored_in.append(j)
            used: list[int] = []
            if epoch == self._epoch:  # rows still numbered as in the version it read
                b_repo = base.repositories[j]
                for su in out.strategies[j]:
                    r = su.entry_id
                    if 0 <= r < len(b_repo) and b_repo.entries[r].id == r:
                        used.append(r)
            if added or used:
                logs.append(_Log(j, added, rows, tuple(used)))

        mine = done.counters
        story = tuple(stored_in)
        if story != out.stored_in:  # dedupe changed what was stored
            rejected = out.strategy_rejected
            extra_rejection = not story and dup_reason is not None and rejected is None
            if extra_rejection:
                rejected = dup_reason
            mine = dataclasses.replace(
                mine,
                n_stored=1 if story else 0,
                n_rejected_strategies=mine.n_rejected_strategies + extra_rejection,
            )
            out = dataclasses.replace(out, stored_in=story, strategy_rejected=rejected)
        self._reserved += 1
        self._tail = dataclasses.replace(
            tail, repositories=tuple(repos), counters=tail.counters + mine
        )
        return _Reservation(self._reserved, self._tail, tuple(logs)), out

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
            for log in res.logs:
                self._stores[log.level].log(log.entries, log.rows, log.used)

    def _publish(self, res: _Reservation, *, checkpoint: bool = True) -> None:
        """(Lock held, on the reservation's turn.) Make it the state; count its uses."""
        self._state = res.state
        for j, repo in enumerate(res.state.repositories):
            self._uses[j].resize(len(repo))
        for log in res.logs:
            self._uses[log.level].add(log.used)
        self._published = res.seq
        self._cond.notify_all()
        if checkpoint and self._checkpoint_due(res.seq):
            self._checkpoint_locked()  # still our turn: the lock is held until we return

    def _checkpoint_due(self, seq: int) -> bool:
        return bool(self._checkpoint_every) and seq % (self._checkpoint_every or 1) == 0

    def _evict(self) -> bool:
        """(Lock held, drained.) Prune every repository past the cap; True if any was."""
        if self._max_entries is None:
            return False
        repos = list(self._state.repositories)
        pruned = False
        for j, repo in enumerate(repos):
            if len(repo) > self._max_entries:
                pr = evict(
                    repo,
                    self._max_entries - self._evict_batch,
                    policy=self._eviction,
                    uses=self._uses[j].view(),
                )
                repos[j] = pr.repository
                self._uses[j] = _Uses(pr.uses)
                pruned = True
        if pruned:
            self._state = self._tail = dataclasses.replace(self._state, repositories=tuple(repos))
            self._epoch += 1
        return pruned

    def _fail(self, exc: BaseException) -> None:
        """(Lock held.) A reserved request cannot be published (its journal write
        failed): stop serving (module docstring)."""
        self._failed = exc
        self._cond.notify_all()

    def _check_open(self, closed: str) -> None:
        if self._failed is not None:
            raise ServiceClosedError(
                f"this Cascade stopped: a commit failed before it was journalled ({self._failed!r})"
            ) from self._failed
        if self._closed:
            raise ServiceClosedError(f"this Cascade {closed}")

    @contextmanager
    def _drained(self) -> Iterator[None]:
        """(Lock held.) Hold new reservations back and wait until every reserved request
        is published, so the block runs while no journal record is being written and no
        reserved request refers to the current row numbering."""
        self._barriers += 1
        try:
            self._cond.wait_for(
                lambda: self._published == self._reserved or self._failed is not None
            )
            yield
        finally:
            self._barriers -= 1
            self._cond.notify_all()

    # -- maintenance ---------------------------------------------------------------------
    def _checkpoint_locked(self) -> None:
        for j, ds in enumerate(self._stores):
            ds.checkpoint(self._state.repositories[j], self._uses[j].view())

    def replace_calibrations(self, calibrations: Sequence[Calibration]) -> CascadeState:
        """Serve with new thresholds from now on (a new calibration, or a level set to
        abstain after a risk alarm); returns the state published with them. Requests
        already in flight keep the thresholds they started with; repositories, counters
        and the journal are untouched (thresholds are not journalled: the caller keeps
        its calibration)."""
        from .core.calibrate import Calibration

        cals = tuple(calibrations)
        if len(cals) != len(self._names) or not all(isinstance(c, Calibration) for c in cals):
            raise InvalidArgumentError(
                "calibrations", f"expected {len(self._names)} Calibration records, got {cals!r:.200}"
            )
        with self._cond, self._drained():
            self._check_open("is closed")
            # drained: no reservation holds a tail without the new thresholds
            self._state = self._tail = dataclasses.replace(self._state, calibrations=cals)
            return self._state

    def checkpoint(self) -> None:
        """Snapshot every durable repository and reset its journal (no-op without a store)."""
        with self._cond, self._drained():
            self._checkpoint_locked()

    def prune(
        self, *, max_entries: int | None = None, dedupe_distance: float | None = None
    ) -> None:
        """Offline pruning of every repository now: near-duplicates first, then the cap."""
        from .core.prune import dedupe

        with self._cond, self._drained():
            repos = list(self._state.repositories)
            for j, r in enumerate(repos):
                u = self._uses[j].view()
                if dedupe_distance is not None:
                    pr = dedupe(r, dedupe_distance, uses=u)
                    r, u = pr.repository, pr.uses
                if max_entries is not None:
                    pr = evict(r, max_entries, policy=self._eviction, uses=u)
                    r, u = pr.repository, pr.uses
                repos[j] = r
                self._uses[j] = _Uses(u)
            self._state = self._tail = dataclasses.replace(self._state, repositories=tuple(repos))
            self._epoch += 1
            self._checkpoint_locked()

    def close(self, *, checkpoint: bool = True) -> None:
        """Stop serving: wait for the requests already committing, checkpoint (by
        default) and close the journals."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            try:
                with self._drained():
                    if checkpoint:
                        self._checkpoint_locked()
            finally:
                for ds in self._stores:
                    ds.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
