"""A store-writing process for the lock tests (``tests/test_store_lock.py``).

``python tests/_store_writer.py STORE N [CHECKPOINT_EVERY [PAUSE_S]]`` opens the durable
store ``STORE`` for writing, prints ``locked <rows>``, logs ``N`` one-entry batches (entry
``i`` and its row are :func:`batch` ``(i)``, so the parent knows what was written),
printing ``done <i>`` after each acknowledged append, checkpointing every
``CHECKPOINT_EVERY`` batches and pausing ``PAUSE_S`` between them, then prints
``finished`` and holds the store until its stdin closes. A refused
open prints ``refused <pid of the holder>`` and exits 3.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from intercascade_core.core.repository import Entry, Repository, update
from intercascade_core.errors import StoreLockedError
from intercascade_core.storage.journal import DurableStore

DIM = 8
MODEL = "lock-test-model"


def batch(i: int) -> tuple[list[Entry], np.ndarray]:
    row = np.random.default_rng(i).standard_normal((1, DIM)).astype(np.float32)
    row /= np.linalg.norm(row)
    return [Entry(f"q{i}", f"a{i}", f"strategy {i}", created_at=float(i))], row


def expected(n: int, repo: Repository) -> Repository:
    """``repo`` after batches ``0..n-1`` appended as the writer does."""
    for i in range(n):
        repo = update(repo, *batch(i))
    return repo


def main(argv: list[str]) -> int:
    store, n = argv[1], int(argv[2])
    every = int(argv[3]) if len(argv) > 3 else 0
    pause = float(argv[4]) if len(argv) > 4 else 0.0
    try:
        ds = DurableStore.open(store, dim=DIM, model_id=MODEL)
    except StoreLockedError as e:
        print(f"refused {e.pid}", flush=True)
        print(str(e), file=sys.stderr, flush=True)
        return 3
    print(f"locked {len(ds.repository)}", flush=True)
    repo = ds.repository
    start = len(repo)
    for i in range(start, start + n):
        repo = update(repo, *batch(i))
        ds.log(repo.entries[-1:], repo.vectors[-1:])
        print(f"done {i}", flush=True)
        if every and (i + 1) % every == 0:
            ds.checkpoint(repo, np.zeros(len(repo), np.int64))
        time.sleep(pause)
    print("finished", flush=True)
    sys.stdin.read()  # hold the store (and its lock) until the parent lets go
    ds.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
