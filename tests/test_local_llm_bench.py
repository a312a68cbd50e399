"""bench/local_llm/run.py's report section: timing fitted from the response logs and the
per-policy model seconds it derives from an eval's outcomes (no model needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import pytest

from intercascade_core.models.chat import ChatModel
from intercascade_core.models.response_cache import ResponseCache

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
    per completion token + 0.01 s per prompt token (prompt tokens 100, 200, ...) on an
    injected clock."""
    counts = iter(token_counts)
    prompts = iter(range(100, 100 * (len(token_counts) + 1), 100))
    clock = [0.0]

    def server(request: httpx.Request) -> httpx.Response:
        n, p = next(counts), next(prompts)
        clock[0] += 1.0 + 0.1 * n + 0.01 * p
        return httpx.Response(200, json={
            "choices": [{"message": {"content": "Answer: 1"}, "finish_reason": "stop",
                         "logprobs": {"content": [{"token": "1", "logprob": -0.1}]}}],
            "usage": {"prompt_tokens": p, "completion_tokens": n}})

    import intercascade_core.models.response_cache as rc

    cache = ResponseCache(path, inner=httpx.MockTransport(server))
    with monkeypatch.context() as m:
        m.setattr(rc.time, "perf_counter", lambda: clock[0])
        model = ChatModel("http://m.test/v1", "m", client=httpx.Client(transport=cache), max_retries=0)
        for i in range(len(token_counts)):
            model.generate([{"role": "user", "content": f"q{i}"}], temperature=0)


def test_call_times_recovers_the_per_token_cost(run_mod, tmp_path, monkeypatch):
    log = tmp_path / "weak.jsonl"
    _fill_log(log, [10, 20, 40, 80, 5], monkeypatch)
    t = run_mod.call_times(log)
    assert t["calls"] == 5
    assert t["fit_a"] == pytest.approx(1.0, abs=1e-3) and t["fit_b"] == pytest.approx(0.1, abs=1e-4)
    assert t["fit_c"] == pytest.approx(0.01, abs=1e-5)
    assert run_mod.model_seconds(2, 30, 500, t) == pytest.approx(2 * 1.0 + 30 * 0.1 + 500 * 0.01, abs=1e-2)
    assert run_mod.call_times(tmp_path / "missing.jsonl") == {"calls": 0}


def test_summary_section_counts_calls_and_accuracy(run_mod, tmp_path, monkeypatch):
    for name, toks in (("weak", [10, 20, 30, 5]), ("strong", [50, 100, 150, 20])):
        _fill_log(tmp_path / f"{name}.jsonl", toks, monkeypatch)
    cfg = tmp_path / "c.toml"
    cfg.write_text("".join(
        f'[[models]]\nname = "{n}"\nbase_url = "http://127.0.0.1:{p}/v1"\nmodel = "{n}-m"\n'
        f'response_cache = "{n}.jsonl"\n' for n, p in (("weak", 1), ("strong", 2))))
    out = tmp_path / "out"
    out.mkdir()
    levels = [{"name": "weak", "calibration_accuracy": 0.5, "n_items": 4},
              {"name": "strong", "calibration_accuracy": 0.75, "n_items": 4}]
    teach = [levels[0], {"name": "strong", "calibration_accuracy": 0.25, "n_items": 4}]
    (out / "results.json").write_text(json.dumps(
        {"calibration": {"levels": levels}, "teach_calibration": {"levels": teach},
         "variants": {"jung": {}, "retrieval": {}}}))
    def rec(variant, weak_ok, strong_ok, calls, comp, prompt):
        return {"variant": variant, "weak_correct": weak_ok, "strong_correct": strong_ok, "calls": calls,
                "completion_tokens": comp, "tokens": [c + p for c, p in zip(comp, prompt, strict=False)]}

    recs = [
        rec("jung", True, None, [1, 0], [10, 0], [100, 0]),
        rec("jung", False, True, [1, 1], [20, 100], [100, 100]),
        rec("retrieval", True, None, [1, 0], [10, 0], [300, 0]),
        rec("retrieval", True, False, [1, 1], [30, 0], [300, 0]),  # a strong call that failed: no tokens
    ]
    (out / "outcomes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = run_mod.summarise(out, cfg, "cmd", 60.0, "1.00", "2.00")
    assert text.startswith(run_mod.SECTION)
    assert "hold 8 real model calls" in text
    assert "| weak | 50% of 4 | 1/2 = 50% (jung) |" in text
    assert "| strong | 75% of 4 | 1/1 = 100% (jung, deferred queries only) |" in text
    assert "| strong, answer-and-strategy prompt | 25% of 4 | 0/1 = 0% (retrieval, deferred queries only) |" in text
    # jung: weak 2 calls, 30 completion and 200 prompt tokens -> 2 + 3 + 2 = 7 s over 2 queries;
    # strong 1 call, 100 + 100 tokens -> 1 + 10 + 1 = 12 s. retrieval: weak 2 + 4 + 6 = 12 s
    assert "| jung | 1.00 | 3.5 | 0.50 | 6.0 | 9.5 |" in text
    # strong: one call with no tokens -> a = 1 s over 2 queries
    assert "| retrieval | 1.00 | 6.0 | 0.50 | 0.5 | 6.5 |" in text
