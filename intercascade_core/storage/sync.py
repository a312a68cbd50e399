"""Keep a deployment's local repository in sync with a shared :class:`PgVectorStore`.

A :class:`PgSync` holds the deployment's local in-memory
:class:`~intercascade_core.core.repository.Repository` (so exact/hnsw retrieval stays local
and fast) and

* **pulls** what other deployments wrote since its *watermark* (the largest server id
  it has seen) and applies it with :func:`~intercascade_core.core.repository.update`;
* sends its own **writes** to the server. A write is first appended to a local queue
  (``<state_dir>/queue.jsonl``, fsynced, when a ``state_dir`` is given) and then
  flushed; while the server is unreachable the write stays queued, the local copy
  already has it, and the cascade keeps answering. The next successful flush sends the
  whole queue in one transaction and only then empties it.

Nothing is lost: a write is durable in the queue before the server is tried, and
leaves it only after the server committed it. Nothing is duplicated: the server keeps
one row per (tenant, query, strategy) (``ON CONFLICT DO NOTHING`` on its hash), so a
queue re-sent after a crash between commit and truncation inserts nothing twice, and a
pull skips entries whose hash the local copy already holds (its own writes coming
back).

The watermark is saved in ``<state_dir>/state.json`` together with the length of the
local repository it belongs to. A deployment that restarts passes its saved
repository (e.g. from :mod:`.store`) and resumes from the watermark; when the lengths
do not match (or no repository is given) it pulls from 0 — harmless, thanks to the
hash dedupe, only slower.

While the server is down, contacts are not retried on every call: after a failure the
next attempt waits ``retry_interval`` seconds of ``clock`` (injectable, so tests are
deterministic); ``force=True`` tries at once.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..core.cascade import CascadeConfig, CascadeState, Level, Outcome, step
from ..core.protocols import Embedder
from ..core.repository import Entry, Repository, empty_repository, update
from ..core.tasks import Query
from ..errors import (
    InvalidArgumentError,
    QueueCorruptError,
    ServerUnavailableError,
)
from .pgvector import PgVectorStore, content_hash
from .store import atomic_write_bytes

__all__ = ["PgSync", "SyncStats"]

log = logging.getLogger(__name__)

_QUEUE = "queue.jsonl"
_STATE = "state.json"


@dataclass(frozen=True, slots=True)
class SyncStats:
    """Counters of one :class:`PgSync` (for logs and tests)."""
    pulled: int = 0  # entries applied to the local repo from the server
    skipped: int = 0  # pulled entries already held locally (own writes coming back)
    queued: int = 0  # local writes queued
    flushed: int = 0  # queued writes sent in a committed transaction
    inserted: int = 0  # of those, rows the server did not already have
    failures: int = 0  # contacts that found the server unavailable


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _encode(e: Entry, row: npt.NDArray[np.float32]) -> str:
    return json.dumps(
        {
            "tenant": e.tenant, "query": e.query, "answer": e.answer, "strategy": e.strategy,
            "source_level": e.source_level, "source_model": e.source_model,
            "created_at": e.created_at,
            "vector": base64.b64encode(np.asarray(row, "<f4").tobytes()).decode("ascii"),
        },
        ensure_ascii=False,
    )


def _decode(line: str, dim: int) -> tuple[Entry, npt.NDArray[np.float32]]:
    d = json.loads(line)
    vec = np.frombuffer(base64.b64decode(d["vector"]), dtype="<f4").astype(np.float32)
    if vec.shape != (dim,):
        raise ValueError(f"vector has {vec.shape[0]} components, expected {dim}")
    e = Entry(
        query=d["query"], answer=d["answer"], strategy=d["strategy"],
        source_level=int(d["source_level"]), source_model=d["source_model"],
        created_at=float(d["created_at"]), tenant=d["tenant"],
    )
    return e, vec


class PgSync:
    """A deployment's local repository, kept in sync with ``store`` (module doc).

    ``repo``: the local repository to start from (default: empty); ``state_dir``: where
    the queue and the watermark live (default: memory only — then a crash loses
    queued writes); ``tenant``: pull only this tenant's entries (default: all);
    ``batch``: rows per pull round trip.
    """
    def __init__(
        self,
        store: PgVectorStore,
        *,
        repo: Repository | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        tenant: str | None = None,
        batch: int = 10_000,
        retry_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(store, PgVectorStore):
            raise InvalidArgumentError("store", f"must be a PgVectorStore, got {type(store).__name__}")
        if repo is None:
            repo = empty_repository(store.dim)
        if not isinstance(repo, Repository):
            raise InvalidArgumentError("repo", f"must be a Repository or None, got {type(repo).__name__}")
        if repo.dim != store.dim:
            raise InvalidArgumentError("repo", f"has dim {repo.dim}, the store has dim {store.dim}")
        if tenant is not None and not isinstance(tenant, str):
            raise InvalidArgumentError("tenant", f"must be a str or None, got {type(tenant).__name__}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidArgumentError("batch", f"must be a positive int, got {batch!r}")
        if isinstance(retry_interval, bool) or not isinstance(retry_interval, (int, float)) or retry_interval < 0:
            raise InvalidArgumentError("retry_interval", f"must be >= 0 seconds, got {retry_interval!r}")
        self.store = store
        self.tenant = tenant
        self.batch = batch
        self.retry_interval = float(retry_interval)
        self._clock = clock
        self._repo = repo
        self._hashes: set[bytes] = {content_hash(e.tenant, e.query, e.strategy) for e in repo.entries}
        self._queue: list[tuple[Entry, npt.NDArray[np.float32]]] = []
        self._retry_at: float | None = None
        self.stats = SyncStats()
        self.watermark = 0
        self._dir: Path | None = None
        if state_dir is not None:
            self._dir = Path(state_dir)
            self._dir.mkdir(parents=True, exist_ok=True)
            self._load_state()
            self._load_queue()

    # -- properties
    @property
    def repo(self) -> Repository:
        """The current local repository (an immutable version)."""
        return self._repo

    @property
    def pending(self) -> int:
        """Writes queued and not yet committed by the server."""
        return len(self._queue)

    @property
    def online(self) -> bool:
        """False after a contact found the server unavailable, until one succeeds."""
        return self._retry_at is None

    # -- persistence
    def _load_state(self) -> None:
        assert self._dir is not None
        path = self._dir / _STATE
        if not path.exists():
            return
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            wm, n = int(d["watermark"]), int(d["local_len"])
            same = d.get("table") == self.store.table and d.get("tenant") == self.tenant
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable sync state %s (%s); pulling from 0", path, e)
            return
        if same and n == len(self._repo) and wm >= 0:
            self.watermark = wm
        else:
            log.info(
                "sync state %s is for %d local entries (table %r, tenant %r), this repository has %d;"
                " pulling from 0", path, n, d.get("table"), d.get("tenant"), len(self._repo),
            )

    def _save_state(self) -> None:
        if self._dir is None:
            return
        _atomic_write(
            self._dir / _STATE,
            json.dumps(
                {"watermark": self.watermark, "local_len": len(self._repo), "table": self.store.table,
                 "tenant": self.tenant}
            ),
        )

    def _load_queue(self) -> None:
        assert self._dir is not None
        path = self._dir / _QUEUE
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").split("\n")
        last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
        good: list[str] = []
        for i, ln in enumerate(lines):
            if not ln.strip():
                continue
            try:
                rec = _decode(ln, self.store.dim)
            except (ValueError, KeyError, TypeError) as e:
                if i == last:  # a torn append (crash mid-write): it was never acknowledged
                    log.warning("dropping a torn last record of %s (%s)", path, e)
                    continue
                raise QueueCorruptError(f"{path}:{i + 1}: damaged queue record ({e})") from e
            self._queue.append(rec)
            good.append(ln)
        if len(good) != sum(1 for ln in lines if ln.strip()):
            _atomic_write(path, "".join(g + "\n" for g in good))

    def _append_queue(self, recs: Sequence[tuple[Entry, npt.NDArray[np.float32]]]) -> None:
        self._queue.extend(recs)
        if self._dir is None:
            return
        path = self._dir / _QUEUE
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(_encode(e, v) + "\n" for e, v in recs))
            f.flush()
            os.fsync(f.fileno())

    def _clear_queue(self, n: int) -> None:
        rest = self._queue[n:]
        self._queue = rest
        if self._dir is None:
            return
        _atomic_write(self._dir / _QUEUE, "".join(_encode(e, v) + "\n" for e, v in rest))

    # -- contact gating
    def _may_try(self, force: bool) -> bool:
        return force or self._retry_at is None or self._clock() >= self._retry_at

    def _failed(self, e: ServerUnavailableError) -> None:
        if self._retry_at is None:
            log.warning("shared repository unavailable, working from the local copy: %s", e)
        self._retry_at = self._clock() + self.retry_interval
        self.stats = replace(self.stats, failures=self.stats.failures + 1)

    def _ok(self) -> None:
        if self._retry_at is not None:
            log.info("shared repository reachable again")
        self._retry_at = None

    # -- writes
    def record(self, repo: Repository) -> int:
        """Adopt ``repo`` — the local repository extended by the caller (e.g. by a
        cascade step) — and queue its new entries for the server. ``repo`` must be
        :attr:`repo` itself or built from it by :func:`update`; an empty repository
        (a fresh cascade state) is ignored. Returns the number of entries queued."""
        if not isinstance(repo, Repository):
            raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
        cur = self._repo
        if repo is cur or len(repo) == 0:
            return 0
        n0 = len(cur)
        if len(repo) < n0 or (n0 and repo.entries[n0 - 1] is not cur.entries[n0 - 1]):
            raise InvalidArgumentError(
                "repo", "is not an extension of this syncer's repository (build it from sync.repo with update)"
            )
        new = list(repo.entries[n0:])
        vecs = repo.vectors[n0:]
        self._repo = repo
        recs = []
        for e, v in zip(new, vecs, strict=True):
            h = content_hash(e.tenant, e.query, e.strategy)
            if h in self._hashes:
                continue  # already held (and therefore already on the server or queued)
            self._hashes.add(h)
            recs.append((e, np.array(v, dtype=np.float32)))
        if recs:
            self._append_queue(recs)
            self.stats = replace(self.stats, queued=self.stats.queued + len(recs))
        self._save_state()
        self.flush()
        return len(recs)

    def push(self, entries: Sequence[Entry], vectors: npt.NDArray[np.float32]) -> Repository:
        """Add ``entries`` to the local repository (skipping ones it already holds),
        queue them for the server and try to flush. Returns the new local repository."""
        if isinstance(entries, (str, bytes, Entry)) or not isinstance(entries, Sequence):
            raise InvalidArgumentError("entries", "must be a sequence of Entry")
        vectors = np.asarray(vectors) if not isinstance(vectors, np.ndarray) else vectors
        if vectors.ndim == 1 and len(entries) == 1:
            vectors = vectors.reshape(1, -1)
        keep, seen = [], set()
        for j, e in enumerate(entries):
            if not isinstance(e, Entry):
                raise InvalidArgumentError("entries", f"must contain Entry objects, got {type(e).__name__}")
            h = content_hash(e.tenant, e.query, e.strategy)
            if h not in self._hashes and h not in seen:
                seen.add(h)
                keep.append(j)
        if vectors.ndim != 2 or vectors.shape[0] != len(entries):
            raise InvalidArgumentError("vectors", f"must have one row per entry, got shape {vectors.shape}")
        if keep:
            self.record(update(self._repo, [entries[j] for j in keep], vectors[keep]))
        else:
            self.flush()
        return self._repo

    def flush(self, *, force: bool = False) -> int:
        """Send the queued writes in one transaction; on success empty the queue.
        Returns the number of writes flushed (0 when the server is unavailable)."""
        if not self._queue or not self._may_try(force):
            return 0
        recs = list(self._queue)
        try:
            inserted = self.store.push([e for e, _ in recs], np.stack([v for _, v in recs]))
        except ServerUnavailableError as e:
            self._failed(e)
            return 0
        self._ok()
        self._clear_queue(len(recs))
        self.stats = replace(
            self.stats, flushed=self.stats.flushed + len(recs), inserted=self.stats.inserted + inserted
        )
        return len(recs)

    # -- reads
    def pull(self, *, force: bool = False) -> int:
        """Apply the server's entries with ids above the watermark to the local
        repository. Returns the number of entries added (0 when unavailable)."""
        if not self._may_try(force):
            return 0
        added = skipped = 0
        wm = self.watermark
        repo = self._repo
        try:
            while True:
                got = self.store.pull_since(wm, tenant=self.tenant, limit=self.batch)
                keep = []
                for j, e in enumerate(got.entries):
                    h = content_hash(e.tenant, e.query, e.strategy)
                    if h in self._hashes:
                        skipped += 1
                        continue
                    self._hashes.add(h)
                    keep.append(j)
                if keep:
                    repo = update(repo, [got.entries[j] for j in keep], got.vectors[keep])
                    added += len(keep)
                wm = got.watermark
                if got.complete:
                    break
        except ServerUnavailableError as e:
            self._failed(e)
            if repo is self._repo:
                return 0
        else:
            self._ok()
        changed = wm != self.watermark or repo is not self._repo
        self._repo, self.watermark = repo, wm  # keep what a cut-off pull already applied
        self.stats = replace(self.stats, pulled=self.stats.pulled + added, skipped=self.stats.skipped + skipped)
        if changed:
            self._save_state()
        return added

    def sync(self, *, force: bool = False) -> tuple[int, int]:
        """:meth:`flush` then :meth:`pull`; returns ``(flushed, pulled)``."""
        return self.flush(force=force), self.pull(force=force)

    # -- the cascade
    def step(
        self,
        state: CascadeState,
        query: Query,
        levels: Sequence[Level],
        embedder: Embedder,
        config: CascadeConfig | None = None,
        *,
        level: int = 0,
        pull: bool = True,
    ) -> tuple[CascadeState, Outcome]:
        """One :func:`~intercascade_core.core.cascade.step` with ``state.repositories[level]``
        served from (and written back to) this syncer: pull first (``pull=True``), run
        the step on the local copy, queue/flush what it taught."""
        if config is None:
            config = CascadeConfig()
        repos = list(state.repositories)
        if not 0 <= level < len(repos):
            raise InvalidArgumentError("level", f"must index one of the {len(repos)} repositories, got {level}")
        self.record(repos[level])
        if pull:
            self.pull()
        repos[level] = self._repo
        new_state, outcome = step(replace(state, repositories=tuple(repos)), query, levels, embedder, config)
        self.record(new_state.repositories[level])
        return new_state, outcome

    def __repr__(self) -> str:
        return (
            f"PgSync({self.store!r}, local={len(self._repo)}, watermark={self.watermark}, "
            f"pending={self.pending}, online={self.online})"
        )
