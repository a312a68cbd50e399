"""Helpers for the PostgreSQL tests: start/stop a real pgserver instance, and a writer
process (``python tests/_pg_worker.py URL TABLE WID N STATE_DIR``) for the concurrency
test.

pgserver and root: PostgreSQL refuses to run as root, so when the tests run as root
pgserver itself creates (``useradd``) an unprivileged ``pgserver`` system user, runs
``initdb``/``pg_ctl`` as that user and makes the data directory's parent folders
traversable (``chmod o+rx``); nothing else is needed here. As a normal user it runs as
that user. The data directory lives under the test's ``tmp_path`` and the server listens
only on a unix socket in it.

One catch when running as root on a machine where other pytest sessions run at the same
time: every pytest session resets ``/tmp/pytest-of-root`` to mode 0700, which cuts the
``pgserver`` user off from a data directory below it (a restart then dies with
"could not open file global/pg_control: Permission denied"). So as root the data
directory goes into a fresh ``mkdtemp`` folder under the system temp dir instead (made
traversable, removed after the test); as a normal user it stays under ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def import_pgserver() -> Any:
    """Import pgserver (platformdirs warns at import when XDG_RUNTIME_DIR is unset)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver._commands

    return pgserver


def data_dir(tmp_path: Path) -> Path:
    """Where a test's PostgreSQL data directory goes (see the module docstring)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="intercascade-pg-"))
        base.chmod(0o755)
        return base / "data"
    return tmp_path / "data"


def start_server(pgdata: Path) -> Any:
    pgserver = import_pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pgserver.get_server(pgdata, cleanup_mode="stop")


def stop_server(srv: Any) -> None:
    """Kill the server the hard way (``pg_ctl stop -m immediate``: no clean shutdown)."""
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=srv.pgdata, user=srv.system_user)


def restart_server(srv: Any) -> None:
    srv.ensure_postgres_running()


def shutdown(srv: Any) -> None:
    """Stop the server; remove a root-mode data directory (see :func:`data_dir`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        srv.cleanup()
    parent = Path(srv.pgdata).parent
    if parent.name.startswith("intercascade-pg-"):
        shutil.rmtree(parent, ignore_errors=True)


def unit_vector(key: str, dim: int = 384) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _worker(url: str, table: str, wid: int, n: int, state_dir: str) -> None:
    from intercascade_core.core.repository import Entry
    from intercascade_core.storage.pgvector import PgVectorStore, content_hash
    from intercascade_core.storage.sync import PgSync

    with PgVectorStore.connect(url, 384, table=table) as store:
        sync = PgSync(store, state_dir=state_dir, retry_interval=0.0)
        for i in range(n):
            # every third query is written by both workers: the server must keep one
            q = f"shared-{i}" if i % 3 == 0 else f"w{wid}-{i}"
            e = Entry(q, f"a-{i}", f"strategy for {q}", source_model=f"worker{wid}")
            sync.push([e], unit_vector(q)[None, :])
            sync.pull()
        print("done", flush=True)
        sys.stdin.readline()  # the parent says go once both writers are done
        sync.sync(force=True)
        hashes = [content_hash(e.tenant, e.query, e.strategy).hex() for e in sync.repo.entries]
        print(json.dumps({"hashes": hashes, "pending": sync.pending, "len": len(sync.repo)}), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
