"""Hostile or broken model replies never crash a stream: every query still ends in one
outcome, and transport failures surface as typed, recorded ModelErrors."""

from __future__ import annotations

import httpx
import pytest

from intercascade_core import (
    CascadeConfig,
    ChatModel,
    InvalidArgumentError,
    Level,
    ModelError,
    Query,
    run_stream,
)
from intercascade_core.core.protocols import Generation
from intercascade_core.core.tasks import grade, parse_number
from intercascade_core.models.hashing import HashingEmbedder
from tests._crash_worker import fixed_calibration

HOSTILE = [
    "Answer: 1e400/1",
    "Answer: \\frac{" + "9" * 400 + "}{1}",
    "Answer: " + "9" * 400,
    "Answer: 1/0",
    "Answer: inf",
    "Answer: nan",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_grading_hostile_numbers_never_raises(text):
    g = grade(text, "5", "math")
    assert g.correct is False
    value = parse_number(text.removeprefix("Answer: "))
    assert value is None or abs(value) < float("inf")


class Scripted:
    """A model that replies with fixed texts in turn, confidently."""

    def __init__(self, name: str, replies: list[str]) -> None:
        self.model, self.replies, self.i = name, replies, 0

    def generate(self, messages, **params):
        text = self.replies[self.i % len(self.replies)]
        self.i += 1
        return Generation(text=text, tokens=(), logprobs=(), confidence=0.99, prompt_tokens=10,
                          completion_tokens=5, model=self.model, cost=None)


def test_a_stream_of_hostile_weak_answers_gives_one_outcome_per_query():
    weak = Level(Scripted("weak", HOSTILE), "weak")
    strong = Level(Scripted("strong", ["Answer: 5"]), "strong")
    queries = [Query(text=f"What is {i} + 5 - {i}?", gold="5", id=str(i)) for i in range(len(HOSTILE))]
    result = run_stream(queries, [weak, strong], HashingEmbedder(dim=64),
                        calibrations=[fixed_calibration(0.5), fixed_calibration(0.5)],
                        config=CascadeConfig(policy="jung"), progress=False)
    assert len(result.outcomes) == len(queries)
    assert all(o.status == "accepted" and o.level == 0 and o.correct is False for o in result.outcomes)


@pytest.mark.parametrize(
    "error",
    [httpx.DecodingError("bad gzip body"), httpx.ProxyError("proxy refused"),
     httpx.UnsupportedProtocol("no scheme"), httpx.LocalProtocolError("bad header")],
)
def test_non_retryable_transport_errors_are_typed_model_errors(error):
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        model = ChatModel("http://x/v1", "m", client=client, sleep=lambda s: None)
        with pytest.raises(ModelError) as info:
            model.generate([{"role": "user", "content": "hi"}])
    assert type(error).__name__ in info.value.reason


def test_a_failing_transport_is_recorded_not_lost():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.DecodingError("bad gzip body")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        weak = Level(ChatModel("http://x/v1", "w", client=client), "weak")
        strong = Level(Scripted("strong", ["Answer: 5"]), "strong")
        result = run_stream([Query(text="What is 2 + 3?", gold="5")], [weak, strong],
                            HashingEmbedder(dim=64),
                            calibrations=[fixed_calibration(0.5), fixed_calibration(0.5)],
                            config=CascadeConfig(policy="jung"), progress=False)
    (outcome,) = result.outcomes
    assert outcome.level == 1 and outcome.correct is True
    assert any(f and "DecodingError" in f for f in outcome.failures)


@pytest.mark.parametrize("name", ["backoff_base", "backoff_max"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_backoff_settings_are_validated(name, value):
    with pytest.raises(InvalidArgumentError, match=name):
        ChatModel("http://x/v1", "m", **{name: value})
