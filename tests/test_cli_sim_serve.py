"""`intercascade sim-serve` as a real process: it serves the same responses as the
in-process MockTransport simulator and stops cleanly on Ctrl-C. Then the server against
hostile clients on 127.0.0.1: idle connections hold a bounded number of threads and are
closed after the socket timeout; malformed, mistyped, too deep or falsely framed requests
get a JSON 4xx and the server answers the next request. No test here is statistical."""

from __future__ import annotations

import json
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.errors import InvalidArgumentError
from intercascade_core.models.sim import SimBackend, SimServer, start_server


def test_sim_serve_answers_like_the_mock_transport_and_stops_on_sigint():
    # A test run launched as a shell background job (`cmd &`) has SIGINT ignored, and an
    # ignored signal stays ignored across exec, so the server would never see the Ctrl-C.
    # With a Python handler installed here, the child starts with the default action.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "intercascade_core", "sim-serve", "--port", "0", "--seed", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        line = proc.stdout.readline()  # "serving simulated models at http://127.0.0.1:PORT/v1 ..."
        assert "serving simulated models at http://127.0.0.1:" in line, line + proc.stderr.read()
        base_url = line.split(" at ")[1].split()[0]
        body = {
            "model": "sim-weak", "logprobs": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}],
        }
        with httpx.Client(base_url=base_url, timeout=10) as client:
            models = client.get("/models").json()
            served = client.post("/chat/completions", json=body).json()
        with httpx.Client(transport=SimBackend(seed=3).transport(), base_url="http://sim/v1") as mock:
            expected = mock.post("/chat/completions", json=body).json()
        assert {m["id"] for m in models["data"]} >= {"sim-weak", "sim-strong"}
        assert json.dumps(served, sort_keys=True) == json.dumps(expected, sort_keys=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leak the server into later tests
            _, err = proc.communicate()
            pytest.fail(f"sim-serve did not stop within 30 s of SIGINT; stderr: {err[-2000:]}")
    assert proc.returncode == 0, err


# ----------------------------------------------------------------------------- hostile clients
# In-process servers on 127.0.0.1 with small bounds, so the bounded loops below stay fast.

_VALID = {
    "model": "sim-weak", "logprobs": True, "temperature": 0,
    "messages": [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}],
}


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from ``sock`` (status, lower-cased headers, body); the socket's
    timeout bounds every read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a complete response: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return _read_response(sock)


def _post(body: bytes, *, extra: str = "") -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def _still_serves(port: int) -> None:
    status, _, body = _exchange(port, _post(json.dumps(_VALID).encode(), extra="Connection: close\r\n"))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]


def test_idle_connections_hold_a_bounded_number_of_threads() -> None:
    with start_server(seed=3, timeout=30, max_threads=8, max_waiting=8, admit_wait_s=0.5) as server:
        base = threading.active_count()  # this thread, the accept loop, anything before
        idle: list[socket.socket] = []
        try:
            for _ in range(200):
                idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            # the server keeps 16 (8 handlers, 8 waiting), which hear nothing; every other
            # one is refused at once with a 503, without a thread of its own
            answered: list[socket.socket] = []
            with selectors.DefaultSelector() as sel:
                for sock in idle:
                    sel.register(sock, selectors.EVENT_READ)
                deadline = time.monotonic() + 20
                while len(answered) < 184 and time.monotonic() < deadline:
                    for key, _ in sel.select(timeout=1):
                        sel.unregister(key.fileobj)
                        answered.append(key.fileobj)  # type: ignore[arg-type]
                for key, _ in sel.select(timeout=0.5):  # the kept 16 stay silent
                    answered.append(key.fileobj)  # type: ignore[arg-type]
            assert len(answered) == 184
            for sock in answered:
                status, headers, body = _read_response(sock)
                assert status == 503 and headers["retry-after"] and json.loads(body)["error"]
            assert threading.active_count() <= base + 8
        finally:
            for sock in idle:
                sock.close()
        _still_serves(server.port)
        assert threading.active_count() <= base + 8


def test_an_idle_connection_is_closed_after_the_socket_timeout() -> None:
    with start_server(timeout=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            start = time.monotonic()
            assert sock.recv(1) == b""  # closed by the server, not by our 10 s timeout
            assert time.monotonic() - start < 5
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            status, _, body = _read_response(sock)  # the body never comes: 400, then closed
            assert status == 400 and "shorter than its Content-Length" in body.decode()
        _still_serves(server.port)


_DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_REQUESTS = {
    "content-length not a number": (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", 400),
    "negative content-length": (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}", 400),
    "two content-lengths": (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    "huge content-length": (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999999999\r\n\r\n{}", 413),
    "chunked": (b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400),
    "garbage request line": (b"\x00\xff garbage\r\n\r\n", 400),
    "deep json": (_post(_DEEP), 400),
    "deep object": (_post(b'{"a":' * 5000 + b"1" + b"}" * 5000), 400),
    "not json": (_post(b"{'model': 1}"), 400),
    "not utf-8": (_post(b'{"model": "\xff"}'), 400),
    "nan": (_post(b'{"model": "sim-weak", "messages": [], "temperature": NaN}'), 400),
    "huge number": (_post(b'{"model": "sim-weak", "n": 1' + b"0" * 5000 + b"}"), 400),
    "array body": (_post(b"[1, 2]"), 400),
    "model a list": (_post(json.dumps({**_VALID, "model": ["sim-weak"]}).encode()), 400),
    "model a number": (_post(json.dumps({**_VALID, "model": 7}).encode()), 400),
    "messages a string": (_post(json.dumps({**_VALID, "messages": "hi"}).encode()), 400),
    "messages empty": (_post(json.dumps({**_VALID, "messages": []}).encode()), 400),
    "message not an object": (_post(json.dumps({**_VALID, "messages": [1]}).encode()), 400),
    "content a number": (_post(json.dumps({**_VALID, "messages": [{"content": 5}]}).encode()), 400),
    "unknown model": (_post(json.dumps({**_VALID, "model": "gpt-9"}).encode()), 404),
}


@pytest.fixture(scope="module")
def shared_server() -> Iterator[SimServer]:
    # a short socket timeout: a request whose body falls short is answered after it
    with start_server(seed=3, timeout=0.5, max_threads=4) as server:
        yield server


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_a_malformed_request_gets_a_json_error_and_the_server_keeps_answering(
    shared_server: SimServer, name: str
) -> None:
    request, expected = BAD_REQUESTS[name]
    status, headers, body = _exchange(shared_server.port, request)
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["message"]
    _still_serves(shared_server.port)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)
_hostile_bodies = (
    st.binary(max_size=300)
    | _json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {"model": _json_values | st.sampled_from(["sim-weak", "sim-strong"]), "messages": _json_values}
    ).map(lambda v: json.dumps(v).encode())
    | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)
)


@settings(max_examples=150)
@given(body=_hostile_bodies, length_lie=st.sampled_from([0, 0, 0, 0, 0, -1, 1]))
def test_any_body_gets_a_complete_json_answer(shared_server: SimServer, body: bytes, length_lie: int) -> None:
    """A hostile body or a Content-Length that lies by a byte is answered with JSON
    (success or a 4xx error), never a dropped connection or a 5xx."""
    head = f"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {len(body) + length_lie}\r\n"
    request = head.encode() + b"Connection: close\r\n\r\n" + body
    status, headers, reply = _exchange(shared_server.port, request)
    assert status in (200, 400, 404), reply
    assert headers["content-type"] == "application/json"
    doc = json.loads(reply)
    assert ("choices" in doc) if status == 200 else doc["error"]["message"]


def test_server_bounds_are_checked() -> None:
    for kwargs in ({"timeout": 0}, {"timeout": float("inf")}, {"max_threads": 0},
                   {"max_threads": 2.5}, {"max_waiting": -1}, {"admit_wait_s": float("nan")}):
        name = next(iter(kwargs))
        with pytest.raises(InvalidArgumentError, match=name):
            SimServer(SimBackend(), **kwargs)  # type: ignore[arg-type]
