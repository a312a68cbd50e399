"""bench/local_llm/run.py's report section: timing fitted from the response logs and the
per-policy model seconds it derives from an eval's outcomes (no model needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import pytest

from intercascade_core.llm import ChatModel
from intercascade_core.response_cache import ResponseCache

RUN = Path(__file__).parents[1] / "bench" / "local_llm" / "run.py"


@pytest.fixture(scope="module")
def run_mod():
    spec = importlib.util.spec_from_file_location("local_llm_run", RUN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fill_log(path: Path, token_counts: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Write real cache records through ResponseCache: the fake server 'takes' 1 s + 0.1 s
    per completion token on an injected clock."""
    counts = iter(token_counts)
    clock = [0.0]

    def server(request: httpx.Request) -> httpx.Response:
        n = next(counts)
        clock[0] += 1.0 + 0.1 * n
        return httpx.Response(200, json={
            "choices": [{"message": {"content": "Answer: 1"}, "finish_reason": "stop",
                         "logprobs": {"content": [{"token": "1", "logprob": -0.1}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": n}})

    import intercascade_core.response_cache as rc

    cache = ResponseCache(path, inner=httpx.MockTransport(server))
    with monkeypatch.context() as m:
        m.setattr(rc.time, "perf_counter", lambda: clock[0])
        model = ChatModel("http://m.test/v1", "m", client=httpx.Client(transport=cache), max_retries=0)
        for i in range(len(token_counts)):
            model.generate([{"role": "user", "content": f"q{i}"}], temperature=0)


def test_call_times_recovers_the_per_token_cost(run_mod, tmp_path, monkeypatch):
    log = tmp_path / "weak.jsonl"
    _fill_log(log, [10, 20, 40, 80], monkeypatch)
    t = run_mod.call_times(log)
    assert t["calls"] == 4
    assert t["fit_a"] == pytest.approx(1.0, abs=1e-3) and t["fit_b"] == pytest.approx(0.1, abs=1e-4)
    assert run_mod.model_seconds(2, 30, t) == pytest.approx(2 * 1.0 + 30 * 0.1, abs=1e-2)
    assert run_mod.call_times(tmp_path / "missing.jsonl") == {"calls": 0}


def test_summary_section_counts_calls_and_accuracy(run_mod, tmp_path, monkeypatch):
    for name, toks in (("weak", [10, 20, 30]), ("strong", [50, 100, 150])):
        _fill_log(tmp_path / f"{name}.jsonl", toks, monkeypatch)
    cfg = tmp_path / "c.toml"
    cfg.write_text("".join(
        f'[[models]]\nname = "{n}"\nbase_url = "http://127.0.0.1:{p}/v1"\nmodel = "{n}-m"\n'
        f'response_cache = "{n}.jsonl"\n' for n, p in (("weak", 1), ("strong", 2))))
    out = tmp_path / "out"
    out.mkdir()
    levels = [{"name": "weak", "calibration_accuracy": 0.5, "n_items": 4},
              {"name": "strong", "calibration_accuracy": 0.75, "n_items": 4}]
    (out / "results.json").write_text(json.dumps(
        {"calibration": {"levels": levels}, "variants": {"jung": {}, "retrieval": {}}}))
    recs = [
        {"variant": "jung", "weak_correct": True, "strong_correct": None, "calls": [1, 0], "completion_tokens": [10, 0]},
        {"variant": "jung", "weak_correct": False, "strong_correct": True, "calls": [1, 1], "completion_tokens": [20, 100]},
        {"variant": "retrieval", "weak_correct": True, "strong_correct": None, "calls": [1, 0], "completion_tokens": [10, 0]},
        {"variant": "retrieval", "weak_correct": True, "strong_correct": None, "calls": [1, 0], "completion_tokens": [30, 0]},
    ]
    (out / "outcomes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = run_mod.summarise(out, cfg, "cmd", 60.0, "1.00", "2.00")
    assert text.startswith(run_mod.SECTION)
    assert "hold 6 real model calls" in text
    assert "| weak | 50% of 4 | 1/2 = 50% |" in text
    assert "| strong | 75% of 4 | 1/1 = 100% (deferred queries only) |" in text
    # jung: weak 2 calls + 30 tokens -> 2*1 + 30*0.1 = 5 s over 2 queries; strong 1 call + 100 tokens -> 11 s
    assert "| jung | 1.00 | 2.5 | 0.50 | 5.5 | 8.0 |" in text
    assert "| retrieval | 1.00 | 3.0 | 0.00 | 0.0 | 3.0 |" in text
