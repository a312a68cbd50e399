"""`intercascade export`: a saved repository becomes a chat-format JSONL fine-tuning set."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from intercascade_core import Entry, empty_repository, update
from intercascade_core.storage.store import save


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "intercascade_core", *args],
                          capture_output=True, text=True, timeout=120)


def test_export_writes_one_example_per_strategy_of_the_tenant(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    entries = [
        Entry(query="What is 2+3?", answer="5", strategy="Add the two counts.", tenant="a"),
        Entry(query="What is 4*6?", answer="24", strategy="Multiply groups by size.", tenant="a"),
        Entry(query="Capital of France?", answer="Paris", strategy="Recall the capital.", tenant="b"),
    ]
    save(tmp_path / "repo", update(empty_repository(8), entries, vectors), model_id="test-embedder")
    out = tmp_path / "ft.jsonl"
    done = run_cli("export", "--repository", str(tmp_path / "repo"), "--out", str(out), "--tenant", "a")
    assert done.returncode == 0, done.stderr
    assert "wrote 2 examples" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    text = json.dumps(rows)
    assert "What is 2+3?" in text and "Multiply groups by size." in text and "Paris" not in text
    assert all({m["role"] for m in row["messages"]} >= {"user", "assistant"} for row in rows)


def test_export_of_a_missing_repository_is_a_one_line_usage_error(tmp_path):
    done = run_cli("export", "--repository", str(tmp_path / "nope"), "--out", str(tmp_path / "x.jsonl"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "nope" in done.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_export_takes_the_store_folder_of_the_service(tmp_path):
    """`Cascade(store=...)` writes level<i>/ durable stores; export reads them as they are
    (journal included) without the user digging out level0/CURRENT and its snapshot."""
    from tests._crash_worker import make_cascade, stream

    store = tmp_path / "svc"
    cascade, client = make_cascade(str(store))
    try:
        for q in stream(10, seed=5):
            cascade.ask(q)
        taught = [e.query for e in cascade.state.repositories[0].entries]
        cascade.close(checkpoint=False)
    finally:
        client.close()
    assert taught
    out = tmp_path / "ft.jsonl"
    done = run_cli("export", "--repository", str(store), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {len(set(taught))} examples" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][-2]["content"] for r in rows] == list(dict.fromkeys(taught))
    assert {r["metadata"]["level"] for r in rows} == {0}
    one = run_cli("export", "--repository", str(store), "--level", "0", "--out", str(tmp_path / "l0.jsonl"))
    assert one.returncode == 0 and (tmp_path / "l0.jsonl").read_bytes() == out.read_bytes()
    missing = run_cli("export", "--repository", str(store), "--level", "3", "--out", str(tmp_path / "x.jsonl"))
    assert missing.returncode == 2 and "levels 0..0, got 3" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.jsonl").exists()
    durable = run_cli("export", "--repository", str(store / "level0"), "--out", str(tmp_path / "d.jsonl"))
    assert durable.returncode == 0, durable.stderr
    assert [json.loads(x)["messages"][-2]["content"] for x in (tmp_path / "d.jsonl").read_text().splitlines()] == \
        list(dict.fromkeys(taught))
