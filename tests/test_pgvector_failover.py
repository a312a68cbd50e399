"""The server is killed mid-run: the cascade keeps answering from its local copy, queues
what it learns, and flushes it when the server is back — nothing lost, nothing
duplicated (real PostgreSQL via pgserver; skipped when it cannot be imported)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

try:
    import psycopg
    import psycopg_pool  # noqa: F401
    from _pg_worker import import_pgserver

    import_pgserver()
except ImportError as _e:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"PostgreSQL tests need psycopg[binary], psycopg-pool and pgserver ({_e})",
        allow_module_level=True,
    )

from _pg_worker import data_dir, restart_server, shutdown, start_server, stop_server

from intercascade_core.core.calibrate import Calibration
from intercascade_core.core.cascade import CascadeConfig, Level, init_state, run_stream
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import SimBackend, templated_math_stream
from intercascade_core.storage.pgvector import PgVectorStore, content_hash
from intercascade_core.storage.sync import PgSync

DIM = 384
EMB = HashingEmbedder(dim=DIM)


def cal(threshold: float) -> Calibration:
    return Calibration(threshold=threshold, alpha=0.2, delta=0.1, n_calibration=0, n_accepted=0,
                       n_errors=0, risk_bound=1.0, grid_rule="fixed (test)", min_n=0,
                       abstained=False, guaranteed=False, on_fail="jung", n_tested=0)


CALS = (cal(0.85), cal(0.5))


@pytest.fixture()
def levels() -> Iterator[list[Level]]:
    client = httpx.Client(transport=SimBackend(seed=1).transport())
    yield [Level(ChatModel("http://sim/v1", n, client=client, sleep=lambda s: None))
           for n in ("sim-weak", "sim-strong")]
    client.close()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Any]:
    srv = start_server(data_dir(tmp_path))
    yield srv
    shutdown(srv)


def decisions(outs: Any) -> list[tuple[Any, ...]]:
    return [(o.status, o.level, o.answer, o.confidences, o.stored_in,
             tuple(tuple(u.entry_id for u in s) for s in o.strategies)) for o in outs]


def test_server_killed_mid_run(server: Any, levels: list[Level], tmp_path: Path) -> None:
    stream = templated_math_stream(90, n_templates=6, seed=5)
    config = CascadeConfig(k=2, backend="exact")
    # the reference: the same stream with a purely local repository
    ref = run_stream(stream, levels, EMB, calibrations=CALS, config=config, progress=False)

    url = str(server.get_uri())
    now = [0.0]
    store = PgVectorStore.connect(url, DIM, timeout=0.5, connect_timeout=1)
    try:
        sync = PgSync(store, state_dir=tmp_path / "dep", retry_interval=30.0, clock=lambda: now[0])
        state = init_state(CALS, DIM)
        outs = []
        for q in stream[:30]:  # server up
            state, o = sync.step(state, q, levels, EMB, config)
            outs.append(o)
        assert sync.online and sync.pending == 0
        stored_up = store.count()
        assert stored_up == len(sync.repo) > 0

        stop_server(server)  # killed: no clean shutdown
        for q in stream[30:60]:  # the cascade keeps answering from the local copy
            state, o = sync.step(state, q, levels, EMB, config)
            outs.append(o)
        assert not sync.online
        queued = len(sync.repo) - stored_up
        assert queued > 0 and sync.pending == queued  # what it learnt is queued...
        assert sum(1 for ln in (tmp_path / "dep" / "queue.jsonl").read_text().splitlines() if ln) == queued
        assert any(o.strategies[0] for o in outs[30:60])  # ...and already used locally

        restart_server(server)
        for q in stream[60:]:
            now[0] += 30.0  # each step may retry: the first one that reaches the server flushes
            state, o = sync.step(state, q, levels, EMB, config)
            outs.append(o)
        for _ in range(100):  # wait for the pool to reconnect, if it has not yet (no timing assert)
            if sync.pending == 0:
                break
            sync.sync(force=True)
        assert sync.online and sync.pending == 0

        # every query got an outcome, exactly as with a purely local repository
        assert decisions(outs) == decisions(ref.outcomes)
        assert [e.query for e in sync.repo.entries] == [e.query for e in ref.state.repositories[0].entries]
        # nothing lost, nothing duplicated on the server
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT content_hash, count(*) FROM intercascade_strategies GROUP BY 1"
            ).fetchall()
        local = {content_hash(e.tenant, e.query, e.strategy) for e in sync.repo.entries}
        assert {bytes(r[0]) for r in rows} == local and all(r[1] == 1 for r in rows)
        assert len(local) == len(sync.repo) == ref.state.n_stored
        # another deployment gets all of it, vectors included
        other = PgSync(store)
        assert other.pull() == len(sync.repo)
        order = np.argsort([e.query for e in other.repo.entries])
        mine = np.argsort([e.query for e in sync.repo.entries])
        np.testing.assert_array_equal(other.repo.vectors[order], sync.repo.vectors[mine])
    finally:
        store.close()
