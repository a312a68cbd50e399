"""The simulator writes its completion bodies directly: the same bytes as ``json.dumps`` of
the completion object, so a reply means the same with the fast path or without it."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.gateway.demo import demo_problems
from intercascade_core.models import sim
from intercascade_core.models.sim import SimBackend

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, max_size=12), st.lists(st.floats(-50, 0), max_size=12), texts,
       st.integers(0, 10**6))
def test_reply_encode_is_json_dumps_of_its_dict(tokens, lps, model, prompt_tokens):
    n = min(len(tokens), len(lps))
    reply = sim._Reply(id="chatcmpl-" + model, model=model, tokens=tuple(tokens[:n]),
                       logprobs=tuple(lps[:n]), prompt_tokens=prompt_tokens)
    assert reply.encode() == json.dumps(reply.as_dict()).encode()


def test_a_non_finite_logprob_is_written_as_json_writes_it():
    reply = sim._Reply(id="x", model="m", tokens=("a", "b"), logprobs=(-1.0, -math.inf),
                       prompt_tokens=3)
    assert reply.encode() == json.dumps(reply.as_dict()).encode()
    assert b"-Infinity" in reply.encode()


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000ab"), max_size=30))
def test_token_count_is_the_tokenizer_length(text):
    assert sim._count_tokens(text) == len(sim._tokenize(text))


class _Overriding(SimBackend):
    """A subclass that overrides _complete (as sim_copying does): the dict path."""

    def _complete(self, model, prompt, req):  # type: ignore[no-untyped-def]
        return super()._complete(model, prompt, req)


def test_fast_and_dict_paths_send_the_same_bytes():
    fast, slow = SimBackend(seed=5), _Overriding(seed=5)
    for i, q in enumerate(demo_problems(40, seed=11)):
        model = ("sim-weak", "sim-strong")[i % 2]
        content = f'Problem: {q.text} "quoted" \u00e9\u2014 \U0001f600'
        if i % 3 == 0:  # the strong level asked for a strategy too
            content = f"{sim.STRATEGY_REQUEST_MARK}\n{content}"
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                           "logprobs": True}).encode()
        a = fast.respond("POST", "/v1/chat/completions", body)
        b = slow.respond("POST", "/v1/chat/completions", body)
        assert (a.status, a.body, a.headers) == (b.status, b.body, b.headers) and a.status == 200
        doc = json.loads(a.body)
        assert doc["choices"][0]["message"]["content"] == "".join(
            t["token"] for t in doc["choices"][0]["logprobs"]["content"])


def test_token_noise_is_each_tokens_own_hash():
    # past the precomputed indices too
    got = sim._uniforms(1100, 7, "sim-weak", "lp", "What is 2 + 3?", "body")
    assert got == [sim._u(7, "sim-weak", "lp", "What is 2 + 3?", "body", i) for i in range(1100)]


def test_template_signature_is_the_same_remembered_or_not():
    short = "Mia has 3 apples and buys 4 more. How many apples does she have?"
    long = short + " Then she counts them again." * 100
    assert len(long) > 2048
    for q in (short, long):
        assert sim.template_signature(q) == sim._signature(q) == sim.template_signature(q)
    assert sim.template_signature(short) == sim.template_signature(short.replace("3", "17"))
