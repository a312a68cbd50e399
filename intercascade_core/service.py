"""A thread-safe :class:`Cascade` shell over the pure core.

:func:`~intercascade_core.core.cascade.step` is a pure function of a
:class:`~intercascade_core.core.cascade.CascadeState` value. :class:`Cascade` holds the current
value and serves concurrent :meth:`Cascade.ask` calls:

1. under the lock: read the current state ``base`` and take a ticket (the outcome index);
2. outside the lock: ``step(base, query, ...)`` — embedding, retrieval and all model calls
   run concurrently with other requests;
3. under the lock: **commit**. If the state is still ``base`` the step's result is
   published as is (compare-and-swap succeeded). Otherwise another request committed
   meanwhile, and this one is *rebased*: the entries its step added (the rows past
   ``base``'s repositories) are appended to the *current* repositories and its counter
   deltas are added to the current counters. Nothing is lost, nothing is applied twice.

Snapshot isolation: a request retrieves from the repositories as they were when it
started (it does not see strategies committed while its model calls were in flight).

At commit, before a strategy is published, the shell also

* sanitises the entry (:func:`~intercascade_core.core.sanitize.sanitize_entry`);
* suppresses near-duplicates (``dedupe_distance``): an entry whose query embedding lies
  within that cosine distance of a stored entry of the **same tenant** is not stored; the
  returned :class:`~intercascade_core.core.cascade.Outcome` then has ``stored_in=()`` and
  ``strategy_rejected`` naming the duplicate;
* counts usage: each entry placed in the request's prompt gets one use (an int64 counter
  per row, :attr:`Cascade.uses`), the input of least-used eviction;
* enforces the cap (``max_entries``): when a repository grows past it, it is pruned to
  ``max_entries - evict_batch`` rows (:func:`~intercascade_core.core.prune.evict`; rows are
  renumbered and a durable store is checkpointed);
* journals the change when a ``store`` directory is given (:mod:`.journal`, one
  :class:`~intercascade_core.storage.journal.DurableStore` per taught level in
  ``<store>/level<i>``) *before* publishing it, so a SIGKILL loses at most the requests
  in flight.

Per-request tenants: ``ask(query, tenant="a")`` retrieves only tenant ``a``'s strategies
and stores the new strategy under ``a``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import numpy.typing as npt

from .core.cascade import CascadeConfig, CascadeState, Level, Outcome, init_state, step
from .core.prune import Policy, evict, find_near_duplicate
from .core.repository import Entry, Repository, append_exact
from .core.sanitize import sanitize_entry
from .errors import IntercascadeError, InvalidArgumentError, ServiceClosedError
from .storage.journal import DurableStore, Fsync
from .storage.store import Verify

if TYPE_CHECKING:  # pragma: no cover
    from .core.calibrate import Calibration
    from .core.protocols import Embedder
    from .core.tasks import Query

__all__ = ["Cascade"]


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
        config: CascadeConfig = CascadeConfig(),  # noqa: B008 - frozen, as in cascade.step
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
        if (state is None) == (calibrations is None):
            raise InvalidArgumentError("state", "pass exactly one of state= or calibrations=")
        if state is None:
            assert calibrations is not None
            state = init_state(calibrations, int(embedder.dim))
        if not isinstance(state, CascadeState):
            raise InvalidArgumentError(
                "state", f"expected a CascadeState, got {type(state).__name__}"
            )
        if len(levels) != state.n_levels:
            raise InvalidArgumentError(
                "levels", f"state has {state.n_levels} levels, got {len(levels)} models"
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
        self._embedder = embedder
        self._config = config
        self._dedupe = None if dedupe_distance is None else float(dedupe_distance)
        self._max_entries = max_entries
        self._eviction: Policy = eviction
        self._evict_batch = evict_batch
        self._sanitize = sanitize
        self._checkpoint_every = checkpoint_every
        self._lock = threading.Lock()
        self._closed = False
        self._epoch = 0  # bumped whenever rows are renumbered (pruning)
        self._commits = 0
        self._stores: tuple[DurableStore, ...] = ()
        uses: list[np.ndarray] = [np.zeros(len(r), np.int64) for r in state.repositories]
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
        self._state = state
        self._next_index = state.n_queries

    # -- reading -------------------------------------------------------------------------
    @property
    def state(self) -> CascadeState:
        """The current state value (immutable; later requests never change it)."""
        with self._lock:
            return self._state

    @property
    def repositories(self) -> tuple[Repository, ...]:
        return self.state.repositories

    @property
    def uses(self) -> tuple[npt.NDArray[np.int64], ...]:
        """Usage counters per repository (read-only copies, aligned with the rows)."""
        with self._lock:
            return tuple(u.view() for u in self._uses)

    # -- serving -------------------------------------------------------------------------
    def ask(self, query: Query, *, tenant: str | None = None) -> Outcome:
        """Run one query through the cascade and commit its effect; thread-safe."""
        if tenant is not None and not isinstance(tenant, str):
            raise InvalidArgumentError(
                "tenant", f"must be a str or None, got {type(tenant).__name__}"
            )
        with self._lock:
            if self._closed:
                raise ServiceClosedError("this Cascade is closed")
            base, epoch = self._state, self._epoch
            index = self._next_index
            self._next_index += 1
        cfg = self._config if tenant is None else dataclasses.replace(self._config, tenant=tenant)
        new, outcome = step(base, query, self._levels, self._embedder, cfg, index=index)
        with self._lock:
            if self._closed:
                raise ServiceClosedError("this Cascade was closed while the query was in flight")
            return self._commit(base, epoch, new, outcome)

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

    # -- the commit (under the lock) -----------------------------------------------------
    def _commit(self, base: CascadeState, epoch: int, new: CascadeState, out: Outcome) -> Outcome:
        cur = self._state
        fast = cur is base
        repos = list(cur.repositories)
        logs: list[tuple[int, list[Entry], np.ndarray, list[int]]] = []
        stored_in: list[int] = []
        dup_reason: str | None = None
        for j, (b_repo, s_repo, c_repo) in enumerate(
            zip(base.repositories, new.repositories, cur.repositories, strict=True)
        ):
            a, z = len(b_repo), len(s_repo)
            added = list(s_repo.entries[a:z]) if z > a else []
            vecs = np.asarray(s_repo.vectors[a:z])
            changed = False
            if self._sanitize and added:
                clean = [sanitize_entry(e) for e in added]
                changed = any(c is not e for c, e in zip(clean, added, strict=True))
                added = clean
            keep: list[int] = []
            for i, e in enumerate(added):
                dup = None
                if self._dedupe is not None:
                    dup = find_near_duplicate(c_repo, vecs[i], e.tenant, self._dedupe)
                    if dup is None:
                        for k in keep:
                            if (
                                added[k].tenant == e.tenant
                                and float(vecs[k] @ vecs[i]) >= 1.0 - self._dedupe
                            ):
                                dup = len(c_repo) + keep.index(k)
                                break
                if dup is None:
                    keep.append(i)
                else:
                    d = (
                        1.0 - float(np.dot(vecs[i], c_repo.vectors[dup]))
                        if dup < len(c_repo)
                        else 0.0
                    )
                    dup_reason = (
                        f"near-duplicate of entry {dup} in repository {j} "
                        f"(cosine distance {max(d, 0.0):.3g} <= {self._dedupe:g})"
                    )
            if keep:
                kept = [dataclasses.replace(added[i], id=-1) for i in keep]
                kvec = np.ascontiguousarray(vecs[keep])
                if fast and not changed and len(keep) == len(added):
                    repos[j] = s_repo
                else:  # rows already normalised by step's update: store them bit-exactly
                    repos[j] = append_exact(c_repo, kept, kvec)
                stored_in.append(j)
            else:
                kept, kvec = [], np.empty((0, c_repo.dim), np.float32)
            used: list[int] = []
            if epoch == self._epoch and j < len(out.strategies):
                for su in out.strategies[j]:
                    r = su.entry_id
                    if 0 <= r < len(b_repo) and b_repo.entries[r].id == r:
                        used.append(r)
            if kept or used:
                logs.append((j, kept, kvec, used))

        # durability first: journal every change, then publish it
        for j, kept, kvec, used in logs:
            if self._stores:
                self._stores[j].log(kept, kvec, used)
        for j, _kept, _kvec, used in logs:
            self._uses[j].resize(len(repos[j]))
            self._uses[j].add(used)
        for j in range(len(repos)):
            self._uses[j].resize(len(repos[j]))

        pruned = False
        if self._max_entries is not None:
            for j, rj in enumerate(repos):
                if len(rj) > self._max_entries:
                    pr = evict(
                        rj,
                        self._max_entries - self._evict_batch,
                        policy=self._eviction,
                        uses=self._uses[j].view(),
                    )
                    repos[j] = pr.repository
                    self._uses[j] = _Uses(pr.uses)
                    pruned = True

        # the request's own effect on the counters, rebased onto the current ones
        mine = new.counters - base.counters
        story = tuple(stored_in)
        if story != out.stored_in:  # dedupe or sanitising changed what was stored
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
        self._state = dataclasses.replace(
            cur, repositories=tuple(repos), counters=cur.counters + mine
        )
        self._commits += 1
        if pruned:
            self._epoch += 1
            self._checkpoint_locked()
        elif self._checkpoint_every and self._commits % self._checkpoint_every == 0:
            self._checkpoint_locked()
        return out

    # -- maintenance ---------------------------------------------------------------------
    def _checkpoint_locked(self) -> None:
        for j, ds in enumerate(self._stores):
            ds.checkpoint(self._state.repositories[j], self._uses[j].view())

    def checkpoint(self) -> None:
        """Snapshot every durable repository and reset its journal (no-op without a store)."""
        with self._lock:
            self._checkpoint_locked()

    def prune(
        self, *, max_entries: int | None = None, dedupe_distance: float | None = None
    ) -> None:
        """Offline pruning of every repository now: near-duplicates first, then the cap."""
        from .core.prune import dedupe

        with self._lock:
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
            self._state = dataclasses.replace(self._state, repositories=tuple(repos))
            self._epoch += 1
            self._checkpoint_locked()

    def close(self, *, checkpoint: bool = True) -> None:
        """Stop serving; checkpoint (by default) and close the journals."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if checkpoint:
                    self._checkpoint_locked()
            finally:
                for ds in self._stores:
                    ds.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
