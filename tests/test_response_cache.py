"""ResponseCache: repeated temperature-0 requests are answered from the file, others are
forwarded; the file survives restarts and crashes mid-append."""

from __future__ import annotations

import json

import httpx
import pytest

from intercascade_core.errors import (
    CorruptCacheError,
    InvalidArgumentError,
    MalformedResponse,
    RetriesExhausted,
)
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.response_cache import ResponseCache, TornCacheWarning, read_cache


class CountingServer:
    """A chat endpoint whose reply names how many requests it has seen."""

    def __init__(self, status: int = 200) -> None:
        self.seen = 0
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen += 1
        body = json.loads(request.content)
        text = f"reply {self.seen} to {body['messages'][-1]['content']}"
        doc = {
            "choices": [{"message": {"content": text}, "finish_reason": "stop",
                         "logprobs": {"content": [{"token": "x", "logprob": -0.1}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
        return httpx.Response(self.status, json=doc if self.status == 200 else {"error": "busy"})


def _model(path, server, **kw) -> ChatModel:
    client = httpx.Client(transport=ResponseCache(path, inner=httpx.MockTransport(server)))
    return ChatModel("http://m.test/v1", "m", client=client, max_retries=0, **kw)


def _ask(model: ChatModel, text: str, temperature: float = 0.0) -> str:
    return model.generate([{"role": "user", "content": text}], temperature=temperature).text


def test_identical_request_is_served_from_the_file_across_restarts(tmp_path):
    path = tmp_path / "c.jsonl"
    server = CountingServer()
    m = _model(path, server)
    assert _ask(m, "a") == "reply 1 to a"
    assert _ask(m, "a") == "reply 1 to a"  # memoised, not asked again
    assert _ask(m, "b") == "reply 2 to b"
    assert server.seen == 2
    restarted = _model(path, server)  # a new process reading the same file
    assert _ask(restarted, "a") == "reply 1 to a"
    assert server.seen == 2
    recs = read_cache(path)
    assert [json.loads(r.body)["choices"][0]["message"]["content"] for r in recs] == [
        "reply 1 to a", "reply 2 to b"]
    assert all(r.model == "m" and r.elapsed_s >= 0 for r in recs)


def test_sampling_requests_and_errors_are_not_memoised(tmp_path):
    path = tmp_path / "c.jsonl"
    server = CountingServer()
    m = _model(path, server)
    assert _ask(m, "a", temperature=0.7) == "reply 1 to a"
    assert _ask(m, "a", temperature=0.7) == "reply 2 to a"
    failing = CountingServer(status=503)
    with pytest.raises(RetriesExhausted):
        _ask(_model(path, failing), "z")
    assert read_cache(path) == []  # neither the sampled replies nor the 503 were stored


@pytest.mark.parametrize("content", [b"<html>proxy error</html>", b"\xff\xfe", b'{"choices": []}'])
def test_a_200_reply_that_is_not_a_completion_is_not_stored(tmp_path, content):
    path = tmp_path / "c.jsonl"
    calls = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, content=content)

    m = _model(path, server)
    for _ in range(2):
        with pytest.raises(MalformedResponse):  # typed, as without the cache
            _ask(m, "a")
    assert len(calls) == 2 and read_cache(path) == []  # asked again, never replayed


def test_gets_and_non_json_posts_pass_through_uncounted(tmp_path):
    seen = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return httpx.Response(200, json={"ok": True})

    cache = ResponseCache(tmp_path / "c.jsonl", inner=httpx.MockTransport(server))
    with httpx.Client(transport=cache) as client:
        client.get("http://m.test/v1/models")
        client.get("http://m.test/v1/models")
        client.post("http://m.test/v1/x", content=b"not json")
    assert seen == ["GET", "GET", "POST"] and cache.hits == cache.misses == 0


def test_hit_and_miss_counters(tmp_path):
    cache = ResponseCache(tmp_path / "c.jsonl", inner=httpx.MockTransport(CountingServer()))
    m = ChatModel("http://m.test/v1", "m", client=httpx.Client(transport=cache), max_retries=0)
    for text in ("a", "a", "b", "a"):
        _ask(m, text)
    assert (cache.hits, cache.misses) == (2, 2)


def test_a_failed_append_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    server = CountingServer()
    m = _model(path, server)
    _ask(m, "a")
    real_fsync = __import__("os").fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    import intercascade_core.models.response_cache as rc

    monkeypatch.setattr(rc.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        _ask(m, "b")
    monkeypatch.setattr(rc.os, "fsync", real_fsync)
    _ask(m, "c")
    texts = [json.loads(r.body)["choices"][0]["message"]["content"] for r in read_cache(path)]
    assert texts == ["reply 1 to a", "reply 3 to c"]  # "b" rolled back, the file intact


def test_torn_last_line_is_dropped_and_truncated(tmp_path):
    path = tmp_path / "c.jsonl"
    server = CountingServer()
    _ask(_model(path, server), "a")
    with open(path, "ab") as f:
        f.write(b'{"key": "abc", "url"')  # a crash mid-append
    with pytest.warns(TornCacheWarning):
        m = _model(path, server)
    assert path.read_bytes().endswith(b"\n")  # the torn tail is cut before new appends
    _ask(m, "b")
    assert len(read_cache(path)) == 2


def test_a_file_holding_only_a_torn_line_is_repaired(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"key": "ab')
    with pytest.warns(TornCacheWarning):
        m = _model(path, CountingServer())
    _ask(m, "a")
    assert len(read_cache(path)) == 1


def test_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"not json\n")
    with pytest.raises(CorruptCacheError, match="line 1"):
        ResponseCache(path)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="directory"):
        ResponseCache(tmp_path)
