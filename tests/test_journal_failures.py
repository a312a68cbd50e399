"""Journal failure atomicity: an append is all or nothing, and damage in the middle of the
file is an error — never a silent truncation of acknowledged records."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from intercascade_core import Entry, InvalidArgumentError
from intercascade_core.errors import JournalCorruptError
from intercascade_core.storage import journal as journal_mod
from intercascade_core.storage.journal import Journal, read_journal

DIM = 8


def rows(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def entry(i: int) -> Entry:
    return Entry(query=f"q{i}", answer=str(i), strategy=f"strategy number {i}")


def write_three(path) -> list[int]:
    j = Journal(path, dim=DIM, model_id="m")
    offsets = []
    for lsn in (1, 2, 3):
        offsets.append(os.path.getsize(path))
        j.append(lsn, [entry(lsn)], rows(1, lsn))
    j.close()
    return offsets


def test_a_damaged_length_field_in_the_middle_is_corruption_not_a_torn_tail(tmp_path):
    path = tmp_path / "journal.bin"
    offsets = write_three(path)
    size = os.path.getsize(path)
    data = bytearray(path.read_bytes())
    data[offsets[1] + 3] ^= 0x40  # high byte of record 2's length: now far past the end
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError, match="bad length"):
        read_journal(path)
    with pytest.raises(JournalCorruptError):
        Journal(path, dim=DIM, model_id="m")
    assert os.path.getsize(path) == size  # nothing was truncated


def test_a_torn_last_record_is_still_dropped_with_a_warning(tmp_path):
    path = tmp_path / "journal.bin"
    write_three(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    with pytest.warns(journal_mod.TornJournalWarning):
        j = Journal(path, dim=DIM, model_id="m")
    assert [r.lsn for r in j.records] == [1, 2]
    j.close()


def test_an_oversize_record_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    path = tmp_path / "journal.bin"
    write_three(path)
    size = os.path.getsize(path)
    monkeypatch.setattr(journal_mod, "MAX_RECORD_BYTES", 2000)
    j = Journal(path, dim=DIM, model_id="m")
    with pytest.raises(InvalidArgumentError, match="MAX_RECORD_BYTES"):
        j.append(4, [entry(i) for i in range(50)], rows(50, 9))
    j.append(4, [entry(4)], rows(1, 4))
    j.close()
    assert os.path.getsize(path) > size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.lsn for r in read_journal(path).records] == [1, 2, 3, 4]


def test_a_failed_fsync_is_rolled_back_and_the_journal_stays_usable(tmp_path, monkeypatch):
    path = tmp_path / "journal.bin"
    write_three(path)
    j = Journal(path, dim=DIM, model_id="m")
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(journal_mod.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        j.append(4, [entry(4)], rows(1, 4))
    monkeypatch.setattr(journal_mod.os, "fsync", real_fsync)
    j.append(4, [entry(4)], rows(1, 4))  # the caller retries with the same lsn
    j.close()
    assert [r.lsn for r in read_journal(path).records] == [1, 2, 3, 4]
