"""export: JSONL fine-tuning set in chat format."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.errors import CorruptStoreError, InvalidArgumentError, StoreError
from intercascade_core.storage.export import export_finetune, export_sources, open_for_export
from intercascade_core.storage.journal import JOURNAL, DurableStore
from tests.strategies import random_unit


def _repo():
    es = [
        Entry(
            "What is 2+3?",
            "5",
            "Add the two numbers.\x00",
            source_model="strong",
            source_level=1,
            tenant="a",
        ),
        Entry("What is 2+3?", "5", "Add them.", tenant="a"),  # duplicate query
        Entry("Halve 10", "5", "Divide by two.", tenant="b", created_at=4.0),
    ]
    return update(empty_repository(8), es, random_unit(np.random.default_rng(0), 3, 8))


def test_export_chat_format(tmp_path: Path) -> None:
    n = export_finetune(_repo(), tmp_path / "ft.jsonl", uses=np.array([2, 0, 1]))
    lines = (tmp_path / "ft.jsonl").read_text().splitlines()
    assert n == len(lines) == 2
    ex = [json.loads(x) for x in lines]
    roles = [[m["role"] for m in e["messages"]] for e in ex]
    assert roles == [["system", "user", "assistant"]] * 2
    assert ex[0]["messages"][1]["content"] == "What is 2+3?"
    assert ex[0]["messages"][2]["content"] == "Strategy: Add the two numbers.\n\nAnswer: 5"
    assert ex[0]["metadata"] == {
        "id": 0,
        "tenant": "a",
        "source_model": "strong",
        "source_level": 1,
        "created_at": 0.0,
        "uses": 2,
    }
    assert ex[1]["metadata"]["tenant"] == "b"


def test_export_filters(tmp_path: Path) -> None:
    repo = _repo()
    assert export_finetune(repo, tmp_path / "a.jsonl", tenant="b") == 1
    assert export_finetune(repo, tmp_path / "b.jsonl", dedupe_queries=False, system=None) == 3
    first = json.loads((tmp_path / "b.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert export_finetune(repo, tmp_path / "c.jsonl", uses=[0, 3, 1], min_uses=1) == 2
    assert export_finetune(empty_repository(8), tmp_path / "d.jsonl") == 0
    assert (tmp_path / "d.jsonl").read_bytes() == b""
    n = export_finetune(
        repo, tmp_path / "e.jsonl", template=lambda e: [{"role": "user", "content": e.query}]
    )
    assert n == 2


def test_export_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="uses"):
        export_finetune(_repo(), tmp_path / "x", uses=[1])
    with pytest.raises(InvalidArgumentError, match="template"):
        export_finetune(_repo(), tmp_path / "x", template=lambda e: "nope")  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidArgumentError, match="min_uses"):
        export_finetune(_repo(), tmp_path / "x", min_uses=-1)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- what the library writes


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _entries(path: Path) -> list[tuple[str, str, int | None]]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [(r["messages"][-2]["content"], r["metadata"]["tenant"], r["metadata"].get("level")) for r in rows]


def test_export_reads_a_durable_store_as_a_reopen_recovers_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "durable"
    repo = empty_repository(8)
    with DurableStore.open(root, dim=8, model_id="m") as ds:
        for i in range(5):
            new = update(repo, [Entry(f"query {i}", str(i), f"strategy number {i}")], random_unit(rng, 1, 8))
            ds.log(new.entries[-1:], new.vectors[-1:], uses=[0] if i else [])
            repo = new
            if i == 2:
                ds.checkpoint(repo, uses=np.array([2, 0, 0]))  # the rest only in the journal
    before = _tree(root)
    assert any(name.startswith("snap-") for name in before) or list(root.glob("snap-*"))
    (src,) = open_for_export(root)
    assert src.replayed == 2 and src.level is None
    with DurableStore.open(root, dim=8, model_id="m") as again:
        expected = again.repository
        expected_uses = np.asarray(again.uses)
    assert list(src.repository.entries) == list(expected.entries)
    np.testing.assert_array_equal(src.uses, expected_uses)
    assert _tree(root) == before  # read only: nothing written or truncated
    n = export_sources(open_for_export(root), tmp_path / "ft.jsonl", dedupe_queries=False)
    assert n == 5
    assert [q for q, _, _ in _entries(tmp_path / "ft.jsonl")] == [f"query {i}" for i in range(5)]


def test_export_leaves_a_torn_journal_tail_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "durable"
    with DurableStore.open(root, dim=8, model_id="m") as ds:
        repo = update(empty_repository(8), [Entry("q", "a", "a strategy")], random_unit(rng, 1, 8))
        ds.log(repo.entries, repo.vectors)
    with open(root / JOURNAL, "ab") as f:  # a writer killed mid-append
        f.write(b"\x40\x00\x00\x00\x01\x02")
    before = _tree(root)
    (src,) = open_for_export(root)
    assert [e.query for e in src.repository.entries] == ["q"]
    assert _tree(root) == before


def test_export_reads_every_level_of_a_service_store(tmp_path: Path) -> None:
    from tests._crash_worker import make_cascade, stream

    store = tmp_path / "svc"
    cascade, client = make_cascade(str(store))
    try:
        for q in stream(12, seed=3):
            cascade.ask(q)
        repos = cascade.state.repositories
        cascade.close(checkpoint=False)  # the strategies are in the journals only
    finally:
        client.close()
    assert len(repos[0]) > 0
    sources = open_for_export(store)
    assert [s.level for s in sources] == list(range(len(repos)))
    for src, repo in zip(sources, repos, strict=True):
        assert list(src.repository.entries) == list(repo.entries)
    out = tmp_path / "ft.jsonl"
    n = export_sources(sources, out, dedupe_queries=False)
    assert n == sum(len(r) for r in repos)
    assert {lvl for _, _, lvl in _entries(out)} == {j for j, r in enumerate(repos) if len(r)}
    (only,) = open_for_export(store, level=0)
    assert only.level == 0 and len(only.repository) == len(repos[0])
    with pytest.raises(InvalidArgumentError, match=f"levels 0..{len(repos) - 1}, got {len(repos)}"):
        open_for_export(store, level=len(repos))
    with pytest.raises(InvalidArgumentError, match="service store"):
        open_for_export(store / "level0", level=0)
    (alone,) = open_for_export(store / "level0")  # one level is a durable store
    assert list(alone.repository.entries) == list(repos[0].entries)


def test_export_of_several_levels_keeps_their_order_and_names_them(tmp_path: Path) -> None:
    """The service keeps one durable store per taught level in level<i>/ (three models
    teach two levels); every level is exported, weakest first, or one with ``level``."""
    rng = np.random.default_rng(4)
    for j in (0, 1):
        with DurableStore.open(tmp_path / "svc" / f"level{j}", dim=8, model_id="m") as ds:
            repo = update(empty_repository(8), [Entry(f"level {j} query", "1", "a strategy")],
                          random_unit(rng, 1, 8))
            ds.log(repo.entries, repo.vectors)
    sources = open_for_export(tmp_path / "svc")
    assert [s.level for s in sources] == [0, 1]
    assert export_sources(sources, tmp_path / "all.jsonl") == 2
    assert _entries(tmp_path / "all.jsonl") == [("level 0 query", "default", 0), ("level 1 query", "default", 1)]
    assert export_sources(open_for_export(tmp_path / "svc", level=1), tmp_path / "one.jsonl") == 1
    assert _entries(tmp_path / "one.jsonl") == [("level 1 query", "default", 1)]


def test_export_names_what_it_expected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match=r"manifest\.json.*CURRENT.*level0"):
        open_for_export(tmp_path / "empty")
    (tmp_path / "gap" / "level1").mkdir(parents=True)
    with pytest.raises(CorruptStoreError, match="level folders"):
        open_for_export(tmp_path / "gap")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "CURRENT").write_bytes(b"../../etc\n")
    with pytest.raises(CorruptStoreError, match="snapshot"):
        open_for_export(bad)
    (bad / "CURRENT").unlink()
    os.mkfifo(bad / "CURRENT")  # a plain read would block
    with pytest.raises(CorruptStoreError, match="regular file"):
        open_for_export(bad)


def test_export_refuses_targets_that_are_not_regular_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", tmp_path / "link")
    for target in (Path(""), Path("."), tmp_path, tmp_path / "fifo", tmp_path / "link"):
        with pytest.raises(InvalidArgumentError, match="path"):
            export_finetune(_repo(), target)
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)  # not replaced by a file
    (tmp_path / "old.jsonl").write_text("old\n")
    assert export_finetune(_repo(), tmp_path / "old.jsonl") == 2  # a regular file is replaced
