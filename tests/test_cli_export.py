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
