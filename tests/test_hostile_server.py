"""ChatModel against hostile servers on a real 127.0.0.1 socket.

Four classes of attack, each with a hypothesis property that asserts the same three
things: the outcome is a typed ``IntercascadeError``; a stream through the cascade still
gives one ``Outcome`` per query (nothing lost); the API key appears in no output (error
text, traceback, recorded outcomes, log records).

1. a reply trickled a byte at a time must not outlive ``timeout``/``deadline``;
2. secrets (the configured key, echoed ``Authorization`` headers, ``sk-`` tokens) never
   reach error text, and a key that cannot go in a header is refused without quoting it;
3. hostile numbers and JSON shapes (400-digit logprobs, ``1e999`` token counts, deep
   nesting, negative counts, wrong types) are ``MalformedResponse``, and response-cache
   lines are read with the same bounded reader;
4. an endpoint that refuses connections or whose host does not resolve fails at once
   (``EndpointUnreachable``, no retries), and :meth:`ChatModel.probe` finds it up front.

The servers' trickles are bounded (``MAX_TRICKLE_S``) so that code without the deadline
fails these tests by time instead of hanging them. No test here is statistical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from intercascade_core import CascadeConfig, Level, Query, run_stream
from intercascade_core.core import untrusted_json
from intercascade_core.core.protocols import Generation
from intercascade_core.errors import (
    AuthenticationError,
    BadRequestError,
    CorruptCacheError,
    DeadlineExceeded,
    EndpointUnreachable,
    IntercascadeError,
    InvalidArgumentError,
    MalformedJSONError,
    MalformedResponse,
    ModelError,
    RetriesExhausted,
    redact,
)
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.response_cache import ResponseCache, read_cache
from tests._crash_worker import fixed_calibration

MSG = [{"role": "user", "content": "What is 2 + 3?"}]
MAX_TRICKLE_S = 8.0  # a trickling reply ends (connection closed) after this long
SLACK_S = 0.75  # scheduling and the attempt watchdog's grace (0.25 s)


# ----------------------------------------------------------------------------- a real server
Reply = Callable[[socket.socket, bytes, threading.Event], None]


class Server:
    """A threaded HTTP/1.1 server on 127.0.0.1 whose reply to every request is ``reply``
    (settable between requests). ``requests`` records each request's first line."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[str] = []
        self.stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # timeout (poll stop) or closed
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2.0)
            try:
                request = _read_request(conn)
            except OSError:
                return
            self.requests.append(request.split(b"\r\n", 1)[0].decode("latin-1"))
            with contextlib.suppress(OSError):  # the client hung up: what a timeout does
                self.reply(conn, request, self.stop)

    def close(self) -> None:
        self.stop.set()
        self._accepter.join(2)
        self._listener.close()
        for t in self._threads:
            t.join(2)


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("closed before the headers ended")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def http(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def respond(status: int, body: bytes, headers: dict[str, str] | None = None) -> Reply:
    def reply(conn: socket.socket, request: bytes, stop: threading.Event) -> None:
        conn.sendall(http(status, body, headers))

    return reply


def trickle(raw: bytes, interval: float, start: int = 0) -> Reply:
    """Send ``raw[:start]`` at once, then one byte every *interval* seconds (at most
    ``MAX_TRICKLE_S`` in all, then hang up)."""

    def reply(conn: socket.socket, request: bytes, stop: threading.Event) -> None:
        conn.sendall(raw[:start])
        t_end = time.monotonic() + MAX_TRICKLE_S
        for i in range(start, len(raw)):
            if stop.wait(interval) or time.monotonic() > t_end:
                return
            conn.sendall(raw[i : i + 1])

    return reply


def completion(text: str = "Answer: 5", **usage: Any) -> dict[str, Any]:
    tokens = [text[:8], text[8:]] if len(text) > 8 else [text]
    return {
        "model": "weak",
        "choices": [{"message": {"role": "assistant", "content": text},
                     "logprobs": {"content": [{"token": t, "logprob": -0.1} for t in tokens]},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": len(tokens), **usage},
    }


OK_BODY = json.dumps(completion()).encode()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server(respond(200, OK_BODY))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def refused_url() -> str:
    """A 127.0.0.1 port with nothing listening: connecting is refused at once."""
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


# ----------------------------------------------------------------------------- the cascade
class Scripted:
    """A strong model that always answers confidently (the weak one is under attack)."""

    model = "strong"

    def generate(self, messages: Any, **params: Any) -> Generation:
        return Generation(text="Answer: 5", tokens=(), logprobs=(), confidence=0.99,
                          prompt_tokens=10, completion_tokens=5, model=self.model, cost=None)


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def captured_logs() -> Iterator[list[str]]:
    handler = Captured()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def stream_through_cascade(weak: ChatModel, n: int = 2) -> tuple[list[Any], str]:
    """Run *n* queries with *weak* first; return the outcomes and all text they and the
    logs produced."""
    queries = [Query(text=f"What is {i} + 5 - {i}?", gold="5", id=str(i)) for i in range(n)]
    with captured_logs() as logs:
        result = run_stream(queries, [Level(weak, "weak"), Level(Scripted(), "strong")],
                            HashingEmbedder(dim=32),
                            calibrations=[fixed_calibration(0.5), fixed_calibration(0.5)],
                            config=CascadeConfig(policy="jung"), progress=False)
    outcomes = list(result.outcomes)
    text = repr(outcomes) + json.dumps([dataclasses.asdict(o) for o in outcomes], default=str)
    return outcomes, text + "\n".join(logs)


def everything_said(error: BaseException) -> str:
    """The error as anyone could see it: str, repr, reason and the full traceback."""
    return "\n".join([str(error), repr(error), getattr(error, "reason", ""),
                      *traceback.format_exception(error)])


def assert_nothing_lost(outcomes: list[Any], n: int, failure: str | None = None) -> None:
    assert len(outcomes) == n
    assert [o.query_id for o in outcomes] == [str(i) for i in range(n)]
    for o in outcomes:
        assert o.status == "accepted" and o.answer == "5"
        if failure is not None:
            assert o.failures[0] is not None and failure in o.failures[0]


keys = st.builds(
    lambda prefix, middle: f"{prefix}{middle}kQ",  # a suffix no normal output contains
    st.sampled_from(["", "sk-", "sk-proj-", "AIza"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=8, max_size=48),
)


# ============================================================================ 1. deadlines
def test_the_issue_case_ends_after_the_attempt_timeout_not_the_trickle(server):
    """``timeout=2, deadline=5, max_retries=0`` against one byte every 0.4 s: it returned
    after 124 s; the attempt now ends at its 2 s budget."""
    server.reply = trickle(http(200, OK_BODY), 0.4, start=60)
    model = ChatModel(server.url, "m", timeout=2, deadline=5, max_retries=0)
    t0 = time.monotonic()
    with pytest.raises(RetriesExhausted, match=r"2\.0s attempt timeout"):
        model.generate(MSG)
    assert time.monotonic() - t0 < 2 + SLACK_S


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_trickled_reply_ends_at_the_deadline(server, where):
    raw = http(200, OK_BODY)
    start = raw.index(b"\r\n\r\n") + 4 if where == "body" else 5
    server.reply = trickle(raw, 0.2, start=start)
    model = ChatModel(server.url, "m", timeout=30, deadline=1.5, max_retries=3)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        model.generate(MSG)
    assert time.monotonic() - t0 < 1.5 + SLACK_S


def test_the_deadline_holds_across_retries(server):
    server.requests.clear()
    server.reply = trickle(http(200, OK_BODY), 0.1, start=40)
    model = ChatModel(server.url, "m", timeout=0.5, deadline=1.8, max_retries=10,
                      backoff_base=0.05)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        model.generate(MSG)
    assert time.monotonic() - t0 < 1.8 + SLACK_S
    assert len(server.requests) >= 3  # it did retry, and each attempt stopped at 0.5 s


def test_a_response_cache_in_between_keeps_the_deadline_and_stores_nothing(server, tmp_path):
    server.reply = trickle(http(200, OK_BODY), 0.2, start=40)
    path = tmp_path / "cache.jsonl"
    client = httpx.Client(transport=ResponseCache(path))
    model = ChatModel(server.url, "m", client=client, timeout=30, deadline=1.0, max_retries=0)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        model.generate(MSG, temperature=0)
    assert time.monotonic() - t0 < 1.0 + SLACK_S
    assert read_cache(path) == []
    server.reply = respond(200, OK_BODY)  # a complete reply is stored as before
    assert model.generate(MSG, temperature=0).text == "Answer: 5"
    assert len(read_cache(path)) == 1
    client.close()


@settings(max_examples=5, deadline=None)
@given(
    key=keys,
    interval=st.sampled_from([0.05, 0.15, 0.3]),
    where=st.sampled_from(["headers", "body"]),
    deadline=st.sampled_from([0.4, 0.7]),
    retries=st.integers(0, 2),
)
def test_property_trickles_end_in_time_typed_keyless_and_lossless(
    server, key, interval, where, deadline, retries
):
    body = json.dumps({"error": f"Authorization: Bearer {key}", "echo": key}).encode()
    raw = http(200, body)
    server.reply = trickle(raw, interval, start=raw.index(b"\r\n\r\n") + 4 if where == "body" else 3)
    model = ChatModel(server.url, "weak", api_key=key, timeout=30, deadline=deadline,
                      max_retries=retries, backoff_base=0.01)
    t0 = time.monotonic()
    with pytest.raises(IntercascadeError) as info:
        model.generate(MSG)
    assert time.monotonic() - t0 < deadline + SLACK_S
    assert isinstance(info.value, DeadlineExceeded)  # timeout=30: the deadline cuts first
    assert key not in everything_said(info.value)
    outcomes, said = stream_through_cascade(model)
    assert_nothing_lost(outcomes, 2, failure="DeadlineExceeded")
    assert key not in said


# ============================================================================ 2. secrets
def echo_headers(status: int) -> Reply:
    """Reply with the request's own headers in the body, as some proxies do."""

    def reply(conn: socket.socket, request: bytes, stop: threading.Event) -> None:
        head = request.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        conn.sendall(http(status, json.dumps({"error": {"message": "denied",
                                                        "request": head}}).encode()))

    return reply


@settings(max_examples=40, deadline=None)
@given(key=keys, status=st.sampled_from([400, 401, 403, 404, 422, 500, 503]),
       form=st.sampled_from(["headers", "json", "plain", "escaped", "malformed-200"]))
@example(key="sk-proj-abcdefgh12345678kQ", status=401, form="headers")
def test_property_echoed_secrets_never_reach_errors_or_outcomes(server, key, status, form):
    if form == "headers":
        server.reply = echo_headers(status)
    else:
        body = {
            "json": json.dumps({"error": {"message": "bad", "api_key": key}}),
            "plain": f"invalid key {key} for Authorization: Bearer {key}",
            "escaped": json.dumps({"error": f"header was \"Bearer {key}\"", "key": key}),
            "malformed-200": f"<html>proxy error for {key}</html>",
        }[form].encode()
        server.reply = respond(200 if form == "malformed-200" else status, body)
    model = ChatModel(server.url, "weak", api_key=key, max_retries=1, backoff_base=0.0)
    with pytest.raises(ModelError) as info:
        model.generate(MSG)
    assert key not in everything_said(info.value)
    outcomes, said = stream_through_cascade(model)
    assert_nothing_lost(outcomes, 2, failure=type(info.value).__name__)
    assert key not in said


bad_chars = st.sampled_from(["\n", "\r", "\t", "\x00", "\x7f", " ", "\u00e9", "\u2028", "\ufeff"])


@settings(max_examples=30, deadline=None)
@given(key=keys, bad=bad_chars, at=st.floats(0, 1))
@example(key="sk-abcdefgh12345678kQ", bad="\n", at=1.0)  # a key file's trailing newline
def test_property_a_key_that_cannot_be_a_header_is_refused_without_quoting_it(
    server, key, bad, at
):
    i = round(at * len(key))
    broken = key[:i] + bad + key[i:]
    server.requests.clear()
    server.reply = echo_headers(401)
    with pytest.raises(IntercascadeError) as info:
        ChatModel(server.url, "weak", api_key=broken, max_retries=0).generate(MSG)
    said = everything_said(info.value)
    assert isinstance(info.value, InvalidArgumentError) and info.value.argument == "api_key"
    for part in (broken, key[:i], key[i:]):
        assert len(part) < 6 or part not in said
    assert server.requests == []  # the key never left the process


def test_redact_covers_the_shapes_servers_echo():
    key = "k3y-With/Slash\"Quote"
    said = redact(
        f'Authorization: Bearer {key} | {{"api_key": "{json.dumps(key)[1:-1]}"}} | '
        "x-api-key: abcdefgh | sk-proj-ABCDEFGHIJKLMNOP | https://user:pw@host/v1?key=AIzaSECRET",
        [key],
    )
    for secret in (key, json.dumps(key)[1:-1], "abcdefgh", "sk-proj-ABCDEFGHIJKLMNOP", "pw@",
                   "AIzaSECRET"):
        assert secret not in said, said
    assert said.count("[REDACTED]") >= 6


def test_ordinary_error_text_is_left_alone():
    text = "HTTP 400: a basic token count of 5 exceeds the limit; key not found"
    assert redact(text, ["short"]) == text


# ============================================================================ 3. hostile shapes
def _with(raw: str) -> str:
    """A completion whose usage.completion_tokens is the raw JSON literal *raw*."""
    return json.dumps(completion()).replace('"completion_tokens": 2', f'"completion_tokens": {raw}')


def _logprob(raw: str) -> str:
    return json.dumps(completion()).replace('"logprob": -0.1', f'"logprob": {raw}', 1)


HOSTILE_LITERALS = ["1e999", "-1e999", "9" * 400, "-" + "9" * 400, "0." + "0" * 400 + "1",
                    "-1", "-0.5", "2.5", "1e300", "NaN", "Infinity", "-Infinity", '"12"', "true",
                    "[]", "{}", "null", "-1e308", '"-0.1"']
deep = st.integers(65, 20_000).map(lambda n: "[" * n + "]" * n)
hostile_literal = st.one_of(st.sampled_from(HOSTILE_LITERALS), deep,
                            st.integers(-(10**500), 10**500).map(str),
                            st.floats(allow_nan=False, allow_infinity=False).map(repr))


def _at_path(path: str, raw: str) -> str:
    """A valid completion with the value at *path* replaced by the raw JSON text *raw*."""
    marker = "\u0000HOSTILE\u0000"
    doc: Any = completion()
    keys_ = path.split(".")
    node = doc
    for k in keys_[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys_[-1]
    if last.isdigit():
        node[int(last)] = marker
    else:
        node[last] = marker
    return json.dumps(doc).replace(json.dumps(marker), raw)


PATHS = ["usage.prompt_tokens", "usage.completion_tokens", "usage", "choices.0.logprobs.content.0.logprob",
         "choices.0.logprobs.content.0.token", "choices.0.logprobs.content.0",
         "choices.0.logprobs.content", "choices.0.logprobs", "choices.0.message.content",
         "choices.0.message", "choices.0", "choices", "model", "choices.0.finish_reason"]
hostile_body = st.one_of(
    st.builds(_at_path, st.sampled_from(PATHS), hostile_literal),
    deep,
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                     st.sampled_from(["choices", "message", "content", "logprobs", "usage"]),
                     inner, max_size=3), max_leaves=15).map(json.dumps),
)


def _sane(g: Generation) -> None:
    assert 0.0 <= g.confidence <= 1.0
    assert g.prompt_tokens >= 0 and g.completion_tokens >= 0
    assert g.cost is None or 0.0 <= g.cost < float("inf")
    assert all(-1e4 <= lp <= 1e-6 for lp in g.logprobs)


@settings(max_examples=100, deadline=None)
@given(key=keys, body=hostile_body)
@example(key="sk-abcdefgh12345678kQ", body=_logprob("-" + "9" * 400))  # 400-digit logprob
@example(key="sk-abcdefgh12345678kQ", body=_with("1e999"))  # OverflowError before
@example(key="sk-abcdefgh12345678kQ", body=_with("-7"))  # a negative cost before
@example(key="sk-abcdefgh12345678kQ", body="[" * 5000 + "]" * 5000)  # RecursionError before
@example(key="sk-abcdefgh12345678kQ",  # every logprob -1e308: fsum overflowed before
         body=json.dumps(completion()).replace('"logprob": -0.1', '"logprob": -1e308'))
def test_property_hostile_numbers_and_shapes_are_malformed_response(server, key, body):
    server.reply = respond(200, body.encode())
    model = ChatModel(server.url, "gpt-4o-mini", api_key=key, max_retries=0)
    try:
        g = model.generate(MSG)
    except IntercascadeError as e:
        assert isinstance(e, ModelError)  # MalformedResponse or LogprobsUnavailable
        assert key not in everything_said(e)
    else:
        _sane(g)
    outcomes, said = stream_through_cascade(model)
    assert len(outcomes) == 2 and key not in said


@pytest.mark.parametrize("line", [
    "[" * 50_000 + "]" * 50_000,
    '{"key": "k", "url": "u", "model": "m", "elapsed_s": 1e999, "body": "{}"}',
    '{"key": "k", "url": "u", "model": "m", "elapsed_s": ' + "9" * 5000 + ', "body": "{}"}',
    '{"key": 1, "url": "u", "model": "m", "elapsed_s": 0.1, "body": "{}"}',
    '{"key": "k", "url": "u", "model": "m", "elapsed_s": -1, "body": "{}"}',
    '{"key": "k", "url": "u", "model": "m", "elapsed_s": 0.1, "body": {"choices": []}}',
    '{"key": "k", "url": "u", "model": "m", "elapsed_s": NaN, "body": "{}"}',
    '["k", "u", "m", 0.1, "{}"]',
])
def test_hostile_cache_lines_are_corrupt_cache_errors(tmp_path, line):
    path = tmp_path / "c.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(CorruptCacheError, match="line 1"):
        ResponseCache(path)
    with pytest.raises(CorruptCacheError):
        read_cache(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_reader_agrees_with_json_on_documents_within_bounds(value):
    text = json.dumps(value)
    assert untrusted_json.loads(text) == json.loads(text)
    assert untrusted_json.loads(text.encode()) == json.loads(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), hostile_literal,
                 hostile_body, deep.map(lambda s: s.replace("[", '{"a":[', 3))))
def test_reader_raises_only_its_typed_error(data):
    try:
        untrusted_json.loads(data, max_depth=64, max_number_chars=100)
    except MalformedJSONError as e:
        assert e.kind in {"size", "depth", "number", "syntax", "encoding"}


@pytest.mark.parametrize(("data", "kind", "bounds"), [
    (b"[" * 65 + b"]" * 65, "depth", {}),
    (b'{"a": ' * 70 + b"1" + b"}" * 70, "depth", {}),
    (b"1" * 101, "number", {}),
    (b"1e999", "number", {}),
    (b"[NaN]", "number", {}),
    (b"[1, 2, 3]", "size", {"max_bytes": 8}),
    ("[\"\u00e9\u00e9\u00e9\"]", "size", {"max_bytes": 8}),  # 7 characters, 10 bytes
    (b"\xff[]", "encoding", {}),
    (b"[1,]", "syntax", {}),
    (b'"unterminated', "syntax", {}),
])
def test_reader_bounds(data, kind, bounds):
    with pytest.raises(MalformedJSONError) as info:
        untrusted_json.loads(data, **bounds)
    assert info.value.kind == kind and isinstance(info.value, ValueError)


def test_reader_accepts_the_edges():
    assert untrusted_json.loads(b"[" * 64 + b"]" * 64) is not None
    assert untrusted_json.loads("\ufeff[1]") == [1]  # a byte-order mark is skipped
    assert untrusted_json.loads('["[[[[", "\\"]]]"]', max_depth=1) == ["[[[[", '"]]]']
    with pytest.raises(InvalidArgumentError, match="max_depth"):
        untrusted_json.loads(b"[]", max_depth=0)


def test_reader_is_linear_on_hostile_quotes_and_brackets():
    t0 = time.monotonic()
    for data in (b'"' + b'\\"' * 2_000_000, b"[" * 4_000_000, b"[" + b"[]," * 1_000_000 + b"[]]"):
        with contextlib.suppress(MalformedJSONError):
            untrusted_json.loads(data, max_depth=500)
    assert time.monotonic() - t0 < 10  # quadratic scanning would take hours


# ============================================================================ 8. unreachable
@settings(max_examples=12, deadline=None)
@given(key=keys, how=st.sampled_from(["refused", "dns"]), retries=st.integers(0, 6),
       label=st.from_regex(r"[a-z][a-z0-9]{0,12}", fullmatch=True))
def test_property_unreachable_endpoints_fail_at_once(refused_url, key, how, retries, label):
    url = refused_url if how == "refused" else f"http://{label}.invalid/v1"
    sleeps: list[float] = []
    model = ChatModel(url, "weak", api_key=key, max_retries=retries, backoff_base=1.0,
                      sleep=sleeps.append)
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachable) as info:
        model.generate(MSG)
    assert sleeps == [] and time.monotonic() - t0 < 5  # not retried
    assert ("refused" if how == "refused" else "not resolved") in str(info.value)
    assert key not in everything_said(info.value)
    with pytest.raises(EndpointUnreachable) as probed:
        model.probe()
    assert key not in everything_said(probed.value)
    outcomes, said = stream_through_cascade(model)
    assert_nothing_lost(outcomes, 2, failure="EndpointUnreachable")
    assert key not in said and sleeps == []


def test_probe_passes_on_a_server_with_models(server):
    server.requests.clear()
    server.reply = respond(200, b'{"object": "list", "data": []}')
    ChatModel(server.url, "weak", api_key="sk-abcdefgh12345678").probe()
    assert server.requests == ["GET /v1/models HTTP/1.1"]


def test_probe_falls_back_to_a_one_token_completion(server):
    seen: list[bytes] = []

    def reply(conn: socket.socket, request: bytes, stop: threading.Event) -> None:
        seen.append(request)
        if request.startswith(b"GET"):
            conn.sendall(http(404, b'{"error": "no such route"}'))
        else:
            conn.sendall(http(200, OK_BODY))

    server.requests.clear()
    server.reply = reply
    ChatModel(server.url, "weak").probe()
    assert server.requests == ["GET /v1/models HTTP/1.1", "POST /v1/chat/completions HTTP/1.1"]
    ping = json.loads(seen[1].split(b"\r\n\r\n", 1)[1])
    assert ping["max_tokens"] == 1 and ping["model"] == "weak"


@pytest.mark.parametrize("status", [401, 403])
def test_probe_reports_a_bad_key_without_quoting_it(server, status):
    key = "sk-proj-abcdefgh12345678"
    server.reply = echo_headers(status)
    with pytest.raises(AuthenticationError) as info:
        ChatModel(server.url, "weak", api_key=key).probe()
    assert key not in everything_said(info.value) and str(status) in str(info.value)


def test_probe_reports_a_wrong_base_url(server):
    server.reply = respond(404, b'{"error": "not found"}')
    with pytest.raises(BadRequestError, match="neither /models nor /chat/completions"):
        ChatModel(server.url, "weak").probe()


def test_probe_leaves_a_busy_server_to_the_retries(server):
    server.reply = respond(503, b'{"error": "overloaded"}')
    ChatModel(server.url, "weak").probe()  # reachable: no error


def test_a_reset_connection_is_still_retried(server):
    """Only refusal and name failures are final; a dropped connection may pass."""
    calls = []

    def reply(conn: socket.socket, request: bytes, stop: threading.Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return  # closed with RST before any reply
        conn.sendall(http(200, OK_BODY))

    server.reply = reply
    g = ChatModel(server.url, "weak", max_retries=2, backoff_base=0.0).generate(MSG)
    assert g.text == "Answer: 5" and g.attempts == 2


def test_an_oversized_body_is_malformed_not_read_to_the_end(server):
    server.reply = respond(200, b'{"choices": "' + b"x" * 5000 + b'"}')
    with pytest.raises(MalformedResponse, match="max_response_bytes"):
        ChatModel(server.url, "weak", max_response_bytes=1000, max_retries=0).generate(MSG)


def test_a_huge_retry_after_is_a_deadline_not_a_sleep(server):
    server.reply = respond(429, b"{}", {"Retry-After": "1e999"})
    sleeps: list[float] = []
    with pytest.raises(DeadlineExceeded):
        ChatModel(server.url, "weak", sleep=sleeps.append).generate(MSG)
    assert sleeps == []

