"""ChatModel over httpx.MockTransport: confidence, parsing, typed errors, retries."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.errors import (
    AuthenticationError,
    BadRequestError,
    ContextLengthExceeded,
    DeadlineExceeded,
    InvalidArgumentError,
    LogprobsUnavailable,
    MalformedResponse,
    RetriesExhausted,
)
from intercascade_core.models.chat import (
    ChatModel,
    Price,
    answer_span_confidence,
    confidence_from_logprobs,
    price_for,
)


def completion(tokens: list[str], lps: list[float], **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "choices": [
            {
                "message": {"role": "assistant", "content": "".join(tokens)},
                "logprobs": {
                    "content": [{"token": t, "logprob": lp} for t, lp in zip(tokens, lps, strict=False)]
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": len(tokens)},
    }
    body.update(extra)
    return body


class Clock:
    """Injected clock + sleep: retries run instantly and the sleeps are recorded."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[ChatModel, Clock, list[httpx.Request]]]]:
    clients: list[httpx.Client] = []

    def _make(handler: Callable[[httpx.Request], httpx.Response], **kw: Any):
        seen: list[httpx.Request] = []

        def h(req: httpx.Request) -> httpx.Response:
            seen.append(req)
            return handler(req)

        client = httpx.Client(transport=httpx.MockTransport(h))
        clients.append(client)
        clock = Clock()
        model = ChatModel(
            "http://x/v1",
            "gpt-4o-mini",
            api_key="k",
            client=client,
            sleep=clock.sleep,
            clock=clock,
            jitter_seed=0,
            **kw,
        )
        return model, clock, seen

    yield _make
    for c in clients:
        c.close()


MSG = [{"role": "user", "content": "hi"}]


def test_generation_fields_and_request(make) -> None:
    toks, lps = ["The", " answer", "\nAnswer:", " 4"], [-0.1, -0.2, -0.3, -0.4]
    model, _, seen = make(lambda r: httpx.Response(200, json=completion(toks, lps)))
    g = model.generate(MSG, temperature=0)
    assert g.text == "The answer\nAnswer: 4"
    assert g.confidence == pytest.approx(math.exp(-0.25))
    assert (g.prompt_tokens, g.completion_tokens) == (100, 4)
    assert g.cost == pytest.approx(Price(0.15, 0.60).cost(100, 4))
    body = json.loads(seen[0].content)
    assert body["logprobs"] is True and body["temperature"] == 0 and body["model"] == "gpt-4o-mini"
    assert seen[0].url == "http://x/v1/chat/completions"
    assert seen[0].headers["authorization"] == "Bearer k"


def test_answer_span_confidence_option(make) -> None:
    toks, lps = ["Work", "\nAnswer:", " 4"], [-3.0, -0.1, -0.3]
    model, _, _ = make(
        lambda r: httpx.Response(200, json=completion(toks, lps)), confidence_span="answer"
    )
    assert model.generate(MSG).confidence == pytest.approx(math.exp(-0.2))


def test_empty_completion_has_confidence_zero(make) -> None:
    model, _, _ = make(lambda r: httpx.Response(200, json=completion([], [])))
    assert model.generate(MSG).confidence == 0.0


def test_missing_logprobs_is_typed_never_one(make) -> None:
    body = completion(["x"], [-0.1])
    body["choices"][0]["logprobs"] = None
    model, _, _ = make(lambda r: httpx.Response(200, json=body))
    with pytest.raises(LogprobsUnavailable):
        model.generate(MSG)
    del body["choices"][0]["logprobs"]
    with pytest.raises(LogprobsUnavailable):
        model.generate(MSG)


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"choices": []}',
        b'{"choices": [{"message": {}}]',
        b"{}",
        json.dumps(completion(["a"], [0.5])).encode(),
    ],  # a positive logprob is corrupt
)
def test_malformed_bodies_are_typed(make, content: bytes) -> None:
    model, clock, _ = make(lambda r: httpx.Response(200, content=content))
    with pytest.raises(MalformedResponse):
        model.generate(MSG)
    assert clock.sleeps == []  # not retried


@pytest.mark.parametrize(
    ("status", "text", "exc"),
    [
        (401, "bad key", AuthenticationError),
        (403, "forbidden", AuthenticationError),
        (400, "This model's maximum context length is 4096 tokens", ContextLengthExceeded),
        (400, "unknown parameter", BadRequestError),
        (404, "model not found", BadRequestError),
        (422, "bad", BadRequestError),
    ],
)
def test_client_errors_are_typed_and_not_retried(make, status: int, text: str, exc: type) -> None:
    model, clock, seen = make(lambda r: httpx.Response(status, json={"error": {"message": text}}))
    with pytest.raises(exc) as e:
        model.generate(MSG)
    assert len(seen) == 1 and clock.sleeps == []
    assert e.value.status == status and str(status) in e.value.reason


def flaky(failures: list[Callable[[httpx.Request], httpx.Response]]):
    ok = completion(["Answer:", " 1"], [-0.1, -0.1])

    def handler(req: httpx.Request) -> httpx.Response:
        if failures:
            return failures.pop(0)(req)
        return httpx.Response(200, json=ok)

    return handler


def _timeout(req: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("slow", request=req)


def _connect(req: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("refused", request=req)


def test_retries_honour_retry_after_and_back_off(make) -> None:
    fails = [
        lambda r: httpx.Response(429, headers={"Retry-After": "7"}),
        lambda r: httpx.Response(500),
        _timeout,
        lambda r: httpx.Response(503),
        _connect,
    ]
    model, clock, seen = make(flaky(fails), backoff_base=1.0, backoff_max=100)
    g = model.generate(MSG)
    assert g.attempts == 6 and len(seen) == 6
    assert clock.sleeps[0] == 7.0  # Retry-After honoured exactly
    for n, s in enumerate(clock.sleeps[1:], start=1):  # exponential with jitter in [0.5, 1.5)
        assert 0.5 * 2**n <= s < 1.5 * 2**n


def test_retries_exhausted(make) -> None:
    model, _, seen = make(lambda r: httpx.Response(500), max_retries=2)
    with pytest.raises(RetriesExhausted, match="3 attempts"):
        model.generate(MSG)
    assert len(seen) == 3


def test_total_deadline(make) -> None:
    model, clock, _ = make(
        lambda r: httpx.Response(429, headers={"Retry-After": "40"}), deadline=100.0
    )
    with pytest.raises(DeadlineExceeded):
        model.generate(MSG)
    assert sum(clock.sleeps) <= 100.0


def test_per_call_timeout_is_passed(make) -> None:
    seen_timeouts: list[Any] = []

    def h(req: httpx.Request) -> httpx.Response:
        seen_timeouts.append(req.extensions["timeout"])
        return httpx.Response(200, json=completion(["a"], [-1.0]))

    model, _, _ = make(h, timeout=2.5)
    model.generate(MSG)
    assert seen_timeouts[0]["read"] == 2.5


def test_argument_validation_names_the_value() -> None:
    with pytest.raises(InvalidArgumentError, match="base_url"):
        ChatModel("ftp://x", "m")
    with pytest.raises(InvalidArgumentError, match="model"):
        ChatModel("http://x", "")
    with pytest.raises(InvalidArgumentError, match="timeout"):
        ChatModel("http://x", "m", timeout=0)
    with pytest.raises(InvalidArgumentError, match="client"):
        ChatModel("http://x", "m", client=object())  # type: ignore[arg-type]
    with ChatModel("http://x", "m") as m, pytest.raises(InvalidArgumentError, match="messages"):
        m.generate([])


def test_price_table() -> None:
    assert price_for("gpt-4o-mini-2024-07-18") == price_for("gpt-4o-mini")
    assert price_for("models/gemini-2.0-flash") == Price(0.10, 0.40)
    assert price_for("my-local-model") is None


# invariant 31
@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-50, max_value=0), min_size=1, max_size=50))
def test_confidence_properties(lps: list[float]) -> None:
    c = confidence_from_logprobs(lps)
    assert 0.0 <= c <= 1.0
    assert c == pytest.approx(confidence_from_logprobs(lps + lps), rel=1e-9, abs=1e-300)
    assert confidence_from_logprobs([0.0] * len(lps)) == 1.0
    assert confidence_from_logprobs([]) == 0.0


def test_answer_span_falls_back_to_all_tokens() -> None:
    assert answer_span_confidence("ab", ["a", "b"], [-1.0, -3.0]) == pytest.approx(math.exp(-2))
