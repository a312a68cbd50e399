"""The gateway's parts in-process: the service's async driver, the async chat client, the
embedding batcher, the keys file, the wire format, the audit book and the deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from intercascade_core.core.audit import apply_alarm
from intercascade_core.core.calibrate import Calibration
from intercascade_core.core.cascade import Level, perform, run_stream
from intercascade_core.core.machine import Ask, Call
from intercascade_core.core.protocols import Generation
from intercascade_core.errors import (
    AuthenticationError,
    CorruptStoreError,
    DeadlineExceeded,
    InvalidArgumentError,
    LogprobsUnavailable,
    MalformedResponse,
    ModelError,
    RetriesExhausted,
    ServiceClosedError,
)
from intercascade_core.gateway.audit import AuditBook
from intercascade_core.gateway.batching import EmbedBatcher
from intercascade_core.gateway.demo import (
    demo_async_levels,
    demo_calibration,
    demo_config,
    demo_levels,
    demo_problems,
)
from intercascade_core.gateway.engine import AsyncLevel, Gateway
from intercascade_core.gateway.keys import hash_key, load_keys
from intercascade_core.gateway.protocol import (
    MAX_DEPTH,
    RequestError,
    chunks,
    decision,
    parse_chat_request,
    parse_feedback,
    usage_of,
    without_strategy,
)
from intercascade_core.models.async_chat import AsyncChatModel
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import Faults, SimBackend
from intercascade_core.service import Cascade

MODELS = ("intercascade", "sim-weak", "sim-strong")


@pytest.fixture(scope="module")
def demo() -> tuple[SimBackend, tuple[Level, ...], tuple[Calibration, ...]]:
    backend = SimBackend(seed=0)
    levels = demo_levels(backend)
    return backend, levels, demo_calibration(levels)


def _body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"model": "intercascade",
                            "messages": [{"role": "user", "content": "Mia has 3 apples."}]}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


# ----------------------------------------------------------------------------- the service
def _async_perform(levels: Sequence[Level], embedder: HashingEmbedder) -> Any:
    async def run(call: Call) -> object:
        await asyncio.sleep(0)  # a real suspension point between requests
        return perform(call, levels, embedder)

    return run


@pytest.mark.parametrize("off_loop", [False, True])
def test_aask_makes_the_decisions_and_commits_of_ask(demo: Any, off_loop: bool) -> None:
    _, levels, cals = demo
    queries = demo_problems(60, seed=11)
    emb = HashingEmbedder(384)
    config = demo_config()
    sync = Cascade(levels, emb, calibrations=cals, config=config)
    async_ = Cascade(levels, emb, calibrations=cals, config=config)
    expected = [sync.ask(q) for q in queries]

    async def drive() -> list[Any]:
        return [await async_.aask(q, perform=_async_perform(levels, emb),
                                  retrieve_off_loop=off_loop) for q in queries]

    got = asyncio.run(drive())
    assert got == expected
    assert any(o.stored_in for o in got) and any(o.level == 0 for o in got)  # both paths taken
    assert async_.state.counters == sync.state.counters
    a, b = async_.state.repositories[0], sync.state.repositories[0]
    assert list(a.entries) == list(b.entries) and np.array_equal(a.vectors, b.vectors)
    # and both equal the pure fold over the same stream
    ref = run_stream(queries, levels, emb, calibrations=cals, config=config, progress=False)
    assert list(ref.outcomes) == got


def test_aask_retrieves_on_its_own_pool_while_the_commit_pool_is_busy(demo: Any) -> None:
    """A retrieval never queues behind commits (here: a commit pool whose one thread is
    taken); the commit itself then waits for that pool."""
    from concurrent.futures import ThreadPoolExecutor

    _, levels, cals = demo
    emb = HashingEmbedder(384)
    cascade = Cascade(levels, emb, calibrations=cals, config=demo_config())
    for p in demo_problems(40, seed=6):  # strategies to retrieve: the row is fed
        cascade.ask(p)
    assert len(cascade.state.repositories[0]) > 0
    commits = ThreadPoolExecutor(1, thread_name_prefix="commit")
    retrievals = ThreadPoolExecutor(1, thread_name_prefix="retrieve")
    release = threading.Event()
    commits.submit(release.wait, 30)  # the commit pool's only thread is busy
    (q,) = demo_problems(1, seed=5)
    called = asyncio.Event()
    base = _async_perform(levels, emb)

    async def perform_(call: Call) -> object:
        if isinstance(call, Ask):  # a model call: the row was fed, retrieval is done
            called.set()
        return await base(call)

    async def scenario() -> Any:
        task = asyncio.create_task(cascade.aask(
            q, perform=perform_, executor=commits, retrieve_off_loop=True,
            retrieve_executor=retrievals))
        await asyncio.wait_for(called.wait(), 30)  # not behind the busy commit pool
        assert not task.done()  # its commit waits for the pool
        release.set()
        return await task

    try:
        out = asyncio.run(scenario())
    finally:
        release.set()
        commits.shutdown()
        retrievals.shutdown()
    assert out.query_id == q.id and cascade.state.n_queries == 41 and out.strategies[0]


def test_aask_cancelled_before_its_commit_leaves_no_trace(demo: Any) -> None:
    _, levels, cals = demo
    emb = HashingEmbedder(384)
    cascade = Cascade(levels, emb, calibrations=cals)
    q1, q2 = demo_problems(2, seed=3)
    blocked = asyncio.Event()

    async def stuck(call: Call) -> object:
        blocked.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def scenario() -> Any:
        task = asyncio.create_task(cascade.aask(q1, perform=stuck))
        await blocked.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await cascade.aask(q2, perform=_async_perform(levels, emb))

    out = asyncio.run(scenario())
    assert cascade.state.n_queries == 1 and out.query_id == q2.id


def test_finish_refuses_a_done_that_is_not_its_machines(demo: Any) -> None:
    _, levels, cals = demo
    emb = HashingEmbedder(384)
    cascade = Cascade(levels, emb, calibrations=cals)
    a, b = (cascade.begin(q) for q in demo_problems(2, seed=4))
    from intercascade_core.core.cascade import drive

    done_b = drive(b.machine, levels, emb)
    with pytest.raises(InvalidArgumentError, match="done"):
        cascade.finish(a, done_b)
    assert cascade.finish(b, done_b).index == 1


def test_replace_calibrations_stops_a_level_from_accepting(demo: Any) -> None:
    _, levels, cals = demo
    emb = HashingEmbedder(384)
    cascade = Cascade(levels, emb, calibrations=cals)
    queries = demo_problems(40, seed=8)
    before = [cascade.ask(q) for q in queries[:20]]
    assert any(o.level == 0 for o in before)
    abstain = [dataclasses.replace(cals[0], threshold=math.inf), *cals[1:]]
    state = cascade.replace_calibrations(abstain)
    assert state.thresholds[0] == math.inf and len(state.repositories[0]) == len(
        cascade.repositories[0])
    after = [cascade.ask(q) for q in queries[20:]]
    assert all(o.level != 0 for o in after)
    with pytest.raises(InvalidArgumentError, match="calibrations"):
        cascade.replace_calibrations(cals[:1])


# ----------------------------------------------------------------------------- async chat
def _pair(backend: SimBackend, **kw: Any) -> tuple[ChatModel, AsyncChatModel, httpx.AsyncClient]:
    sync = ChatModel("http://sim.invalid/v1", "sim-weak", client=httpx.Client(
        transport=backend.transport()), sleep=lambda s: None, **kw)
    aclient = httpx.AsyncClient(transport=httpx.MockTransport(backend.handler()))

    async def no_sleep(_s: float) -> None:
        return None

    return sync, AsyncChatModel("http://sim.invalid/v1", "sim-weak", client=aclient,
                                sleep=no_sleep, **kw), aclient


def _outcome(call: Any) -> Generation | str:
    try:
        return call()
    except ModelError as e:
        return type(e).__name__


def test_async_chat_model_gives_what_the_sync_model_gives() -> None:
    # transient 429/500 are retried, persistent malformed bodies and missing logprobs are
    # typed errors: the async client must end every request exactly as the sync one does
    faults = Faults(rate_429=0.15, rate_500=0.15, rate_malformed=0.1, rate_missing_logprobs=0.1)
    sync, _, _ = _pair(SimBackend(seed=2, faults=faults))
    _, amodel, aclient = _pair(SimBackend(seed=2, faults=faults))  # its own fault memory
    prompts = [[{"role": "user", "content": f"Problem: {q.text}"}] for q in demo_problems(40, seed=1)]
    expected = [_outcome(lambda p=p: sync.generate(p, temperature=0)) for p in prompts]

    async def run() -> list[Generation | str]:
        out: list[Generation | str] = []
        for p in prompts:
            try:
                out.append(await amodel.generate(p, temperature=0))
            except ModelError as e:
                out.append(type(e).__name__)
        await aclient.aclose()
        return out

    got = asyncio.run(run())
    assert got == expected
    kinds = {g if isinstance(g, str) else "ok" for g in got}
    assert {"ok", MalformedResponse.__name__, LogprobsUnavailable.__name__} <= kinds


def test_async_chat_model_errors_are_typed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != "Bearer good-key":
            return httpx.Response(401, json={"error": {"message": "bad key"}})
        return httpx.Response(503, json={"error": {"message": "busy"}})

    async def run() -> list[str]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        kinds = []
        for key in ("wrong-key", "good-key"):
            m = AsyncChatModel("http://x.invalid/v1", "m", api_key=key, client=client,
                               max_retries=2, backoff_base=0.0)
            try:
                await m.generate([{"role": "user", "content": "hi"}])
            except ModelError as e:
                kinds.append(type(e).__name__)
                assert key not in str(e)
        await client.aclose()
        return kinds

    assert asyncio.run(run()) == [AuthenticationError.__name__, RetriesExhausted.__name__]


def test_async_chat_model_deadline_cuts_a_stalled_reply() -> None:
    async def stall(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200)

    async def run() -> float:
        client = httpx.AsyncClient(transport=httpx.MockTransport(stall))
        m = AsyncChatModel("http://x.invalid/v1", "m", client=client, timeout=5, deadline=0.2)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await m.generate([{"role": "user", "content": "hi"}])
        await client.aclose()
        return time.monotonic() - t0

    assert asyncio.run(run()) < 2.0


# ----------------------------------------------------------------------------- batching
class _CountingEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__(64)
        self.calls: list[int] = []
        self.threads: set[str] = set()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        self.threads.add(threading.current_thread().name)
        time.sleep(0.005)  # a batch takes time, so later requests queue behind it
        return super().embed(texts)


@pytest.mark.parametrize("enabled", [True, False])
def test_batcher_rows_equal_single_embeddings_and_batches_form(enabled: bool) -> None:
    emb = _CountingEmbedder()
    batcher = EmbedBatcher(emb, max_batch=32, max_wait_s=0.005, enabled=enabled)
    texts = [f"problem number {i}" for i in range(100)]

    async def run() -> list[np.ndarray]:
        return list(await asyncio.gather(*(batcher.embed(t) for t in texts)))

    rows = asyncio.run(run())
    batcher.close()
    ref = HashingEmbedder(64).embed(texts)
    assert all(np.array_equal(r, ref[i]) for i, r in enumerate(rows))
    assert sum(emb.calls) == 100 and emb.threads == {"embed-batcher"}
    if enabled:
        assert max(emb.calls) > 1 and len(emb.calls) < 100 and max(emb.calls) <= 32
    else:
        assert emb.calls == [1] * 100
    assert batcher.stats.texts == 100 and batcher.stats.batches == len(emb.calls)


def test_batcher_failure_reaches_every_waiter_and_close_refuses() -> None:
    class Broken(HashingEmbedder):
        def embed(self, texts: Sequence[str]) -> np.ndarray:
            raise RuntimeError("onnx exploded")

    batcher = EmbedBatcher(Broken(8), max_wait_s=0.01)

    async def run() -> list[object]:
        return list(await asyncio.gather(*(batcher.embed(str(i)) for i in range(5)),
                                         return_exceptions=True))

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(run()))
    batcher.close()
    with pytest.raises(ServiceClosedError):
        asyncio.run(batcher.embed("late"))


# ----------------------------------------------------------------------------- keys
def test_keys_file_maps_hashes_to_tenants(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# comment\n{hash_key('k-a')}  team-a\n\n{hash_key('k-b')} team-b # two\n"
                 f"{hash_key('k-a2')} team-a\n")
    ring = load_keys(f)
    assert hash_key("k-a") == hashlib.sha256(b"k-a").hexdigest()
    assert ring.tenant("Bearer k-a") == "team-a" and ring.tenant("bearer  k-a2") == "team-a"
    assert ring.tenant("Bearer k-b") == "team-b"
    assert ring.tenant(None) is None and ring.tenant("Bearer nope") is None
    assert ring.tenant("Basic k-a") is None and ring.tenant("Bearer " + "x" * 10_000) is None
    assert ring.tenant_names == ("team-a", "team-b")


@pytest.mark.parametrize(("text", "match"), [
    ("", "no key entries"),
    ("k-a team-a\n", "64 hex digits"),
    (f"{hash_key('a')} team a\n", "expected 'SHA256HEX TENANT'"),
    (f"{hash_key('a')} te@m\n", "tenant"),
    (f"{hash_key('a')} one\n{hash_key('a')} two\n", "already names"),
])
def test_bad_keys_files_name_the_line(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "keys"
    f.write_text(text)
    with pytest.raises(InvalidArgumentError, match=match):
        load_keys(f)


# ----------------------------------------------------------------------------- wire format
@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"\xff\xfe", 400, None),
    (b"[1, 2]", 400, None),
    (b"[" * (MAX_DEPTH + 5) + b"]" * (MAX_DEPTH + 5), 400, None),
    (_body(messages=...), 400, "messages"),
    (_body(messages=[]), 400, "messages"),
    (_body(messages="hi"), 400, "messages"),
    (_body(messages=[{"role": "user", "content": 3}]), 400, "messages[0].content"),
    (_body(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    (_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content"),
    (_body(model=...), 400, "model"),
    (_body(model="gpt-4o"), 404, "model"),
    (_body(temperature=0.2), 400, "temperature"),
    (_body(tools=[]), 400, "tools"),
    (_body(stream="yes"), 400, "stream"),
    (_body(stream_options={"include_usage": True}), 400, "stream_options"),
    (_body(n=2), 400, "n"),
    (_body(intercascade={"family": "poetry"}), 400, "intercascade.family"),
])
def test_bad_requests_are_refused_with_the_parameter_named(body: bytes, status: int,
                                                            param: str | None) -> None:
    with pytest.raises(RequestError) as info:
        parse_chat_request(body, MODELS)
    assert info.value.status == status and info.value.param == param
    err = info.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_a_good_request_and_its_problem() -> None:
    req = parse_chat_request(_body(stream=True, stream_options={"include_usage": True},
                                   intercascade={"family": "math", "query_id": "q1"}), MODELS)
    assert (req.stream, req.include_usage, req.query_id) == (True, True, "q1")
    assert req.problem() == "Mia has 3 apples."
    parts = parse_chat_request(_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Mia has "}, {"type": "text", "text": "3 apples."}]}]), MODELS)
    assert parts.problem() == "Mia has 3 apples."
    two = parse_chat_request(_body(messages=[{"role": "system", "content": "be nice"},
                                             {"role": "user", "content": "x"}]), MODELS)
    with pytest.raises(RequestError, match="exactly one 'user' message"):
        two.problem()
    assert parse_feedback(b'{"id": "chatcmpl-1", "correct": false}') == ("chatcmpl-1", False)
    for bad in (b'{"id": "c"}', b'{"id": "c", "correct": 1}', b'{"id": 3, "correct": true}'):
        with pytest.raises(RequestError):
            parse_feedback(bad)


def test_decision_and_stream_chunks(demo: Any) -> None:
    _, levels, cals = demo
    res = run_stream(demo_problems(30, seed=5), levels, HashingEmbedder(384), calibrations=cals,
                     progress=False)
    names = [lv.name for lv in levels]
    thresholds = [c.threshold for c in cals]
    for out in res.outcomes:
        d = decision(out, names, thresholds)
        assert d["accepted"] == (out.status == "accepted")
        assert d["deferred"] == (out.level != 0)
        assert len(d["strategies_shown"]) == sum(len(s) for s in out.strategies)
        if d["accepted"]:
            assert d["confidence"] >= d["threshold"]
        u = usage_of(out)
        assert u["total_tokens"] == sum(x.tokens for x in (*out.usage, *out.teach_usage)) > 0
    text = "Solution: add them, one by one, then check\nthe total twice please.\nAnswer: 3"
    events = list(chunks("c1", 0, "intercascade", text, {"total_tokens": 7}, {"x": 1}))
    assert events[-1] == b"data: [DONE]\n\n"
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant" and objs[0]["intercascade"] == {"x": 1}
    sent = [o["choices"][0]["delta"].get("content", "") for o in objs if o["choices"]]
    assert "".join(sent) == text and len([x for x in sent if x]) == 2  # 8 words a chunk
    assert objs[-2]["choices"][0]["finish_reason"] == "stop"
    assert objs[-1]["choices"] == [] and objs[-1]["usage"] == {"total_tokens": 7}


def test_the_strategy_section_is_not_the_clients() -> None:
    reply = "Solution: 2 + 1\nAnswer: 3\nStrategy: count the parts, then add.\n"
    assert without_strategy(reply) == "Solution: 2 + 1\nAnswer: 3"
    middle = "Solution: s\n**Strategy:** add\nmore words\nAnswer: 4"
    assert without_strategy(middle) == "Solution: s\nAnswer: 4"
    assert without_strategy("Answer: 5") == "Answer: 5"


# ----------------------------------------------------------------------------- audit book
def test_audit_book_survives_a_restart_only_under_the_same_calibration(
    demo: Any, tmp_path: Path
) -> None:
    _, _, cals = demo
    book = AuditBook(cals, delta=0.05, every=5, path=tmp_path)
    alarm = None
    for _ in range(5):
        _, alarm = book.observe(0, False)
    assert alarm is not None and book.alarms()[0][0] == 0
    again = AuditBook(cals, delta=0.05, every=5, path=tmp_path)
    assert again.restored and again.states == book.states
    moved = list(cals)
    moved[0] = dataclasses.replace(cals[0], threshold=cals[0].threshold * 0.9)
    fresh = AuditBook(moved, delta=0.05, every=5, path=tmp_path)
    assert not fresh.restored and fresh.alarms() == ()
    (tmp_path / "audit.json").write_text("[not an audit")
    with pytest.raises(CorruptStoreError, match="audit book"):
        AuditBook(cals, path=tmp_path)
    # the alarm's action: the level abstains
    from intercascade_core.core.state import init_state

    state = apply_alarm(init_state(cals, 8), alarm, level=0)
    assert state.thresholds[0] == math.inf


# ----------------------------------------------------------------------------- deadline
def test_deadline_turns_slow_levels_into_failures_and_still_commits(demo: Any) -> None:
    _, levels, cals = demo

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(500)

    async def run() -> tuple[RequestError, float]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(slow))
        slow_levels = [AsyncLevel(AsyncChatModel("http://x.invalid/v1", lv.name, client=client),
                                  lv.name) for lv in levels]
        emb = HashingEmbedder(384)
        cascade = Cascade(levels, emb, calibrations=cals)
        gw = Gateway(cascade, slow_levels, EmbedBatcher(emb), AuditBook(cals), deadline_s=0.5,
                     commit_reserve_s=0.1)
        req = parse_chat_request(_body(), MODELS)
        t0 = time.perf_counter()
        with pytest.raises(RequestError) as info:
            await gw.complete(req, None)
        took = time.perf_counter() - t0
        assert cascade.state.n_queries == 1  # the query has its outcome, committed
        assert cascade.state.counters.n_failed_calls == 2
        await gw.aclose()
        await client.aclose()
        return info.value, took

    err, took = asyncio.run(run())
    assert err.status == 504 and err.code == "deadline_exceeded"
    assert took < 0.5 + 0.2  # no request outlives its deadline (plus scheduling slack)


def test_gateway_refuses_levels_that_are_not_the_cascades(demo: Any) -> None:
    backend, levels, cals = demo
    emb = HashingEmbedder(384)
    cascade = Cascade(levels, emb, calibrations=cals)
    wrong = demo_async_levels(backend)[::-1]
    with pytest.raises(InvalidArgumentError, match="differ"):
        Gateway(cascade, wrong, EmbedBatcher(emb), AuditBook(cals))


def test_a_failed_level_defers_and_all_failed_is_a_502(demo: Any) -> None:
    backend, levels, cals = demo
    sim = backend.handler()

    def weak_down(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["model"] == "sim-weak":
            return httpx.Response(503, json={"error": {"message": "weak is down"}})
        return sim(request)

    def all_down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "down"}})

    async def run(handler: Any) -> tuple[Any, Cascade]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        async_levels = [AsyncLevel(AsyncChatModel("http://x.invalid/v1", lv.name, client=client,
                                                  max_retries=1, backoff_base=0.0), lv.name)
                        for lv in levels]
        emb = HashingEmbedder(384)
        cascade = Cascade(levels, emb, calibrations=cals)
        gw = Gateway(cascade, async_levels, EmbedBatcher(emb), AuditBook(cals))
        try:
            result: Any = await gw.complete(parse_chat_request(_body(), MODELS), None)
        except RequestError as e:
            result = e
        try:
            direct = await gw.direct(parse_chat_request(_body(model="sim-weak"), MODELS), None)
        except RequestError as e:
            direct = e
        await gw.aclose()
        await client.aclose()
        return (result, direct), cascade

    (answer, direct), cascade = asyncio.run(run(weak_down))
    levels_seen = answer.extension["levels"]
    assert answer.extension["level"] == 1 and answer.extension["deferred"]
    assert "RetriesExhausted" in levels_seen[0]["failure"] and levels_seen[1]["failure"] is None
    assert isinstance(direct, RequestError) and direct.status == 502
    (failed, _), cascade = asyncio.run(run(all_down))
    assert isinstance(failed, RequestError) and failed.status == 502
    assert failed.code == "upstream_failed" and "every level" in failed.message
    assert cascade.state.n_queries == 1 and cascade.state.counters.n_discarded == 1  # committed


def test_aclose_shuts_its_pools_even_when_a_step_fails(demo: Any) -> None:
    backend, levels, cals = demo

    async def run() -> Gateway:
        emb = HashingEmbedder(384)
        cascade = Cascade(levels, emb, calibrations=cals)
        audit = AuditBook(cals)
        gw = Gateway(cascade, demo_async_levels(backend), EmbedBatcher(emb), audit)
        await gw.complete(parse_chat_request(_body(), MODELS), None)  # both pools used
        assert any(t.name.startswith("gateway-retrieve") for t in threading.enumerate())

        def disk_full() -> None:
            raise OSError(28, "No space left on device")

        audit.save = disk_full  # type: ignore[method-assign]
        with pytest.raises(OSError, match="No space"):
            await gw.aclose()
        return gw

    gw = asyncio.run(run())  # held: a collected pool's idle threads would leave anyway
    alive = [t.name for t in threading.enumerate()
             if t.name.startswith(("gateway-retrieve", "gateway-commit"))]
    assert alive == []
    del gw
