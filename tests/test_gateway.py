"""`intercascade serve` as a real process on 127.0.0.1, driven by the official `openai` SDK
(sync and async, plain and streamed): answers, the decision fields and headers, usage,
tenants, error objects, restart, the audit, and equality with `run_stream`.

Every server is a subprocess on a free port, waited for with bounded waits and always
stopped in teardown (SIGTERM, then SIGKILL if it does not exit)."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from intercascade_core.core.cascade import run_stream
from intercascade_core.gateway.demo import (
    demo_calibration,
    demo_config,
    demo_levels,
    demo_problems,
)
from intercascade_core.gateway.keys import hash_key
from intercascade_core.gateway.protocol import decision, usage_of
from intercascade_core.models.sim import SimBackend

START_TIMEOUT_S = 120  # MiniLM loads and the demo calibrates (seconds on a loaded machine)
STOP_TIMEOUT_S = 60


class Server:
    """One `intercascade serve` process; ``url`` is its ``.../v1`` base URL."""

    def __init__(self, *args: str, store: Path, log: Path) -> None:
        # a run launched as a background job has SIGINT ignored, which exec inherits: start
        # the child with the default action so that its own handler is installed
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.log = log
            self._err = open(log, "w")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "intercascade_core", "serve", "--port", "0",
                 "--store", str(store), *args],
                stdout=subprocess.PIPE, stderr=self._err, text=True,
            )
        finally:
            signal.signal(signal.SIGINT, previous)
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        out = self.proc.stdout
        threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            self.stop(signal.SIGKILL)
            pytest.fail(f"serve did not start within {START_TIMEOUT_S}s: {self.stderr()[-3000:]}")
        assert "listening on http://127.0.0.1:" in line, line + self.stderr()
        self.url = line.split("listening on ")[1].split()[0]
        self.root = self.url.removesuffix("/v1")
        self._clients: list[openai.OpenAI] = []

    def stderr(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        for client in getattr(self, "_clients", ()):
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
                pytest.fail(f"serve did not stop within {STOP_TIMEOUT_S}s of signal {sig}")
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()
        return self.proc.returncode

    def client(self, key: str = "no-key-needed") -> openai.OpenAI:
        """An SDK client, closed when the server stops (no socket outlives a test)."""
        client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)
        self._clients.append(client)
        return client

    def aclient(self, key: str = "no-key-needed") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.root + "/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def run(*args: str, store: Path | None = None) -> Server:
        s = Server(*args, store=store or tmp_path / f"store{len(servers)}",
                   log=tmp_path / f"serve{len(servers)}.log")
        servers.append(s)
        return s

    yield run
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One hashing-embedder demo server for the tests that need no fresh state."""
    tmp = tmp_path_factory.mktemp("shared")
    server = Server("--demo", "--embedder", "hashing", store=tmp / "store", log=tmp / "serve.log")
    yield server
    assert server.stop(signal.SIGINT) == 0  # SIGINT drains like SIGTERM


def ask(client: openai.OpenAI, text: str, **kw: Any) -> tuple[Any, dict[str, Any], Any]:
    raw = client.chat.completions.with_raw_response.create(
        model="intercascade", messages=[{"role": "user", "content": text}], **kw)
    completion = raw.parse()
    return completion, completion.model_extra["intercascade"], raw.headers


# ----------------------------------------------------------------------------- answers
def test_sdk_answers_with_decision_usage_and_headers_and_equals_run_stream(start: Any) -> None:
    """Sequential requests through the gateway give exactly run_stream's outcomes over the
    same stream, levels, calibration and embedder (MiniLM, the demo's default)."""
    server = start("--demo")
    client = server.client()
    queries = demo_problems(30, seed=21)
    served = []
    for q in queries:
        completion, ext, headers = ask(client, q.text, extra_body={
            "intercascade": {"query_id": q.id}})
        served.append((completion, ext, headers))

    from intercascade_core.models.minilm import MiniLMEmbedder

    backend = SimBackend(seed=0)
    levels = demo_levels(backend)
    config = demo_config()
    cals = demo_calibration(levels, config=config)
    ref = run_stream(queries, levels, MiniLMEmbedder(), calibrations=cals, config=config,
                     progress=False)
    names = [lv.name for lv in levels]
    thresholds = [c.threshold for c in cals]
    for (completion, ext, headers), out in zip(served, ref.outcomes, strict=True):
        expected = decision(out, names, thresholds)
        assert {k: v for k, v in ext.items() if k not in ("id", "timing_ms")} == expected
        assert ext["timing_ms"]["total"] >= ext["timing_ms"]["model"] > 0
        assert completion.usage.model_dump(exclude_none=True) == usage_of(out)
        assert completion.model == "intercascade" and completion.id == ext["id"]
        assert completion.choices[0].finish_reason == "stop"
        assert completion.choices[0].message.content.splitlines()[-1].startswith("Answer: ")
        assert headers["x-intercascade-level"] == str(ext["level"])
        assert headers["x-intercascade-model"] == ext["model"]
        assert headers["x-intercascade-deferred"] == str(ext["deferred"]).lower()
        assert headers["x-intercascade-strategy-stored"] == str(ext["strategy_stored"]).lower()
        assert headers["x-intercascade-strategies-shown"] == str(len(ext["strategies_shown"]))
        assert float(headers["x-intercascade-confidence"]) == pytest.approx(ext["confidence"], rel=1e-5)
    kinds = {(e["level"], e["strategy_stored"], bool(e["strategies_shown"])) for _, e, _ in served}
    assert (1, True, False) in kinds or (1, True, True) in kinds  # the strong level taught
    assert any(lvl == 0 and shown for lvl, _, shown in kinds)  # the weak level used strategies
    m = server.metrics()
    assert m['intercascade_requests_total{endpoint="chat",status="200"}'] == 30
    accepted = sum(v for k, v in m.items() if k.startswith("intercascade_level_accepted_total"))
    assert accepted == sum(o.status == "accepted" for o in ref.outcomes)
    assert m['intercascade_repository_entries{level="0",model="sim-weak",tenant="default"}'] == len(
        ref.state.repositories[0])
    assert server.stop() == 0


def test_sdk_async_and_streamed(shared: Server) -> None:
    server = shared
    queries = demo_problems(12, seed=5)

    async def run() -> None:
        client = server.aclient()
        results = await asyncio.gather(*(client.chat.completions.create(
            model="intercascade", messages=[{"role": "user", "content": q.text}])
            for q in queries[:8]))
        assert len({r.id for r in results}) == 8
        indexes = {r.model_extra["intercascade"]["outcome_index"] for r in results}
        assert len(indexes) == 8  # every request has its own outcome
        stream = await client.chat.completions.create(
            model="intercascade", messages=[{"role": "user", "content": queries[8].text}],
            stream=True, stream_options={"include_usage": True})
        text, usage, ext = [], None, None
        async for chunk in stream:
            if chunk.model_extra.get("intercascade"):
                ext = chunk.model_extra["intercascade"]
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        assert ext is not None and ext["outcome_index"] > max(indexes)
        assert "".join(text).strip().splitlines()[-1].startswith("Answer: ")
        assert usage is not None and usage.total_tokens > 0
        await client.close()

    asyncio.run(run())
    client = server.client()
    with client.chat.completions.with_streaming_response.create(
        model="intercascade", messages=[{"role": "user", "content": queries[9].text}],
        stream=True,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-intercascade-status"] in ("accepted", "discarded")
        lines = [x for x in response.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    plain = client.chat.completions.create(
        model="intercascade", messages=[{"role": "user", "content": queries[10].text}],
        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
    # a level called directly, plain and streamed; the model list names all three
    direct = client.chat.completions.create(
        model="sim-weak", messages=[{"role": "user", "content": "Problem: " + queries[11].text}])
    assert direct.model == "sim-weak" and direct.model_extra["intercascade"]["direct"] is True
    assert [m.id for m in client.models.list()] == ["intercascade", "sim-weak", "sim-strong"]
    assert httpx.get(server.root + "/healthz", timeout=10).json()["status"] == "ok"


# ----------------------------------------------------------------------------- errors
def test_errors_are_openai_error_objects(shared: Server) -> None:
    server = shared
    client = server.client()

    def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
        body = exc.response.json()
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in exc.response.text
        return dict(body["error"])

    with pytest.raises(openai.BadRequestError) as e400:
        client.chat.completions.create(model="intercascade", temperature=0.7,
                                       messages=[{"role": "user", "content": "hi"}])
    assert error_of(e400.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e400b:
        client.chat.completions.create(model="intercascade", messages=[
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert error_of(e400b.value)["code"] == "unsupported_messages"
    with pytest.raises(openai.NotFoundError) as e404:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert error_of(e404.value)["code"] == "model_not_found"
    url = server.url + "/chat/completions"
    for body, status, param in [
        (b"{broken", 400, None),
        (b'{"model": "intercascade"}', 400, "messages"),
        (b'{"model": "intercascade", "messages": [{"role": "user", "content": 5}]}', 400,
         "messages[0].content"),
        (b'{"model": "intercascade", "messages": []}', 400, "messages"),
    ]:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    big = json.dumps({"model": "intercascade",
                      "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    r = httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e413:  # the SDK sees the same
        client.chat.completions.create(model="intercascade",
                                       messages=[{"role": "user", "content": "y" * (1 << 20)}])
    assert e413.value.status_code == 413 and error_of(e413.value)["code"] == "request_too_large"
    r = httpx.get(server.url + "/nowhere", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(url, timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    m = server.metrics()
    assert m['intercascade_errors_total{endpoint="chat",type="unsupported_parameter"}'] >= 1
    assert m['intercascade_errors_total{endpoint="chat",type="request_too_large"}'] >= 2
    # the server still serves after all that
    assert ask(client, demo_problems(1, seed=2)[0].text)[1]["status"] in ("accepted", "discarded")


def test_without_keys_another_host_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "intercascade_core", "serve", "--demo", "--host", "0.0.0.0",
         "--port", "0", "--store", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "refusing to listen on '0.0.0.0' without --keys" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- tenants
def test_tenants_are_isolated_and_need_a_key(start: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{hash_key('key-a')} team-a\n{hash_key('key-b')} team-b\n")
    server = start("--demo", "--embedder", "hashing", "--keys", str(keys))
    a, b = server.client("key-a"), server.client("key-b")
    with pytest.raises(openai.AuthenticationError) as e401:
        server.client("key-c").chat.completions.create(
            model="intercascade", messages=[{"role": "user", "content": "hi"}])
    assert e401.value.response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("key-c").models.list()
    r = httpx.post(server.url + "/chat/completions", json={"model": "intercascade"}, timeout=10)
    assert r.status_code == 401  # no Authorization header at all

    # rows are numbered in commit order: team-a's strategies take rows [0, stored_a)
    queries = demo_problems(40, seed=9)
    stored_a = sum(ask(a, q.text)[1]["strategy_stored"] for q in queries[:20])
    assert stored_a > 0
    stored_b = 0
    for q in queries[20:]:  # the same templates: a's strategies would match, b never sees them
        _, ext, _ = ask(b, q.text)
        shown = [s["entry_id"] for s in ext["strategies_shown"]]
        assert all(row >= stored_a for row in shown) and len(shown) <= stored_b
        stored_b += ext["strategy_stored"]
    assert stored_b > 0
    _, ext_a, _ = ask(a, queries[0].text)
    assert ext_a["strategies_shown"] and all(
        s["entry_id"] < stored_a for s in ext_a["strategies_shown"])
    m = server.metrics()
    assert m['intercascade_repository_entries{level="0",model="sim-weak",tenant="team-a"}'] >= stored_a
    assert m['intercascade_repository_entries{level="0",model="sim-weak",tenant="team-b"}'] == stored_b
    # feedback on another tenant's completion is unknown to it
    r = httpx.post(server.url + "/feedback", json={"id": ext_a["id"], "correct": True},
                   headers={"authorization": "Bearer key-b"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ----------------------------------------------------------------------------- state
def test_sigterm_finishes_requests_in_flight_and_restart_keeps_the_strategies(
    start: Any, tmp_path: Path
) -> None:
    """SIGTERM under load: the requests in flight are answered, the server exits 0, and
    a restart on the same store serves every strategy an answered request stored."""
    store = tmp_path / "kept"
    first = start("--demo", "--embedder", "hashing", store=store)
    queries = demo_problems(60, seed=13)
    stored = sum(ask(first.client(), q.text)[1]["strategy_stored"] for q in queries[:20])
    assert stored > 0
    results: list[Any] = []

    async def flood() -> None:
        client = first.aclient()
        tasks = [asyncio.create_task(client.chat.completions.create(
            model="intercascade", messages=[{"role": "user", "content": q.text}]))
            for q in queries[20:50]]
        # once one answer is back the others are being served: stop the server now
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED, timeout=60)
        first.proc.send_signal(signal.SIGTERM)
        results.extend(await asyncio.gather(*tasks, return_exceptions=True))
        await client.close()

    asyncio.run(flood())
    assert first.stop() == 0
    assert "Application shutdown complete" in first.stderr()
    answered = [r for r in results if not isinstance(r, BaseException)]
    # a request is answered, or was never taken in (its connection refused or closed)
    assert all(isinstance(r, openai.APIConnectionError) for r in results if r not in answered)
    assert len(answered) > 1, "requests in flight at SIGTERM must still be answered"
    stored += sum(r.model_extra["intercascade"]["strategy_stored"] for r in answered)

    second = start("--demo", "--embedder", "hashing", store=store)
    kept = second.metrics()['intercascade_repository_entries{level="0",model="sim-weak",tenant="default"}']
    assert kept == stored  # nothing acknowledged was lost, nothing else was stored
    shown = [ask(second.client(), q.text)[1]["strategies_shown"] for q in queries[50:]]
    assert any(shown)  # the restarted server retrieves what the first one stored


def test_feedback_moves_the_audit_and_an_alarm_stops_the_weak_level(start: Any, tmp_path: Path) -> None:
    store = tmp_path / "audited"
    server = start("--demo", "--embedder", "hashing", "--audit-every", "5", store=store)
    client = server.client()
    weak_ids, other_ids = [], []
    for q in demo_problems(200, seed=17):
        _, ext, _ = ask(client, q.text)
        (weak_ids if ext["level"] == 0 and ext["accepted"] else other_ids).append(ext["id"])
        if len(weak_ids) >= 6 and other_ids:
            break
    assert len(weak_ids) >= 6

    def feedback(cid: str, correct: bool) -> httpx.Response:
        return httpx.post(server.url + "/feedback", json={"id": cid, "correct": correct}, timeout=30)

    r = feedback(weak_ids[0], False)
    assert r.status_code == 200 and r.json()["audited"] and r.json()["audit"]["n_labels"] == 1
    assert server.metrics()['intercascade_audit_labels{level="0",model="sim-weak"}'] == 1
    assert feedback(weak_ids[0], True).status_code == 409
    other = feedback(other_ids[0], True)
    assert other.status_code == 200 and other.json()["audited"] is False
    assert feedback("chatcmpl-unknown", True).status_code == 404
    # five wrong labels at alpha = 0.2: P(Bin(5, 0.2) >= 5) = 3.2e-4 < delta_1 = 0.03
    for cid in weak_ids[1:5]:
        assert feedback(cid, False).status_code == 200
    m = server.metrics()
    assert m['intercascade_audit_alarm{level="0",model="sim-weak"}'] == 1
    assert m['intercascade_threshold{level="0",model="sim-weak"}'] == float("inf")
    assert "risk alarm at level 0 (sim-weak)" in server.stderr()
    later = [ask(client, q.text)[1] for q in demo_problems(20, seed=18)]
    assert all(e["level"] != 0 and e["deferred"] for e in later)
    assert all(e["levels"][0]["threshold"] is None for e in later)  # abstains
    # the alarm holds across a restart under the same calibration
    assert server.stop() == 0
    again = start("--demo", "--embedder", "hashing", "--audit-every", "5", store=store)
    assert again.metrics()['intercascade_audit_alarm{level="0",model="sim-weak"}'] == 1
    assert all(ask(again.client(), q.text)[1]["level"] != 0 for q in demo_problems(5, seed=19))


# ----------------------------------------------------------------------------- configured
CONFIG = """
[cascade]
alpha = 0.2
delta = 0.1
backend = "numpy"
[embedder]
kind = "hashing"
[[models]]
name = "weak"
base_url = "sim:weak"
model = "sim-weak"
[[models]]
name = "strong"
base_url = "sim:strong"
model = "sim-strong"
confidence_span = "answer"
"""


def _save_calibration(config_file: Path, out: Path, model_ids: list[str] | None = None) -> None:
    """Calibrate the configured (simulated) levels as `run --save-calibration` does."""
    import httpx as _httpx

    from intercascade_core.core.cascade import CascadeConfig, calibrate_levels
    from intercascade_core.lab.config import load_config
    from intercascade_core.lab.evaluate import make_levels
    from intercascade_core.storage.calibration_file import save_calibration

    cfg = load_config(config_file)
    config = CascadeConfig(policy=cfg.cascade.policy, k=cfg.cascade.k,  # type: ignore[arg-type]
                           backend=cfg.cascade.backend, seed=cfg.cascade.seed)
    with _httpx.Client(transport=SimBackend(seed=cfg.cascade.seed).transport()) as client:
        levels = make_levels(cfg.models, sim_client=client)
        run = calibrate_levels(demo_problems(300, seed=99), levels, alpha=cfg.cascade.alpha,
                               delta=cfg.cascade.delta, config=config)
    save_calibration(out, run, model_ids=model_ids or [m.model for m in cfg.models],
                     level_names=[m.name for m in cfg.models], config=config)


def test_config_and_saved_calibration(start: Any, tmp_path: Path, jung_fallback_copy: Any) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    calibration = tmp_path / "calibration.json"
    _save_calibration(config, calibration)
    server = start("--config", str(config), "--calibration", str(calibration))
    assert [m.id for m in server.client().models.list()] == ["intercascade", "weak", "strong"]
    _, ext, headers = ask(server.client(), demo_problems(1, seed=4)[0].text)
    assert ext["model"] in ("weak", "strong") and headers["x-intercascade-model"] == ext["model"]
    assert "not certified" not in server.stderr()
    assert server.metrics()['intercascade_calibration_guaranteed{level="0",model="weak"}'] == 1
    fallback = tmp_path / "fallback.json"  # Jung's fallback serves, and the log says it is not certified
    jung_fallback_copy(calibration, fallback)
    warned = start("--config", str(config), "--calibration", str(fallback))
    assert [m.id for m in warned.client().models.list()] == ["intercascade", "weak", "strong"]
    assert "not certified (on_fail='jung'): level weak: first test failed" in warned.stderr()
    m = warned.metrics()
    assert m['intercascade_calibration_guaranteed{level="0",model="weak"}'] == 0
    assert m['intercascade_calibration_guaranteed{level="1",model="strong"}'] == 1

    other = tmp_path / "other.json"
    _save_calibration(config, other, model_ids=["gpt-4o-mini", "gpt-4o"])
    proc = subprocess.run(
        [sys.executable, "-m", "intercascade_core", "serve", "--config", str(config),
         "--calibration", str(other), "--port", "0", "--store", str(tmp_path / "s2")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "gpt-4o-mini" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "expect"), [
    (["--demo", "--keys", "/nonexistent/keys"], "cannot read the keys file"),
    (["--demo", "--port", "70000"], "expected an integer in [0, 65535]"),
    (["--demo", "--calibration", "c.json"], "--calibration applies to --config"),
    (["--config", "c.toml"], "--calibration"),
])
def test_bad_serve_arguments_are_one_line_usage_errors(
    tmp_path: Path, args: list[str], expect: str
) -> None:
    proc = subprocess.run([sys.executable, "-m", "intercascade_core", "serve", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
