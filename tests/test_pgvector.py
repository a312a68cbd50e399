"""The PostgreSQL + pgvector shared repository, against a real server (pgserver).

Skipped (with the reason) when psycopg, psycopg-pool or pgserver cannot be imported;
when they can, a server that fails to start fails the tests. See tests/_pg_worker.py
for how pgserver runs as root.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

from _pg_worker import data_dir, shutdown, start_server

from intercascade_core.core.protocols import SearchBackend
from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.core.retrieve import retrieve
from intercascade_core.errors import (
    InvalidArgumentError,
    PgVectorMissingError,
    SchemaError,
    ServerUnavailableError,
)
from intercascade_core.storage import pgvector as pgs
from intercascade_core.storage.pgvector import PgVectorStore, content_hash
from intercascade_core.storage.sync import PgSync

DIM = 384
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    srv = start_server(data_dir(tmp_path_factory.mktemp("pg")))
    yield srv
    shutdown(srv)


@pytest.fixture()
def url(server: Any) -> str:
    return str(server.get_uri())


@pytest.fixture()
def table() -> str:
    return "t_" + uuid.uuid4().hex[:12]


@pytest.fixture()
def store(url: str, table: str) -> Iterator[PgVectorStore]:
    with PgVectorStore.connect(url, DIM, table=table) as s:
        yield s


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def renorm(v: np.ndarray) -> np.ndarray:
    """What update()/push() store for a unit row (renormalised in float32)."""
    norms = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64))
    return (v / norms[:, None]).astype(np.float32)


def entries(n: int, prefix: str = "q", tenant: str = "default") -> list[Entry]:
    return [
        Entry(f"{prefix}{i}", f"ans {i}", f"strategy {prefix}{i} ✓", source_level=1,
              source_model="strong", created_at=1000.25 + i, tenant=tenant)
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- basics
def test_round_trip(store: PgVectorStore) -> None:
    rng = np.random.default_rng(1)
    es, vs = entries(25), unit_rows(rng, 25)
    assert store.push(es, vs) == 25
    got = store.pull_since(0)
    assert [(*_fields(e),) for e in got.entries] == [(*_fields(e),) for e in es]
    assert [e.id for e in got.entries] == sorted(e.id for e in got.entries)
    assert got.watermark == got.entries[-1].id
    np.testing.assert_array_equal(got.vectors, renorm(vs))  # float4 on the wire: bit-exact
    assert got.vectors.dtype == np.float32
    # unpacks as (entries, vectors, watermark); nothing new past the watermark
    es2, vs2, wm2 = store.pull_since(got.watermark)
    assert es2 == () and vs2.shape == (0, DIM) and wm2 == got.watermark
    # the same strategies again: nothing stored twice
    assert store.push(es, vs) == 0
    assert store.count() == 25
    # limit pages through in id order
    p1 = store.pull_since(0, limit=10)
    assert len(p1.entries) == 10 and not p1.complete
    p2 = store.pull_since(p1.watermark, limit=100)
    assert p2.complete and [e.id for e in p1.entries + p2.entries] == [e.id for e in got.entries]
    assert store.fetch([got.entries[3].id])[got.entries[3].id] == got.entries[3]


def _fields(e: Entry) -> tuple[Any, ...]:
    return (e.query, e.answer, e.strategy, e.source_level, e.source_model, e.created_at, e.tenant)


def test_schema_migrations_and_dimension(url: str, table: str) -> None:
    with PgVectorStore.connect(url, DIM, table=table) as a:
        assert a.schema_version() == pgs.SCHEMA_VERSION
    with PgVectorStore.connect(url, DIM, table=table) as b:  # idempotent on reconnect
        assert b.schema_version() == pgs.SCHEMA_VERSION
        with psycopg.connect(url) as conn:
            rows = conn.execute(f"SELECT version FROM {table}_migrations ORDER BY version").fetchall()
            assert [r[0] for r in rows] == list(range(1, pgs.SCHEMA_VERSION + 1))
            idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (table,)).fetchall()
            assert any("hnsw" in r[0] and "vector_cosine_ops" in r[0] for r in idx)
            # a schema from the future is refused
            conn.execute(f"INSERT INTO {table}_migrations (version, description) VALUES (99, 'future')")
    with pytest.raises(SchemaError, match="99"):
        PgVectorStore.connect(url, DIM, table=table)
    with psycopg.connect(url) as conn:
        conn.execute(f"DELETE FROM {table}_migrations WHERE version = 99")
    with pytest.raises(SchemaError, match=r"vector\(384\).*dim=8"):
        PgVectorStore.connect(url, 8, table=table)


def test_index_build_options_are_validated_as_the_server_does(url: str, table: str) -> None:
    """The ranges refused here are the ones pgvector refuses (checked on the server)."""
    bad = [
        ({"index_m": 1}, "index_m"), ({"index_m": 101, "index_ef_construction": 202}, "index_m"),
        ({"index_m": True}, "index_m"), ({"index_m": 16.0}, "index_m"), ({"index_m": "16"}, "index_m"),
        ({"index_m": 16, "index_ef_construction": 31}, "index_ef_construction"),
        ({"index_m": 2, "index_ef_construction": 3}, "index_ef_construction"),
        ({"index_ef_construction": 1001}, "index_ef_construction"),
        ({"index_ef_construction": 64.0}, "index_ef_construction"),
    ]
    for kwargs, argument in bad:
        with pytest.raises(InvalidArgumentError) as info:
            PgVectorStore(url, DIM, table=table, ensure=False, **kwargs)  # type: ignore[arg-type]
        assert info.value.argument == argument, kwargs
    for m, efc in ((2, 4), (100, 1000)):  # the extremes build (and the extension exists)
        with PgVectorStore.connect(url, DIM, table=f"{table}_{m}", index_m=m, index_ef_construction=efc) as s:
            assert s.ann_index() == (m, efc)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table}_raw (embedding vector(3))")
        for m, efc in ((1, 64), (101, 1000), (16, 31), (2, 3), (16, 1001)):
            with pytest.raises(psycopg.DatabaseError, match=r"out of bounds for option|ef_construction must be"):
                conn.execute(f"CREATE INDEX ON {table}_raw USING hnsw (embedding vector_cosine_ops)"
                             f" WITH (m = {m}, ef_construction = {efc})")
        conn.execute(f"DROP TABLE {table}_raw")


def test_index_build_options_reach_the_server_and_an_existing_index_is_left(
    url: str, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    def index_oid() -> int | None:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT to_regclass(%s)::oid", (f"{table}_embedding_hnsw",)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    vs = unit_rows(np.random.default_rng(21), 50)
    with PgVectorStore.connect(url, DIM, table=table, index_m=8, index_ef_construction=40) as dense:
        assert dense.ann_index() == (8, 40)  # migration 2 used the options
        with psycopg.connect(url) as conn:
            (indexdef,) = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                                       (f"{table}_embedding_hnsw",)).fetchone() or ("",)
        assert "m='8'" in indexdef and "ef_construction='40'" in indexdef, indexdef
        dense.push(entries(50), vs)
        built = index_oid()
        # a store asking for the defaults reports the index it finds and leaves it
        with caplog.at_level(logging.WARNING, logger="intercascade_core.storage.pgvector"):
            plain = PgVectorStore.connect(url, DIM, table=table)
        with plain:
            warned = [r.getMessage() for r in caplog.records if r.name == "intercascade_core.storage.pgvector"]
            assert len(warned) == 1 and "m=8, ef_construction=40" in warned[0], warned
            assert plain.ann_index() == (8, 40) and index_oid() == built
            with pytest.raises(SchemaError, match="m=8, ef_construction=40"):
                plain.create_ann_index()
            assert index_oid() == built
            assert plain.search(vs[:1], 1).indices[0].tolist() == [1]  # and searches through it
            dense.create_ann_index()  # the matching store: nothing to do
            assert index_oid() == built
            # rebuilding is explicit
            plain.drop_ann_index()
            assert plain.ann_index() is None
            plain.create_ann_index()
            assert plain.ann_index() == (16, 64) and index_oid() != built
            with pytest.raises(SchemaError, match="m=16, ef_construction=64"):
                dense.create_ann_index()
            # an index built without options has pgvector's defaults, which are the library's
            plain.drop_ann_index()
            with psycopg.connect(url) as conn:
                conn.execute(f"CREATE INDEX {table}_embedding_hnsw ON {table} USING hnsw (embedding vector_cosine_ops)")
            assert plain.ann_index() == (16, 64)
            plain.create_ann_index()


def test_concurrent_schema_creation(url: str, table: str) -> None:
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            with PgVectorStore.connect(url, DIM, table=table):
                pass
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bad_arguments(store: PgVectorStore, url: str) -> None:
    with pytest.raises(InvalidArgumentError, match="url"):
        PgVectorStore("mysql://x", DIM)
    with pytest.raises(InvalidArgumentError, match="table"):
        PgVectorStore(url, DIM, table="Robert'); DROP TABLE x;--")
    with pytest.raises(InvalidArgumentError, match="vectors"):
        store.push(entries(2), np.ones((2, DIM), np.float32))  # not unit norm
    with pytest.raises(InvalidArgumentError, match="vectors"):
        store.push(entries(2), unit_rows(np.random.default_rng(0), 3))
    with pytest.raises(InvalidArgumentError, match="watermark"):
        store.pull_since(-1)
    with pytest.raises(InvalidArgumentError, match="query_vectors"):
        store.search(np.zeros((1, 5), np.float32), 3)
    with pytest.raises(InvalidArgumentError, match="k"):
        store.search(unit_rows(np.random.default_rng(0), 1), -1)


def test_server_down_is_a_typed_error(tmp_path: Path) -> None:
    url = f"postgresql://postgres@/postgres?host={tmp_path}"  # nobody listens there
    with pytest.raises(ServerUnavailableError, match="unavailable") as ei:
        PgVectorStore.connect(url, DIM, timeout=0.5, connect_timeout=1)
    assert isinstance(ei.value, ConnectionError)
    assert "password" not in str(ei.value)


def test_password_is_redacted() -> None:
    assert pgs._redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"


def test_pgvector_missing_is_a_typed_error(url: str, table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgs, "EXTENSION", "vector_not_installed_here")
    with pytest.raises(PgVectorMissingError, match="pgvector"):
        PgVectorStore.connect(url, DIM, table=table)


# ----------------------------------------------------------------------------- tenants
def test_tenant_isolation(store: PgVectorStore) -> None:
    rng = np.random.default_rng(2)
    a, b = entries(10, tenant="acme"), entries(10, tenant="globex")  # same texts, two tenants
    va, vb = unit_rows(rng, 10), unit_rows(rng, 10)
    assert store.push(a, va) == 10
    assert store.push(b, vb) == 10  # same (query, strategy) in another tenant is another row
    assert store.count("acme") == store.count("globex") == 10
    pa = store.pull_since(0, tenant="acme")
    assert {e.tenant for e in pa.entries} == {"acme"} and len(pa.entries) == 10
    acme_ids = {e.id for e in pa.entries}
    for exact in (True, False):
        top = store.search(vb, 5, tenant="acme", exact=exact)
        assert set(top.indices.ravel().tolist()) <= acme_ids
    assert store.search(va, 5, tenant="nobody").indices.shape == (10, 0)
    # a tenant-scoped syncer sees only its tenant
    s = PgSync(store, tenant="globex")
    s.pull()
    assert len(s.repo) == 10 and {e.tenant for e in s.repo.entries} == {"globex"}
    assert content_hash("acme", "q", "s") != content_hash("globex", "q", "s")
    assert content_hash("a", "bc", "d") != content_hash("ab", "c", "d")  # unambiguous


# ----------------------------------------------------------------------------- watermark
def _raw_insert(conn: psycopg.Connection[Any], table: str, e: Entry, v: np.ndarray) -> int:
    lit = "[" + ",".join(repr(float(x)) for x in v) + "]"
    row = conn.execute(
        f"INSERT INTO {table} (tenant, query, answer, strategy, content_hash, embedding)"
        " VALUES (%s, %s, %s, %s, %s, %s::vector) RETURNING id",
        (e.tenant, e.query, e.answer, e.strategy, content_hash(e.tenant, e.query, e.strategy), lit),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_watermark_never_skips_a_late_commit(store: PgVectorStore, url: str, table: str) -> None:
    rng = np.random.default_rng(3)
    (x, y, z), vs = entries(3, prefix="late"), unit_rows(rng, 3)

    # The hazard: ids from a plain sequence become visible out of order.
    with psycopg.connect(url) as slow, psycopg.connect(url, autocommit=True) as fast:
        slow_id = _raw_insert(slow, table, x, vs[0])  # open transaction, id drawn
        fast_id = _raw_insert(fast, table, y, vs[1])  # later id, committed first
        assert fast_id > slow_id
        seen = store.pull_since(0)
        assert [e.id for e in seen.entries] == [fast_id]
        slow.commit()
    assert store.pull_since(seen.watermark).entries == ()  # the naive reader lost x

    # The fix: push() draws ids only under the per-table insert lock, held to commit.
    wm = store.max_id()
    with psycopg.connect(url) as slow:
        slow.execute("SELECT pg_advisory_xact_lock(%s)", (store.insert_lock_key,))
        slow_id = _raw_insert(slow, table, z, vs[2])
        done = threading.Event()

        def fast_push() -> None:
            store.push(entries(1, prefix="fast"), vs[:1])
            done.set()

        t = threading.Thread(target=fast_push)
        t.start()
        with psycopg.connect(url, autocommit=True) as probe:  # wait until push() is blocked
            while not probe.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()[0]:  # type: ignore[index]
                assert t.is_alive() and not done.is_set()  # push() must wait, not finish or fail
        mid = store.pull_since(wm)
        assert mid.entries == ()  # nothing visible yet, so the watermark cannot jump
        slow.commit()
        t.join()
    after = store.pull_since(mid.watermark)
    assert [e.query for e in after.entries] == ["late2", "fast0"]
    assert after.entries[0].id == slow_id < after.entries[1].id


# ----------------------------------------------------------------------------- sync
def test_two_processes_write_and_sync_concurrently(url: str, table: str, tmp_path: Path) -> None:
    n = 120
    with PgVectorStore.connect(url, DIM, table=table):
        pass  # schema first, so the workers race on data, not on DDL (that is tested above)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-W", "error", str(HERE / "_pg_worker.py"), url, table, str(w), str(n),
             str(tmp_path / f"w{w}")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for w in (0, 1)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            assert line.strip() == "done", p.stderr.read()  # type: ignore[union-attr]
        outs = []
        for p in procs:
            out, err = p.communicate("go\n", timeout=120)
            assert p.returncode == 0, err
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:  # pragma: no cover - only on failure
                p.kill()
                p.wait()
    shared = {f"shared-{i}" for i in range(0, n, 3)}
    expected = {content_hash("default", q, f"strategy for {q}") for q in shared}
    for w in (0, 1):
        expected |= {content_hash("default", f"w{w}-{i}", f"strategy for w{w}-{i}")
                     for i in range(n) if i % 3}
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT content_hash, count(*) FROM {table} GROUP BY 1").fetchall()
    assert {bytes(r[0]) for r in rows} == expected  # nothing lost
    assert all(r[1] == 1 for r in rows)  # nothing stored twice
    for o in outs:
        assert o["pending"] == 0
        assert o["len"] == len(expected) == len(set(o["hashes"]))  # every local copy complete, no dupes
        assert {bytes.fromhex(h) for h in o["hashes"]} == expected


def test_restart_resumes_from_watermark(store: PgVectorStore, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    store.push(entries(30, prefix="old"), unit_rows(rng, 30))
    a = PgSync(store, state_dir=tmp_path / "a")
    assert a.pull() == 30
    saved_repo, saved_wm = a.repo, a.watermark
    # meanwhile another deployment teaches more
    store.push(entries(7, prefix="new"), unit_rows(rng, 7))
    # "restart": the deployment reloads its repository (as saved) and its state dir
    b = PgSync(store, repo=saved_repo, state_dir=tmp_path / "a")
    assert b.watermark == saved_wm
    assert b.pull() == 7
    assert b.stats.skipped == 0  # resumed: nothing before the watermark was read again
    assert [e.query for e in b.repo.entries[30:]] == [f"new{i}" for i in range(7)]
    # a state that does not match the repository falls back to a full, deduplicated pull
    c = PgSync(store, repo=saved_repo, state_dir=tmp_path / "a")  # state now says 37 rows
    assert c.watermark == 0
    assert c.pull() == 7 and c.stats.skipped == 30 and len(c.repo) == 37
    # and a deployment with nothing local starts from 0
    d = PgSync(store, state_dir=tmp_path / "d")
    assert d.pull() == 37 and d.watermark == store.max_id()


def test_local_writes_come_back_once(store: PgVectorStore) -> None:
    rng = np.random.default_rng(5)
    s = PgSync(store)
    es, vs = entries(5, prefix="mine"), unit_rows(rng, 5)
    repo = s.push(es, vs)
    assert len(repo) == 5 and s.pending == 0 and store.count() == 5
    assert s.pull() == 0 and s.stats.skipped == 5 and len(s.repo) == 5
    s.push(es, vs)  # the same strategies again: nothing new anywhere
    assert len(s.repo) == 5 and store.count() == 5
    # a repository that is not built from the syncer's is refused
    other = update(empty_repository(DIM), entries(1, prefix="x"), vs[:1])
    with pytest.raises(InvalidArgumentError, match="extension"):
        s.record(other)


def test_queue_survives_a_crash_and_a_torn_line(url: str, table: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    down = PgVectorStore(f"postgresql://postgres@/postgres?host={tmp_path}", DIM, table=table,
                         timeout=0.2, connect_timeout=1, ensure=False)
    try:
        s = PgSync(down, state_dir=tmp_path / "st", retry_interval=0.0)
        s.push(entries(4, prefix="offline"), unit_rows(rng, 4))
        assert s.pending == 4 and not s.online and len(s.repo) == 4
    finally:
        down.close()
    with open(tmp_path / "st" / "queue.jsonl", "a", encoding="utf-8") as f:
        f.write('{"tenant": "default", "qu')  # the process died mid-append
    with PgVectorStore.connect(url, DIM, table=table) as up:
        s2 = PgSync(up, state_dir=tmp_path / "st")
        assert s2.pending == 4  # the torn record was never acknowledged: dropped
        assert s2.flush() == 4 and s2.pending == 0 and up.count() == 4
        assert (tmp_path / "st" / "queue.jsonl").read_text() == ""
        # a crash after the commit but before the queue was emptied: re-sent, not duplicated
        s2._append_queue([(e, v) for e, v in zip(entries(4, prefix="offline"), renorm(unit_rows(rng, 4)), strict=True)])
        assert s2.flush() == 4 and up.count() == 4 and s2.stats.inserted == 4


# ----------------------------------------------------------------------------- retrieval
def test_server_exact_search_agrees_with_local_exact(store: PgVectorStore) -> None:
    rng = np.random.default_rng(7)
    vs = unit_rows(rng, 1500)
    vs[700:710] = vs[100]  # exact duplicates: ties must go to the lower id on both sides
    store.drop_ann_index()  # exact search needs no index; loading is faster without
    store.push(entries(1500, prefix="e"), vs)
    s = PgSync(store)
    s.pull()
    local_ids = np.array([e.id for e in s.repo.entries])
    assert (np.diff(local_ids) > 0).all()  # pulled in id order: row order == id order
    qs = np.vstack([unit_rows(rng, 40), vs[100:101], vs[5:6]])
    k = 10
    server = store.search(qs, k, exact=True)
    for backend in ("exact", "numpy"):
        local = retrieve(s.repo, qs, k, backend=backend)
        np.testing.assert_allclose(server.scores, local.scores, atol=2e-6)
        mapped = local_ids[local.indices]
        differ = mapped != server.indices
        # ids may only differ where two candidates' scores are within float rounding
        for i, j in zip(*np.nonzero(differ), strict=True):
            near = np.abs(local.scores[i] - local.scores[i, j]) < 2e-6
            assert near.sum() >= 2, (i, j)
        assert differ.mean() < 0.01
    dup_row = np.nonzero(np.isclose(server.scores[-2], 1.0, atol=1e-6))[0]
    assert server.indices[-2][dup_row].tolist() == sorted(server.indices[-2][dup_row].tolist())
    assert len(dup_row) == 10 or len(dup_row) == k


def test_pgvector_hnsw_recall_on_clustered_data(store: PgVectorStore, url: str) -> None:
    """Recall@5 of the server's HNSW index against exact, on clustered data.

    Seeded, so the outcome is fixed; the bound is still stated statistically: 200
    queries x 5 = 1000 neighbour slots; if the true recall were 0.995, the chance of
    observing < 0.99 is P(Binom(1000, 0.005) > 10) ≈ 0.014; at the observed 1.0 level
    (true recall ≥ 0.999) it is < 1e-6.
    """
    rng = np.random.default_rng(8)
    n, n_clusters, dim = 4000, 40, DIM
    centers = unit_rows(rng, n_clusters)
    labels = rng.integers(0, n_clusters, n)
    x = centers[labels] + 0.06 * rng.standard_normal((n, dim)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    es = entries(n, prefix="c")
    store.push(es[:300], x[:300])  # inserted into the live index...
    store.drop_ann_index()  # ...the rest bulk-loaded, then the index built once
    store.push(es[300:], x[300:])
    store.create_ann_index()
    qi = rng.choice(n, 200, replace=False)
    q = x[qi] + 0.03 * rng.standard_normal((200, dim)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    with psycopg.connect(url) as conn:  # the approximate path really uses the index
        plan = "\n".join(r[0] for r in conn.execute(
            f"EXPLAIN SELECT id FROM {store.table} ORDER BY embedding <=> %s::vector LIMIT 5",
            ("[" + ",".join(map(str, q[0].tolist())) + "]",),
        ).fetchall())
    assert "hnsw" in plan
    exact = store.search(q, 5, exact=True)
    approx = store.search(q, 5)
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.indices.tolist(), exact.indices.tolist(), strict=True))
    recall = hits / exact.indices.size
    assert recall >= 0.99, recall


def test_server_search_entries(store: PgVectorStore) -> None:
    rng = np.random.default_rng(9)
    vs = unit_rows(rng, 20)
    store.push(entries(20, prefix="s"), vs)
    hits = store.search_entries(vs[3:5], 2, exact=True)
    assert [h[0][0].query for h in hits] == ["s3", "s4"]
    assert hits[0][0][1] == pytest.approx(1.0, abs=1e-6)
    empty = store.search(vs[:2], 0)
    assert empty.indices.shape == (2, 0)


def test_retrieve_backend_pgvector(store: PgVectorStore) -> None:
    """A PgVectorStore is a SearchBackend: retrieve validates the queries and lets the
    server answer; indices are server ids."""
    assert isinstance(store, SearchBackend)
    rng = np.random.default_rng(10)
    vs = unit_rows(rng, 50)
    store.push(entries(50, prefix="r", tenant="acme"), vs)
    q = unit_rows(rng, 3)
    want = store.search(q, 5, tenant="acme")
    for repo in (store, empty_repository(DIM)):  # the store itself, or a local mirror
        top = retrieve(repo, q, 5, backend=store, tenant="acme")
        np.testing.assert_array_equal(top.indices, want.indices)
    with pytest.raises(InvalidArgumentError) as info:
        retrieve(empty_repository(DIM + 1), q, 5, backend=store)
    assert info.value.argument == "repo"
    with pytest.raises(InvalidArgumentError) as info:
        retrieve(store, q, 5, backend=store, ef=40)
    assert info.value.argument == "ef"
    with pytest.raises(InvalidArgumentError) as info:
        retrieve(store, q * 2, 5, backend=store)
    assert info.value.argument == "query_vectors"
    with pytest.raises(InvalidArgumentError) as info:
        retrieve(store, q, 5, backend="pgvector")
    assert info.value.argument == "backend"


# ----------------------------------------------------------------------------- re-scored search
def _mirror(store: PgVectorStore) -> tuple[Any, np.ndarray]:
    """The store's rows as a local repository (row order == id order) and their ids."""
    s = PgSync(store)
    s.pull()
    ids = np.array([e.id for e in s.repo.entries])
    assert (np.diff(ids) > 0).all()
    return s.repo, ids


def test_rescored_search_is_the_exact_top_k_when_the_overfetch_covers_the_table(store: PgVectorStore) -> None:
    """Candidates re-scored here: ids and float32 scores equal the local exact scan bit
    for bit (ties to the lower id), for the index path and the exact scan alike, once
    ``overfetch·k`` rows cover the table and ``ef_search`` >= n (the graph search then
    visits every row)."""
    rng = np.random.default_rng(11)
    n, k = 300, 5
    vs = unit_rows(rng, n)
    vs[150:154] = vs[20]  # exact duplicates: four-way ties at score 1.0
    store.push(entries(n, prefix="x"), vs)
    repo, ids = _mirror(store)
    qs = np.vstack([unit_rows(rng, 30), vs[20:21], vs[151:152]])
    ref = retrieve(repo, qs, k, backend="numpy")  # the reference scan
    local = retrieve(repo, qs, k, backend="exact")  # C or its twin: float32 sums, same ids
    for kw in ({"exact": True}, {"ef_search": 1000}):
        top = store.search(qs, k, overfetch=n // k, **kw)
        np.testing.assert_array_equal(top.indices, ids[ref.indices], err_msg=str(kw))
        np.testing.assert_array_equal(top.scores, ref.scores, err_msg=str(kw))
        np.testing.assert_array_equal(top.indices, ids[local.indices], err_msg=str(kw))
        np.testing.assert_allclose(top.scores, local.scores, atol=2e-6)
    tie = store.search(vs[20:21], k, overfetch=n // k, ef_search=1000)
    assert tie.indices[0, :5].tolist() == sorted([ids[20], *ids[150:154]])  # ties: lower id first
    # the server's own scores (no vectors fetched) agree up to float rounding only
    plain = store.search(qs, k, ef_search=1000, rescore=False)
    np.testing.assert_allclose(plain.scores, ref.scores, atol=2e-6)
    # the default over-fetch (2k rows of the server's order) holds the same top k here
    default = store.search(qs, k, ef_search=1000)
    np.testing.assert_array_equal(default.indices, ids[ref.indices])
    np.testing.assert_array_equal(default.scores, ref.scores)


def test_recall_sets_ef_search_and_is_validated(store: PgVectorStore, url: str) -> None:
    table = pgs.RECALL_EF_SEARCH
    assert all(r1 < r2 and e1 < e2 for (r1, e1), (r2, e2) in itertools.pairwise(table))
    for reached, ef in table:
        assert pgs.ef_search_for_recall(reached) == ef
    assert pgs.ef_search_for_recall(table[0][0] / 2) == table[0][1]
    assert pgs.ef_search_for_recall(1.0) is None  # only the exact scan promises recall 1
    above = (table[-1][0] + 1.0) / 2
    assert pgs.ef_search_for_recall(above) is None  # beyond what the index reached: exact
    q = unit_rows(np.random.default_rng(12), 2)
    for bad in (0, 0.0, -0.5, 1.01, float("nan"), float("inf"), True, "0.9"):
        with pytest.raises(InvalidArgumentError) as info:
            store.search(q, 5, recall=bad)  # type: ignore[arg-type]
        assert info.value.argument == "recall"
        with pytest.raises(InvalidArgumentError):
            pgs.ef_search_for_recall(bad)  # type: ignore[arg-type]
    for bad_of in (0, -1, 1001, True, 2.0):
        with pytest.raises(InvalidArgumentError) as info:
            store.search(q, 5, overfetch=bad_of)  # type: ignore[arg-type]
        assert info.value.argument == "overfetch"
    with pytest.raises(InvalidArgumentError) as info:
        store.search(q, 5, overfetch=4, rescore=False)
    assert info.value.argument == "overfetch"

    # observable effects. Tenant "far" (half the rows) lies opposite the query, "near"
    # around it; with ef_search 10 the index finds 10 "near" rows, and pgvector filters
    # by tenant after the index scan, so a "far" search through the index finds nothing.
    rng = np.random.default_rng(13)
    near = unit_rows(rng, 400) * 0.2 + q[0]
    near = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)
    store.push(entries(400, prefix="n", tenant="near"), near)
    store.push(entries(400, prefix="f", tenant="far"), -near)
    with psycopg.connect(url) as conn:
        conn.execute(f"ANALYZE {store.table}")  # the planner then sees "far" is half the table
        plan = "\n".join(r[0] for r in conn.execute(
            f"EXPLAIN SELECT id FROM {store.table} WHERE tenant = 'far' ORDER BY embedding <=> %s::vector LIMIT 3",
            ("[" + ",".join(map(str, q[0].tolist())) + "]",),
        ).fetchall())
    assert "hnsw" in plan, plan
    one = q[:1]
    # an explicit ef_search beats recall (even 1.0, which alone takes the exact scan);
    # pgvector 0.6 returns at most ef_search rows from an index scan
    assert store.search(one, 3, tenant="far", ef_search=10, recall=1.0, rescore=False).indices.shape == (1, 0)
    assert store.search(one, 5, recall=0.8, ef_search=1, rescore=False).indices.shape == (1, 1)
    assert store.search(one, 5, recall=0.8, rescore=False).indices.shape == (1, 5)
    # recall 1.0, or above every row of the table, takes the exact scan
    want = store.search(one, 3, tenant="far", exact=True)
    assert want.indices.shape == (1, 3)
    for r in (1.0, above):
        top = store.search(one, 3, tenant="far", recall=r)
        np.testing.assert_array_equal(top.indices, want.indices)
        np.testing.assert_array_equal(top.scores, want.scores)


def test_rescored_search_keeps_the_tenant_filter(store: PgVectorStore) -> None:
    rng = np.random.default_rng(14)
    n = 240
    tenants = ["acme" if i % 3 else "globex" for i in range(n)]
    vs = unit_rows(rng, n)
    for i in range(n):  # interleaved ids
        store.push(entries(1, prefix=f"t{i}-", tenant=tenants[i]), vs[i : i + 1])
    repo, ids = _mirror(store)
    qs = unit_rows(rng, 12)
    for tenant in ("acme", "globex"):
        mine = {int(i) for i, t in zip(ids, tenants, strict=True) if t == tenant}
        ref = retrieve(repo, qs, 5, backend="numpy", tenant=tenant)
        for kw in ({"exact": True}, {"ef_search": 1000}, {"recall": 0.8}):
            top = store.search(qs, 5, tenant=tenant, overfetch=n // 5, **kw)
            assert set(top.indices.ravel().tolist()) <= mine, kw
            np.testing.assert_array_equal(top.indices, ids[ref.indices], err_msg=str(kw))
            np.testing.assert_array_equal(top.scores, ref.scores, err_msg=str(kw))
        # few rows fetched (k of them): still only this tenant's, each scored exactly
        few = store.search(qs, 5, tenant=tenant, overfetch=1)
        assert set(few.indices.ravel().tolist()) <= mine
        for qi in range(qs.shape[0]):
            sub = retrieve(repo, qs[qi : qi + 1], len(mine), backend="numpy", tenant=tenant)
            exact_score = {int(ids[r]): float(s) for r, s in zip(sub.indices[0], sub.scores[0], strict=True)}
            for i, s in zip(few.indices[qi], few.scores[qi], strict=True):
                assert s == exact_score[int(i)]
