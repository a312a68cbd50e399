"""The README's library example runs as written, and its two commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_library_example_runs(capsys):
    block = re.search(r"## The library in 15 lines\s+```python\n(.*?)```", README, re.S)
    assert block, "the README lost its library example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 16
    pytest.importorskip("onnxruntime")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "pipeline_accuracy" in printed and "strong_call_rate" in printed


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(python3 -m venv .*)$", README, re.M)
    assert len(commands) == 2, commands
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
