"""The simulated OpenAI-compatible models: determinism, prompt reading, faults, sockets."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import pytest

from intercascade_core.core.prompts import (
    as_messages,
    strategy_free_prompt,
    strategy_generation_prompt,
    weak_prompt,
)
from intercascade_core.core.repository import Entry
from intercascade_core.core.tasks import Query, grade
from intercascade_core.errors import (
    BadRequestError,
    InvalidArgumentError,
    LogprobsUnavailable,
    MalformedResponse,
)
from intercascade_core.models.chat import ChatModel, answer_span_confidence
from intercascade_core.models.sim import (
    Faults,
    SimBackend,
    SimKnobs,
    same_template,
    start_server,
    template_signature,
    templated_math_stream,
)


def body(model: str, prompt: str) -> bytes:
    return json.dumps({"model": model, "messages": as_messages(prompt), "logprobs": True}).encode()


@pytest.fixture
def client_for() -> Iterator:
    clients: list[httpx.Client] = []

    def make(sim: SimBackend) -> httpx.Client:
        c = httpx.Client(transport=sim.transport())
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def test_stream_is_seeded_and_templated() -> None:
    a = templated_math_stream(50, n_templates=5, seed=3)
    assert a == templated_math_stream(50, n_templates=5, seed=3)
    assert a != templated_math_stream(50, n_templates=5, seed=4)
    assert len({q.template for q in a}) == 5
    assert len({template_signature(q.text) for q in a}) == 5  # signature == template
    with pytest.raises(InvalidArgumentError, match="n_templates"):
        templated_math_stream(5, n_templates=0)


def test_deterministic_given_seed_and_request() -> None:
    q = templated_math_stream(1, seed=1)[0]
    r1 = SimBackend(seed=7).respond(
        "POST", "/v1/chat/completions", body("sim-weak", strategy_free_prompt(q))
    )
    r2 = SimBackend(seed=7).respond(
        "POST", "/v1/chat/completions", body("sim-weak", strategy_free_prompt(q))
    )
    r3 = SimBackend(seed=8).respond(
        "POST", "/v1/chat/completions", body("sim-weak", strategy_free_prompt(q))
    )
    assert r1 == r2 and r1.body != r3.body


def test_logprobs_consistent_with_confidence(client_for) -> None:
    sim = SimBackend(seed=0)
    client = client_for(sim)
    weak = ChatModel("http://sim/v1", "sim-weak", client=client)
    for q in templated_math_stream(20, seed=2):
        g = weak.generate(as_messages(strategy_free_prompt(q)))
        assert "".join(g.tokens) == g.text and g.completion_tokens == len(g.tokens)
        assert all(lp <= 0 for lp in g.logprobs)
        assert answer_span_confidence(g.text, g.tokens, g.logprobs) == pytest.approx(g.confidence)
        assert 40 < g.completion_tokens < 300 and g.prompt_tokens > 30  # realistic sizes


def test_weak_is_weak_strong_is_strong_correct_is_confident(client_for) -> None:
    # Deterministic given the seeds (no flake); the margins are wide for 400 draws.
    client = client_for(SimBackend(seed=0))
    stream = templated_math_stream(400, n_templates=20, seed=5)
    for name, lo, hi in (("sim-weak", 0.05, 0.30), ("sim-strong", 0.65, 0.95)):
        m = ChatModel("http://sim/v1", name, client=client)
        gens = [(m.generate(as_messages(strategy_free_prompt(q))), q) for q in stream]
        ok = [bool(grade(g.text, q.gold, "math").correct) for g, q in gens]
        acc = sum(ok) / len(ok)
        assert lo < acc < hi, (name, acc)
        conf_ok = [g.confidence for (g, _), c in zip(gens, ok, strict=True) if c]
        conf_bad = [g.confidence for (g, _), c in zip(gens, ok, strict=True) if not c]
        assert sum(conf_ok) / len(conf_ok) > sum(conf_bad) / len(conf_bad) + 0.2


def test_weak_learns_only_from_a_same_template_strategy_in_its_prompt(client_for) -> None:
    client = client_for(SimBackend(seed=0))
    weak = ChatModel("http://sim/v1", "sim-weak", client=client)
    strong = ChatModel("http://sim/v1", "sim-strong", client=client)
    stream = templated_math_stream(200, n_templates=8, seed=9)
    teacher: dict[str, Entry] = {}
    for q in stream:  # the strong model writes one strategy per template
        if q.template not in teacher:
            g = strong.generate(as_messages(strategy_generation_prompt(q, q.gold or "")))
            strategy = g.text.split("Strategy:", 1)[1].strip()
            assert template_signature(q.text) in strategy  # names its pattern in words
            teacher[q.template or ""] = Entry(q.text, q.gold or "", strategy)
    other = {t: next(e for u, e in teacher.items() if u != t) for t in teacher}
    base = same = cross = 0
    for q in stream:

        def right(prompt: str, q: Query = q) -> bool:
            return bool(grade(weak.generate(as_messages(prompt)).text, q.gold, "math").correct)

        b, s, c = (
            right(strategy_free_prompt(q)),
            right(weak_prompt(q, [teacher[q.template or ""]])),
            right(weak_prompt(q, [other[q.template or ""]])),
        )
        assert c == b  # an unrelated strategy changes nothing (same luck per question)
        assert s or not b  # a fitting strategy never hurts
        base, same, cross = base + b, same + s, cross + c
    assert base / len(stream) < 0.3 and same / len(stream) > 0.7


def test_routes_and_unknown_model(client_for) -> None:
    client = client_for(SimBackend())
    assert [m["id"] for m in client.get("http://sim/v1/models").json()["data"]] == [
        "sim-mid",
        "sim-strong",
        "sim-weak",
    ]
    with pytest.raises(BadRequestError, match="404"):
        ChatModel("http://sim/v1", "gpt-5", client=client).generate(as_messages("hi"))


def test_faults_transient_then_ok_and_persistent(client_for) -> None:
    q = templated_math_stream(1)[0]
    msgs = as_messages(strategy_free_prompt(q))
    clean = ChatModel("http://sim/v1", "sim-weak", client=client_for(SimBackend())).generate(msgs)
    for kind in ("rate_429", "rate_500", "rate_timeout"):
        sim = SimBackend(faults=Faults(**{kind: 1.0}, transient_attempts=2))
        sleeps: list[float] = []
        m = ChatModel("http://sim/v1", "sim-weak", client=client_for(sim), sleep=sleeps.append)
        g = m.generate(msgs)
        assert g == clean and g.attempts == 3  # retried, then the very same completion
        if kind == "rate_429":
            assert sleeps == [0.01, 0.01]  # Retry-After honoured
    for kind, exc in (
        ("rate_malformed", MalformedResponse),
        ("rate_missing_logprobs", LogprobsUnavailable),
    ):
        sim = SimBackend(faults=Faults(**{kind: 1.0}))
        with pytest.raises(exc):
            ChatModel("http://sim/v1", "sim-weak", client=client_for(sim)).generate(msgs)
    with pytest.raises(InvalidArgumentError, match="rates"):
        Faults(rate_429=0.7, rate_500=0.7)


def test_server_over_sockets_matches_mock_transport(client_for) -> None:
    qs = templated_math_stream(5, seed=11)
    mock = ChatModel("http://sim/v1", "sim-strong", client=client_for(SimBackend(seed=4)))
    with start_server(seed=4) as server, httpx.Client() as c:
        real = ChatModel(server.base_url, "sim-strong", client=c)
        for q in qs:
            msgs = as_messages(strategy_free_prompt(q))
            assert real.generate(msgs) == mock.generate(msgs)
        assert c.get(server.base_url + "/models").status_code == 200


def test_server_timeout_fault_is_a_real_timeout() -> None:
    q = templated_math_stream(1)[0]
    msgs = as_messages(strategy_free_prompt(q))
    with (
        start_server(faults=Faults(rate_timeout=1.0, timeout_s=0.4)) as server,
        httpx.Client() as c,
    ):
        m = ChatModel(server.base_url, "sim-weak", client=c, timeout=0.1, backoff_base=0.01)
        g = m.generate(msgs)
        assert g.attempts == 2 and math.isfinite(g.confidence)


def test_same_template_is_read_from_the_text() -> None:
    a = ("A building is made out of 5 white blocks, 2 times as many green blocks, and an unknown "
         "number of black blocks. If there are 25 blocks in the building in total, how many black "
         "blocks are there?")
    b = ("A building is made out of 7 orange tiles, 2 times as many purple tiles, and an unknown "
         "number of black tiles. If there are 30 tiles in the building in total, how many black "
         "tiles are there?")
    c = "A parasite infects 18 people. Every day, each infected person infects 4 others. How many?"
    assert template_signature(a) != template_signature(b)  # names and objects vary
    assert same_template(a, b) and not same_template(a, c)
    qs = templated_math_stream(60, n_templates=10, seed=2)
    for x in qs[:12]:
        for y in qs[:12]:
            assert same_template(x.text, y.text) == (x.template == y.template)


def _weak_runs(knobs: SimKnobs, example_answer: str | None) -> tuple[float, float]:
    """(accuracy, mean confidence) of sim-weak on 150 problems of one template, shown one
    example of that template whose answer is right (None) or ``example_answer``."""
    qs = [q for q in templated_math_stream(400, n_templates=2, seed=3) if q.template == "builtin-0"]
    ex = qs[0]
    entry = Entry(ex.text, ex.gold if example_answer is None else example_answer, "add, then subtract")
    sim = SimBackend(seed=4, knobs=knobs)
    with httpx.Client(transport=sim.transport()) as client:
        weak = ChatModel("http://sim/v1", "sim-weak", client=client)
        gens = [(q, weak.generate(as_messages(weak_prompt(q, [entry])))) for q in qs[1:151]]
    right = [bool(grade(g.text, q.gold, "math").correct) for q, g in gens]
    return sum(right) / len(right), sum(g.confidence for _, g in gens) / len(gens)


def test_knobs_the_default_is_the_papers_assumption_and_each_knob_can_disagree() -> None:
    # Deterministic given the seeds; the bounds sit > 4 binomial sd (n = 150) from the
    # expected values, so another seed would pass with probability > 0.999.
    acc, conf = _weak_runs(SimKnobs(), None)
    acc_wrong, conf_wrong = _weak_runs(SimKnobs(), "-1")
    assert acc > 0.7 and acc_wrong == acc and conf_wrong == conf  # a wrong example helps too
    acc, _ = _weak_runs(SimKnobs(taught_accuracy=0.3), None)
    assert acc < 0.45  # the benefit is a parameter
    misled, misled_conf = _weak_runs(SimKnobs(mislead_rate=1.0), "-1")
    assert misled == 0.0 and misled_conf >= 0.94  # copied, confidently
    acc_right, _ = _weak_runs(SimKnobs(mislead_rate=1.0), None)
    assert acc_right > 0.7  # a right example still helps
    _, boosted = _weak_runs(SimKnobs(confidence_boost=0.5), None)
    assert boosted > conf + 0.05
    with pytest.raises(InvalidArgumentError, match="mislead_rate"):
        SimKnobs(mislead_rate=1.5)
    with pytest.raises(InvalidArgumentError, match="taught_accuracy"):
        SimKnobs(taught_accuracy=-0.1)
