"""One writer per store directory, readers beside it: tested with real processes.

Each test starts ``tests/_store_writer.py`` in subprocesses (``flock`` is per open file,
so the point is what a second *process* sees). A watchdog kills every child after a
deadline, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from intercascade_core.core.repository import empty_repository
from intercascade_core.errors import StoreError, StoreLockedError
from intercascade_core.storage.journal import LOCK, DurableStore, TornJournalWarning
from tests._store_writer import DIM, MODEL, expected

WRITER = Path(__file__).with_name("_store_writer.py")
ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(WRITER.parent.parent), os.environ.get("PYTHONPATH", "")]),
)


class Writer:
    """A writer process and the lines it has printed (read by a thread)."""

    def __init__(self, store: Path, n: int, every: int = 0, pause: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(store), str(n), str(every), str(pause)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._watchdog = threading.Timer(240, self.proc.kill)
        self._watchdog.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode().strip())
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<eof>")
            self._cond.notify_all()

    def wait_for(self, pred: object, timeout: float = 120) -> str:
        """The first line satisfying ``pred`` (a prefix string or a callable)."""
        test = pred if callable(pred) else (lambda s: s.startswith(str(pred)))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if test(line):
                        return line
                if "<eof>" in self.lines:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    pytest.fail(f"writer exited before {pred!r}: {self.lines[-5:]} {err[-2000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"writer did not print {pred!r} in {timeout} s")
                self._cond.wait(left)

    def acked(self) -> int:
        """How many appends the writer has acknowledged so far."""
        with self._cond:
            return sum(1 for line in self.lines if line.startswith("done "))

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=120)
        self._watchdog.cancel()
        return rc

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._watchdog.cancel()


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
        w._watchdog.cancel()
        w._reader.join(timeout=10)
        for pipe in (w.proc.stdin, w.proc.stdout, w.proc.stderr):
            if pipe is not None:
                pipe.close()


def _assert_prefix(store: DurableStore, at_least: int) -> int:
    """The store holds batches 0..k-1 exactly (k >= at_least); returns k."""
    got = store.repository
    k = len(got)
    assert k >= at_least, f"a reader saw {k} entries, {at_least} were acknowledged before it opened"
    want = expected(k, empty_repository(DIM))
    assert list(got.entries) == list(want.entries)
    np.testing.assert_array_equal(got.vectors, want.vectors)
    return k


def test_a_second_writer_is_refused_while_readers_see_every_acknowledged_record(
    tmp_path: Path, writers: list[Writer]
) -> None:
    store = tmp_path / "store"
    first = Writer(store, 400, every=37, pause=0.01)
    writers.append(first)
    first.wait_for("done 10")

    # another process: refused, naming the holder
    second = Writer(store, 5)
    writers.append(second)
    assert second.wait_for("refused") == f"refused {first.proc.pid}"
    assert second.proc.wait(timeout=60) == 3
    # this process: refused too, with the holder's pid and host in the error
    with pytest.raises(StoreLockedError) as ei:
        DurableStore.open(store, dim=DIM, model_id=MODEL)
    assert ei.value.pid == first.proc.pid and ei.value.host == socket.gethostname()
    assert f"pid {first.proc.pid} on host {socket.gethostname()}" in str(ei.value)
    assert ei.value.path == str(store / LOCK)

    # readers open beside the writer while it appends and checkpoints
    seen = []
    while "finished" not in first.lines:
        acked = first.acked()
        with DurableStore.open(store, dim=DIM, model_id=MODEL, readonly=True) as ro:
            seen.append(_assert_prefix(ro, acked))
            with pytest.raises(StoreError, match="read-only"):
                ro.log(ro.repository.entries[:1], ro.repository.vectors[:1])
    assert len(seen) >= 3 and seen == sorted(seen), seen

    assert first.finish() == 0  # closing releases the lock
    with DurableStore.open(store, dim=DIM, model_id=MODEL) as ds:
        assert _assert_prefix(ds, 400) == 400


def test_two_processes_writing_one_directory_cannot_interleave(
    tmp_path: Path, writers: list[Writer]
) -> None:
    """Two writers of 60 entries each: without a lock their appends interleave in one
    journal (lsn gaps on reopen, everything unreachable); with it exactly one writes."""
    store = tmp_path / "store"
    with DurableStore.open(store, dim=DIM, model_id=MODEL):
        pass  # created, so both processes race only for the lock
    a, b = Writer(store, 60), Writer(store, 60)
    writers += [a, b]
    first = {w: w.wait_for(lambda s: s.startswith(("locked", "refused"))) for w in (a, b)}
    winners = [w for w, line in first.items() if line.startswith("locked")]
    losers = [w for w, line in first.items() if line.startswith("refused")]
    assert len(winners) == 1 and len(losers) == 1, first
    assert first[losers[0]] == f"refused {winners[0].proc.pid}"
    winners[0].wait_for("finished")
    assert winners[0].finish() == 0 and losers[0].proc.wait(timeout=60) == 3
    with DurableStore.open(store, dim=DIM, model_id=MODEL) as ds:
        assert _assert_prefix(ds, 60) == 60 and ds.replayed == 60


def test_a_killed_writer_leaves_no_stale_lock(tmp_path: Path, writers: list[Writer]) -> None:
    store = tmp_path / "store"
    w = Writer(store, 10_000)
    writers.append(w)
    w.wait_for("done 20")
    w.kill()
    acked = w.acked()
    assert json.loads((store / LOCK).read_text())["pid"] == w.proc.pid  # its record stays
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TornJournalWarning)  # the kill may tear the tail
        with DurableStore.open(store, dim=DIM, model_id=MODEL) as ds:
            assert _assert_prefix(ds, acked) in (acked, acked + 1)
            assert json.loads((store / LOCK).read_text())["pid"] == os.getpid()
            # a refused writer names the live holder, not the dead one
            second = Writer(store, 1)
            writers.append(second)
            assert second.wait_for("refused") == f"refused {os.getpid()}"
    assert (store / LOCK).read_bytes() == b""  # a clean release clears the record


def test_one_writer_per_directory_within_a_process_too(tmp_path: Path) -> None:
    ds = DurableStore.open(tmp_path / "s", dim=DIM, model_id=MODEL)
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        DurableStore.open(tmp_path / "s", dim=DIM, model_id=MODEL)
    ro = DurableStore.open(tmp_path / "s", dim=DIM, model_id=MODEL, readonly=True)
    assert ro.readonly and len(ro.repository) == 0
    ds.close()
    ds.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        ds.log([], np.empty((0, DIM), np.float32), [0])
    DurableStore.open(tmp_path / "s", dim=DIM, model_id=MODEL).close()  # the lock was released


def test_a_failed_open_releases_the_lock(tmp_path: Path) -> None:
    DurableStore.open(tmp_path / "s", dim=DIM, model_id=MODEL).close()
    with pytest.raises(StoreError):
        DurableStore.open(tmp_path / "s", dim=DIM + 1, model_id=MODEL)
    DurableStore.open(tmp_path / "s", dim=DIM, model_id=MODEL).close()


def test_readonly_creates_and_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a directory"):
        DurableStore.open(tmp_path / "none", dim=DIM, model_id=MODEL, readonly=True)
    assert not (tmp_path / "none").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="CURRENT"):
        DurableStore.open(tmp_path / "empty", dim=DIM, model_id=MODEL, readonly=True)
    assert list((tmp_path / "empty").iterdir()) == []
    with DurableStore.open(tmp_path / "s", dim=DIM, model_id=MODEL) as ds:
        repo = expected(3, ds.repository)
        ds.log(repo.entries, repo.vectors)
    journal = tmp_path / "s" / "journal.log"
    with open(journal, "ab") as f:  # a torn tail, as a live writer mid-append leaves it
        f.write(b"\x40\x00\x00\x00\x00\x00")
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reader does not warn about a writer's tail
        ro = DurableStore.open(tmp_path / "s", dim=DIM, model_id=MODEL, readonly=True)
    assert len(ro.repository) == 3 and ro.replayed == 1
    with pytest.raises(StoreError, match="read-only"):
        ro.checkpoint(ro.repository)
    ro.close()
    after = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert after == before
