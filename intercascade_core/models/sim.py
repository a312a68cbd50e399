"""Deterministic simulated models behind a fake OpenAI-compatible endpoint.

:class:`SimBackend` answers ``POST /v1/chat/completions`` (and ``GET /v1/models``) as a
pure function of its seed and the request body (plus, for injected *transient* faults, how
many times it has seen that exact request). It runs as an ``httpx.MockTransport`` handler
(:meth:`SimBackend.handler`) or as a real HTTP server on 127.0.0.1 (:func:`serve`,
:func:`start_server`, ``intercascade sim-serve --port N``); both give the same bodies.

The simulated world
-------------------
- Problems come from templates (:func:`templated_math_stream`): a fixed wording with
  numbers that vary. A model recognises a problem's template by its *signature*, a hash of
  the question's words with the numbers removed (:func:`template_signature`), and knows
  the answer of built-in templates by reading the numbers. Other datasets can be served
  with an ``answer_key`` (question text -> gold).
- Models (``sim-weak``, ``sim-mid``, ``sim-strong``) have a latent skill per signature.
  Correctness is ``u < p`` for a uniform ``u`` keyed on (seed, model, question), so one
  question's luck is the same with or without strategies; ``p`` is the model's base
  accuracy, or the taught accuracy when its prompt shows an example of the same template.
  The model finds that by reading the prompt, like a real model would, with no side
  channel: an example fits when its problem text is of the same template as the new
  problem (:func:`same_template`: equal signatures for the built-in templates, else
  word overlap, which separates GSM-Symbolic's templates although their variants also
  change names and objects).
- What a fitting example does is set by :class:`SimKnobs`. The default is the paper's
  assumption (a fitting strategy raises accuracy to the profile's ``taught_accuracy`` and
  leaves confidence alone); the knobs let a strategy from a wrong strong answer mislead
  (the model copies the wrong method, with raised confidence), let confidence respond to
  a fitting strategy, and set the taught accuracy, so the simulator can disagree with the
  paper.
- Correct answers are more confident than wrong ones (profile ranges). Per-token logprobs
  are zero-sum perturbations of ``log(confidence)`` on the answer line and on the rest,
  so the whole-completion and the answer-span confidence both equal the drawn value.
  Token counts come from the same whitespace tokeniser for prompt and completion.
- A teacher request (a prompt containing ``prompts.STRATEGY_REQUEST_MARK``) gets
  ``Solution: / Answer: / Strategy:`` sections; the strategy describes the method and names
  the template signature in words.

Faults (:class:`Faults`): per request, keyed on its hash; 429 (with ``Retry-After``), 500
and timeouts are *transient* (the first ``transient_attempts`` tries of that request fail,
later ones succeed); malformed JSON and missing logprobs are *persistent*.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

from ..core import untrusted_json
from ..core.prompts import EXAMPLE_CLOSE, EXAMPLE_OPEN, STRATEGY_REQUEST_MARK
from ..core.tasks import Query, answers_match, extract_answer
from ..errors import InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    import httpx

__all__ = [
    "DEFAULT_PROFILES",
    "Faults",
    "SimBackend",
    "SimKnobs",
    "SimProfile",
    "SimServer",
    "same_template",
    "serve",
    "start_server",
    "template_signature",
    "templated_math_stream",
]


# ----------------------------------------------------------------------------- hashing
def _hasher(*parts: object) -> hashlib.blake2b:
    """The hash state after the parts (each length-prefixed)."""
    m = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        m.update(len(b).to_bytes(8, "little"))
        m.update(b)
    return m


def _h(*parts: object) -> bytes:
    """Stable hash of the parts (never Python's salted ``hash``)."""
    return _hasher(*parts).digest()


def _u(*parts: object) -> float:
    """A uniform in [0, 1) keyed on the parts."""
    return int.from_bytes(_h(*parts)[:8], "little") / 2**64


def _index_part(i: int) -> bytes:
    """What :func:`_hasher` feeds for the part ``i``: its length, then its digits."""
    b = str(i).encode()
    return len(b).to_bytes(8, "little") + b


_INDEX_PARTS = tuple(_index_part(i) for i in range(1024))  # a reply's token indices


def _uniforms(n: int, *parts: object) -> list[float]:
    """``[_u(*parts, i) for i in range(n)]``, hashing the shared parts once."""
    prefix = _hasher(*parts)
    out = []
    for i in range(n):
        m = prefix.copy()
        m.update(_INDEX_PARTS[i] if i < len(_INDEX_PARTS) else _index_part(i))
        out.append(int.from_bytes(m.digest()[:8], "little") / 2**64)
    return out


_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_BLOCK = re.compile(
    rf"{re.escape(EXAMPLE_OPEN.split('{')[0])}\d+>>>\n(.*?)\n{re.escape(EXAMPLE_CLOSE.split('{')[0])}",
    re.DOTALL,
)


def template_signature(question: str) -> str:
    """The template of a question: a hash of its lowercased words with numbers removed."""
    if len(question) <= 2048:  # each reply asks it of its question and examples: remembered
        return _remembered_signature(question)
    return _signature(question)


def _signature(question: str) -> str:
    words = _NUMBER.sub(" ", question.lower()).split()
    return "t" + _h(" ".join(words)).hex()[:8]


_remembered_signature = functools.lru_cache(maxsize=8192)(_signature)


_WORD = re.compile(r"[a-z]+")
#: word-set overlap (Jaccard, numbers removed) at which two problems are of one template:
#: over GSM-Symbolic's 85 usable templates x 6 variants every pair of one template
#: overlaps >= 0.475 and every pair of two templates <= 0.41
SAME_TEMPLATE_OVERLAP = 0.45


def same_template(a: str, b: str) -> bool:
    """Whether problems ``a`` and ``b`` read as one template: equal signatures, or (when
    either is not a built-in template) a word overlap of at least
    :data:`SAME_TEMPLATE_OVERLAP`."""
    sa, sb = template_signature(a), template_signature(b)
    if sa == sb:
        return True
    if sa in _SIGNATURES and sb in _SIGNATURES:
        return False
    wa = set(_WORD.findall(_NUMBER.sub(" ", a.lower())))
    wb = set(_WORD.findall(_NUMBER.sub(" ", b.lower())))
    return bool(wa | wb) and len(wa & wb) / len(wa | wb) >= SAME_TEMPLATE_OVERLAP


# ----------------------------------------------------------------------------- templates
@dataclass(frozen=True, slots=True)
class _Structure:
    text: str  # format with {name} {name2} {obj} {n0} {n1} {n2}
    numbers: Callable[[Callable[[int, int], int]], tuple[int, ...]]
    solve: Callable[[tuple[float, ...]], float]
    method: str  # the reusable strategy, in words


def _nums_addsub(r: Callable[[int, int], int]) -> tuple[int, ...]:
    a, b = r(12, 60), r(5, 40)
    return a, b, r(1, a)


def _nums_div(r: Callable[[int, int], int]) -> tuple[int, ...]:
    b = r(2, 9)
    return b * r(3, 15), b, r(2, 20)


def _nums_pct(r: Callable[[int, int], int]) -> tuple[int, ...]:
    return 20 * r(2, 30), (10, 20, 25, 50, 75)[r(0, 4)]


def _nums_avg(r: Callable[[int, int], int]) -> tuple[int, ...]:
    a, b = r(10, 50), r(10, 50)
    c = r(10, 50)
    c += (-(a + b + c)) % 3  # a multiple of 3 in total
    return a, b, c


def _nums_save(r: Callable[[int, int], int]) -> tuple[int, ...]:
    b = r(5, 30)
    return b + r(3, 25), b, r(3, 14)


def _nums_half(r: Callable[[int, int], int]) -> tuple[int, ...]:
    a = 2 * r(10, 60)
    return a, r(1, a // 2)


_STRUCTURES: tuple[_Structure, ...] = (
    _Structure(
        "{name} has {n0} {obj}. {name2} gives {name} {n1} more {obj}, and then {name} gives "
        "away {n2} {obj}. How many {obj} does {name} have now?",
        _nums_addsub,
        lambda n: n[0] + n[1] - n[2],
        "track one running total: start from the initial amount, add what is received and "
        "subtract what is given away, in the order the events happen",
    ),
    _Structure(
        "{name} buys {n0} boxes of {obj}. Each box holds {n1} {obj}. {name} already had {n2} "
        "{obj}. How many {obj} does {name} have in total?",
        lambda r: (r(2, 12), r(3, 24), r(1, 40)),
        lambda n: n[0] * n[1] + n[2],
        "multiply the number of groups by the size of each group, then add the amount that "
        "was there before",
    ),
    _Structure(
        "{name} puts {n0} {obj} equally into {n1} baskets. Then {name2} adds {n2} {obj} to "
        "one basket. How many {obj} are in that basket now?",
        _nums_div,
        lambda n: n[0] / n[1] + n[2],
        "divide the total equally to get the amount per group, then add the extra amount "
        "only to the single group the question asks about",
    ),
    _Structure(
        "A store has {n0} {obj} and {name} sells {n1} percent of them on Monday. How many "
        "{obj} are left in the store?",
        _nums_pct,
        lambda n: n[0] * (100 - n[1]) / 100,
        "convert the percentage sold into the percentage kept (100 minus it) and multiply the "
        "total by that fraction",
    ),
    _Structure(
        "{name} has {n0} {obj}. {name2} has {n1} times as many {obj} as {name}, minus {n2}. "
        "How many {obj} do {name} and {name2} have together?",
        lambda r: (r(3, 30), r(2, 6), r(1, 9)),
        lambda n: n[0] + n[0] * n[1] - n[2],
        "compute the second person's amount from the first (multiply, then subtract), and "
        "add both amounts at the end",
    ),
    _Structure(
        "{name} collected {n0}, {n1} and {n2} {obj} over three days. What is the average "
        "number of {obj} {name} collected per day?",
        _nums_avg,
        lambda n: (n[0] + n[1] + n[2]) / 3,
        "add the amounts of all days and divide by the number of days",
    ),
    _Structure(
        "{name} earns {n0} dollars per day selling {obj} and spends {n1} dollars per day on "
        "supplies. How many dollars does {name} save in {n2} days?",
        _nums_save,
        lambda n: (n[0] - n[1]) * n[2],
        "find the daily saving as earnings minus spending, then multiply by the number of days",
    ),
    _Structure(
        "There are {n0} {obj} in a crate. {name} takes half of them, then {name2} takes {n1} "
        "of the remaining {obj}. How many {obj} are left in the crate?",
        _nums_half,
        lambda n: n[0] / 2 - n[1],
        "halve the total first, then subtract the second amount from what remains",
    ),
)
_CAST: tuple[tuple[str, str, str], ...] = (
    ("Mia", "Leo", "apples"),
    ("Ravi", "Ana", "marbles"),
    ("Tom", "Zoe", "stickers"),
    ("Nora", "Ben", "pencils"),
    ("Omar", "Ivy", "cookies"),
)
N_BUILTIN_TEMPLATES = len(_STRUCTURES) * len(_CAST)


def _render(t: int, nums: tuple[int, ...]) -> str:
    s = _STRUCTURES[t % len(_STRUCTURES)]
    name, name2, obj = _CAST[t // len(_STRUCTURES)]
    return s.text.format(
        name=name, name2=name2, obj=obj, **{f"n{i}": v for i, v in enumerate(nums)}
    )


def _solve_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}".rstrip("0")


# signature -> template number; every template's numbers are removed by the signature
_SIGNATURES: dict[str, int] = {
    template_signature(_render(t, (11, 22, 33))): t for t in range(N_BUILTIN_TEMPLATES)
}
assert len(_SIGNATURES) == N_BUILTIN_TEMPLATES  # signatures separate the templates


def templated_math_stream(
    n: int, *, n_templates: int = 10, seed: int = 0, first_template: int = 0
) -> tuple[Query, ...]:
    """``n`` seeded problems drawn uniformly from ``n_templates`` built-in templates.

    Use disjoint seeds for the calibration split and the test stream. ``Query.template``
    carries the template for reporting; models never see it.
    """
    if not (isinstance(n_templates, int) and 1 <= n_templates <= N_BUILTIN_TEMPLATES):
        raise InvalidArgumentError(
            "n_templates", f"must be in 1..{N_BUILTIN_TEMPLATES}, got {n_templates!r}"
        )
    if not (isinstance(n, int) and n >= 0):
        raise InvalidArgumentError("n", f"must be an int >= 0, got {n!r}")
    # spread templates over structures first, so few templates are still varied
    order = [
        (t % len(_CAST)) * len(_STRUCTURES) + t // len(_CAST) for t in range(N_BUILTIN_TEMPLATES)
    ]
    order = [(first_template + i) % N_BUILTIN_TEMPLATES for i in order]
    out = []
    for j in range(n):

        def r(lo: int, hi: int, _j: int = j, _c: list[int] = [0]) -> int:  # noqa: B006
            _c[0] += 1
            return lo + int(_u(seed, "num", _j, _c[0]) * (hi - lo + 1))

        t = order[int(_u(seed, "template", j) * n_templates)]
        nums = _STRUCTURES[t % len(_STRUCTURES)].numbers(r)
        text = _render(t, nums)
        gold = _STRUCTURES[t % len(_STRUCTURES)].solve(tuple(float(x) for x in nums))
        out.append(
            Query(
                text=text,
                gold=_solve_number(gold),
                family="math",
                id=f"sim-{seed}-{j}",
                template=f"builtin-{t}",
            )
        )
    return tuple(out)


# ----------------------------------------------------------------------------- profiles
@dataclass(frozen=True, slots=True)
class SimProfile:
    """A simulated model. Accuracy for a template = ``base_accuracy + skill_spread *
    (s - 1/2)`` with a latent skill ``s`` ~ U(0,1) per (model, template); with a
    same-template strategy in the prompt it is ``taught_accuracy``. Confidence of a correct
    (wrong) answer is ``lo + (hi - lo) * v**power`` with ``v`` ~ U(0,1)."""

    base_accuracy: float
    skill_spread: float
    taught_accuracy: float
    correct_conf: tuple[float, float, float] = (0.72, 0.99, 0.6)
    wrong_conf: tuple[float, float, float] = (0.15, 0.80, 1.5)
    reasoning_tokens: tuple[int, int] = (60, 140)


DEFAULT_PROFILES: Mapping[str, SimProfile] = {
    "sim-weak": SimProfile(0.15, 0.2, 0.85, reasoning_tokens=(60, 140)),
    "sim-mid": SimProfile(0.45, 0.3, 0.9, reasoning_tokens=(80, 180)),
    "sim-strong": SimProfile(0.80, 0.2, 0.9, reasoning_tokens=(100, 240)),
}


def _conf_triple(name: str, value: tuple[float, float, float]) -> None:
    lo, hi, power = value
    if not (0.0 < lo <= hi <= 1.0 and power > 0):
        raise InvalidArgumentError(name, f"needs 0 < lo <= hi <= 1 and power > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class SimKnobs:
    """What an example of the same template in a model's prompt does (every model that
    reads one: in a cascade, the weaker levels).

    taught_accuracy: the accuracy with a fitting example (None: the profile's, 0.85 for
    ``sim-weak``) — the benefit of a fitting strategy.
    mislead_rate: when a fitting example carries a *wrong* answer (the simulator checks it
    against its answer key), the probability that the model copies the wrong method and
    answers wrong, with confidence drawn from ``mislead_conf`` (``lo + (hi - lo) v**power``).
    confidence_boost: with a fitting example, confidence moves this fraction of the way to 1
    (right and wrong answers alike), so a threshold calibrated without strategies admits
    more of the taught answers.
    The defaults (None, 0, 0) are the paper's assumption: a fitting strategy helps, a wrong
    one too, and confidence ignores strategies.
    """

    taught_accuracy: float | None = None
    mislead_rate: float = 0.0
    mislead_conf: tuple[float, float, float] = (0.94, 1.0, 1.0)
    confidence_boost: float = 0.0

    def __post_init__(self) -> None:
        for name in ("mislead_rate", "confidence_boost"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise InvalidArgumentError(name, f"must lie in [0, 1], got {v!r}")
        t = self.taught_accuracy
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0):
            raise InvalidArgumentError("taught_accuracy", f"must be None or lie in [0, 1], got {t!r}")
        _conf_triple("mislead_conf", self.mislead_conf)

    def as_dict(self) -> dict[str, Any]:
        return {"taught_accuracy": self.taught_accuracy, "mislead_rate": self.mislead_rate,
                "mislead_conf": list(self.mislead_conf), "confidence_boost": self.confidence_boost}


#: a misleading teacher: wrong strategies are copied with high confidence, any fitting
#: strategy raises confidence, and right ones help less than the default assumes
MISLEADING_TEACHER = SimKnobs(taught_accuracy=0.6, mislead_rate=0.9, confidence_boost=0.5)


@dataclass(frozen=True, slots=True)
class Faults:
    """Per-request fault probabilities (decided by the request's hash, so reproducible)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    rate_malformed: float = 0.0
    rate_missing_logprobs: float = 0.0
    retry_after: float = 0.01  # seconds, sent in Retry-After on 429
    transient_attempts: int = 1  # how many tries of a faulted request fail
    timeout_s: float = 0.5  # server mode: how long a "timeout" stalls the reply

    def __post_init__(self) -> None:
        rates = (
            self.rate_429,
            self.rate_500,
            self.rate_timeout,
            self.rate_malformed,
            self.rate_missing_logprobs,
        )
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0 + 1e-12:
            raise InvalidArgumentError("rates", f"must be in [0,1] with sum <= 1, got {rates}")

    @property
    def any(self) -> bool:
        """Whether any fault can happen (a draw below a rate of 0 never does)."""
        return any((self.rate_429, self.rate_500, self.rate_timeout, self.rate_malformed,
                    self.rate_missing_logprobs))


# ----------------------------------------------------------------------------- backend
#: the largest request body served (a weak prompt with k strategies is ~30 kB)
MAX_BODY_BYTES = 4 << 20
#: JSON nesting allowed in a request (a chat request nests 3 deep)
MAX_BODY_DEPTH = 16


def _chat_request(body: bytes) -> tuple[dict[str, Any], str, str]:
    """(request, model, prompt) of a chat-completions body; ``ValueError`` naming what is
    wrong when it is not one (the server answers 400 with that text)."""
    req = untrusted_json.loads(body, max_bytes=MAX_BODY_BYTES, max_depth=MAX_BODY_DEPTH)
    if not isinstance(req, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(req)}")
    model = req.get("model")
    if not isinstance(model, str):
        raise ValueError(f"'model' must be a string, got {_json_type(model)}")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty array, got {_json_type(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'content'")
    return req, model, "\n".join(m["content"] for m in messages)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return "missing or null" if value is None else names.get(type(value), type(value).__name__)


_TOKEN = re.compile(r"\s*\S+|\s+")


def _tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _count_tokens(text: str) -> int:
    """``len(_tokenize(text))``: one token per run of non-space (with the space before
    it), and one for trailing space (``\\s`` and ``str.isspace`` agree)."""
    return len(text.split()) + (1 if text[-1:].isspace() else 0)


_FILLER = (
    "First,",
    "read",
    "the",
    "problem",
    "carefully",
    "and",
    "list",
    "the",
    "given",
    "quantities.",
    "Next,",
    "decide",
    "which",
    "operation",
    "connects",
    "them.",
    "Then",
    "compute",
    "step",
    "by",
    "step",
    "and",
    "check",
    "the",
    "units.",
    "So",
    "the",
    "result",
    "follows",
    "from",
    "the",
    "previous",
    "step.",
)


@functools.lru_cache(maxsize=8192)
def _token_json(token: str) -> tuple[str, str]:
    """The JSON of a token and of its UTF-8 bytes, as ``json.dumps`` writes them."""
    return json.dumps(token), json.dumps(list(token.encode()))


@dataclass(frozen=True, slots=True)
class _Reply:
    """One simulated completion: what :meth:`SimBackend._complete` returns as a dict and
    :meth:`encode` writes as its JSON body directly (a reply holds hundreds of token
    records, which ``json.dumps`` of the dict spends most of a reply's time on)."""

    id: str
    model: str
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    prompt_tokens: int

    def as_dict(self) -> dict[str, Any]:
        n = len(self.tokens)
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self.tokens)},
                    "logprobs": {"content": [
                        {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                         "top_logprobs": []}
                        for tok, lp in zip(self.tokens, self.logprobs, strict=True)
                    ]},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": n,
                "total_tokens": self.prompt_tokens + n,
            },
        }

    def encode(self) -> bytes:
        """``json.dumps(self.as_dict()).encode()``, byte for byte, without the dict."""
        if not all(map(math.isfinite, self.logprobs)):  # json writes NaN, repr nan
            return json.dumps(self.as_dict()).encode()
        items = []
        for tok, lp in zip(self.tokens, self.logprobs, strict=True):
            tok_json, bytes_json = _token_json(tok)
            items.append(f'{{"token": {tok_json}, "logprob": {lp!r}, "bytes": {bytes_json}, '
                         '"top_logprobs": []}')
        n = len(self.tokens)
        return (
            f'{{"id": {json.dumps(self.id)}, "object": "chat.completion", "created": 0, '
            f'"model": {json.dumps(self.model)}, "choices": [{{"index": 0, "message": '
            f'{{"role": "assistant", "content": {json.dumps("".join(self.tokens))}}}, '
            f'"logprobs": {{"content": [{", ".join(items)}]}}, "finish_reason": "stop"}}], '
            f'"usage": {{"prompt_tokens": {self.prompt_tokens!r}, "completion_tokens": {n!r}, '
            f'"total_tokens": {self.prompt_tokens + n!r}}}}}'
        ).encode()


@dataclass(frozen=True, slots=True)
class SimResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    timeout: bool = False  # a "timeout" fault: MockTransport raises, the server stalls


@dataclass
class SimBackend:
    """The deterministic fake endpoint. The only mutable part is the per-request attempt
    counter that makes injected 429/500/timeout faults transient (thread-safe)."""

    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    profiles: Mapping[str, SimProfile] = field(default_factory=lambda: dict(DEFAULT_PROFILES))
    answer_key: Mapping[str, str] | None = None
    knobs: SimKnobs = field(default_factory=SimKnobs)
    _attempts: dict[bytes, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- transport glue ----------------------------------------------------------------
    def handler(self) -> Callable[[httpx.Request], httpx.Response]:
        """An ``httpx.MockTransport`` handler."""
        import httpx

        def handle(request: httpx.Request) -> httpx.Response:
            r = self.respond(request.method, request.url.path, request.content)
            if r.timeout:
                raise httpx.ReadTimeout("simulated read timeout", request=request)
            return httpx.Response(r.status, headers=list(r.headers), content=r.body)

        return handle

    def transport(self) -> httpx.MockTransport:
        import httpx

        return httpx.MockTransport(self.handler())

    # -- the pure-ish core ---------------------------------------------------------------
    def respond(self, method: str, path: str, body: bytes) -> SimResponse:
        path = path.rstrip("/")
        if method == "GET" and path.endswith("/models"):
            data = [{"id": m, "object": "model", "owned_by": "sim"} for m in sorted(self.profiles)]
            return self._json(200, {"object": "list", "data": data})
        if method != "POST" or not path.endswith("/chat/completions"):
            return self._error(404, f"no route for {method} {path}", "not_found")
        if len(body) > MAX_BODY_BYTES:
            return self._error(
                413, f"request body of {len(body)} bytes (at most {MAX_BODY_BYTES})",
                "invalid_request_error",
            )
        try:
            req, model, prompt = _chat_request(body)
        except ValueError as e:  # MalformedJSONError is one
            return self._error(400, f"bad request body: {e}", "invalid_request_error")
        if model not in self.profiles:
            shown = model if len(model) <= 100 else model[:100] + "..."
            return self._error(404, f"The model {shown!r} does not exist", "model_not_found")
        # the fault draw is keyed on the whole request; with no faults there is none to draw
        faulty = self.faults.any
        key = _h(self.seed, json.dumps(req, sort_keys=True)) if faulty else b""
        fault = self._fault(key) if faulty else None
        if fault in ("429", "500", "timeout"):
            with self._lock:
                seen = self._attempts.get(key, 0)
                self._attempts[key] = seen + 1
            if seen < self.faults.transient_attempts:
                if fault == "429":
                    return self._error(
                        429,
                        "rate limited",
                        "rate_limit_exceeded",
                        (("Retry-After", f"{self.faults.retry_after:g}"),),
                    )
                if fault == "500":
                    return self._error(500, "internal error", "server_error")
                return SimResponse(0, b"", timeout=True)
        if fault == "malformed":
            return SimResponse(
                200,
                b'{"id": "x", "choices": [{"message": ',
                (("content-type", "application/json"),),
            )
        if fault is None and type(self)._complete is SimBackend._complete:
            # not overridden: the body written directly, the same bytes as the dict's
            body = self._reply(model, prompt, req).encode()
            return SimResponse(200, body, (("content-type", "application/json"),))
        completion = self._complete(model, prompt, req)
        if fault == "missing_logprobs":
            completion["choices"][0]["logprobs"] = None
        return self._json(200, completion)

    def _fault(self, key: bytes) -> str | None:
        f = self.faults
        u = _u(key, "fault")
        for name, rate in (
            ("429", f.rate_429),
            ("500", f.rate_500),
            ("timeout", f.rate_timeout),
            ("malformed", f.rate_malformed),
            ("missing_logprobs", f.rate_missing_logprobs),
        ):
            if u < rate:
                return name
            u -= rate
        return None

    @staticmethod
    def _json(status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> SimResponse:
        return SimResponse(
            status, json.dumps(obj).encode(), (("content-type", "application/json"), *headers)
        )

    def _error(
        self, status: int, message: str, code: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> SimResponse:
        return self._json(
            status, {"error": {"message": message, "type": code, "code": code}}, headers
        )

    # -- the simulated model -------------------------------------------------------------
    def _gold(self, question: str) -> str | None:
        if self.answer_key is not None and question in self.answer_key:
            return self.answer_key[question]
        t = _SIGNATURES.get(template_signature(question))
        if t is None:
            return None
        nums = tuple(float(x) for x in _NUMBER.findall(question))
        return _solve_number(_STRUCTURES[t % len(_STRUCTURES)].solve(nums))

    @staticmethod
    def _question(prompt: str) -> tuple[str, list[str]]:
        """The new problem (after the last example block) and the strategies shown."""
        close_mark = EXAMPLE_CLOSE.split("{")[0]
        cut = prompt.rfind(close_mark)
        tail = prompt[prompt.find("\n", cut) + 1 :] if cut >= 0 else prompt
        m = re.search(r"^(Problem|Question): ", tail, re.MULTILINE)
        question = tail[m.end() :] if m else tail
        if m and m.group(1) == "Question":  # MCQ: the options follow as "A. ..." lines
            question = re.split(r"^A\. ", question, maxsplit=1, flags=re.MULTILINE)[0]
        question = question.strip()
        head = prompt[:cut] if cut >= 0 else ""
        strategies = re.findall(r"^Strategy: (.*)$", head, re.MULTILINE)
        return question, strategies

    @staticmethod
    def _examples(prompt: str) -> list[tuple[str, str]]:
        """(problem, answer) of every example block shown in the prompt."""
        out = []
        for block in _BLOCK.findall(prompt):
            problem = re.search(r"^Problem: (.*)$", block, re.MULTILINE)
            answer = re.search(r"^Answer: (.*)$", block, re.MULTILINE)
            if problem is not None:
                out.append((problem.group(1).strip(), answer.group(1).strip() if answer else ""))
        return out

    def _right(self, problem: str, answer: str) -> bool | None:
        """Whether ``answer`` is the gold answer of ``problem`` (None: gold unknown)."""
        gold = self._gold(problem)
        if gold is None:
            return None
        ans = extract_answer(f"Answer: {answer}", "math")
        return ans is not None and answers_match(ans, gold, "math")

    def _wrong(self, gold: str | None, model: str, question: str) -> str:
        if gold is not None and re.fullmatch(r"[A-D]", gold.strip()):
            letters = [c for c in "ABCD" if c != gold.strip()]
            return letters[int(_u(self.seed, model, "wrong", question) * 3)]
        try:
            g = float(gold) if gold is not None else 0.0
        except ValueError:
            g = 0.0
        off = 1 + int(_u(self.seed, model, "wrong", question) * 9)
        sign = 1 if _u(self.seed, model, "sign", question) < 0.6 else -1
        return _solve_number(g + sign * off if g + sign * off != g else g + 1)

    def _complete(self, model: str, prompt: str, req: Mapping[str, Any]) -> dict[str, Any]:
        """The completion of ``prompt`` by ``model``, as the JSON object it is sent as."""
        return self._reply(model, prompt, req).as_dict()

    def _reply(self, model: str, prompt: str, req: Mapping[str, Any]) -> _Reply:
        prof = self.profiles[model]
        question, _ = self._question(prompt)
        sig = template_signature(question)
        gold = self._gold(question)
        teach = STRATEGY_REQUEST_MARK.lower() in prompt.lower()  # teacher or single-call
        shown_answer = re.search(r"your final answer was: (.*)$", prompt, re.MULTILINE)
        knobs = self.knobs
        fitting = [(q, a) for q, a in self._examples(prompt) if same_template(q, question)]
        taught = bool(fitting)
        misled = (
            knobs.mislead_rate > 0
            and any(self._right(q, a) is False for q, a in fitting)
            and _u(self.seed, model, "mislead", question) < knobs.mislead_rate
        )
        skill = _u(self.seed, model, "skill", sig)
        taught_p = prof.taught_accuracy if knobs.taught_accuracy is None else knobs.taught_accuracy
        p = taught_p if taught else prof.base_accuracy + prof.skill_spread * (skill - 0.5)
        luck = _u(self.seed, model, "luck", question)
        right = not misled and gold is not None and luck < min(1.0, max(0.0, p))
        if shown_answer:  # a strategy call: restate the answer the teacher already gave
            answer = shown_answer.group(1).strip()
        else:
            answer = gold if right and gold is not None else self._wrong(gold, model, question)
        lo, hi, power = (
            knobs.mislead_conf if misled else prof.correct_conf if right else prof.wrong_conf
        )
        # the same draw with or without strategies and in single-call mode, so that only
        # correctness (not luck) separates the variants
        v = _u(self.seed, model, "conf", question, shown_answer is not None)
        conf = lo + (hi - lo) * v**power
        if taught and not misled and knobs.confidence_boost:
            conf += knobs.confidence_boost * (1.0 - conf)
        # reasoning body, then the labelled sections or the answer line
        n_lo, n_hi = prof.reasoning_tokens
        n_words = n_lo + int(_u(self.seed, model, "len", question, teach) * (n_hi - n_lo + 1))
        if shown_answer:  # "a concise solution": the strategy call stays short
            n_words = max(10, n_words // 4)
        start = int(_u(self.seed, model, "start", question) * len(_FILLER))
        words = [_FILLER[(start + i) % len(_FILLER)] for i in range(n_words)]
        reasoning = " ".join(words)
        if teach:
            t = _SIGNATURES.get(template_signature(question))
            method = (
                _STRUCTURES[t % len(_STRUCTURES)].method
                if t is not None
                else "identify the quantities, relate them with the right operations and check the result"
            )
            topic = " ".join(w for w in _NUMBER.sub(" ", question).split()[:6])
            strategy = (
                f'For problems like "{topic} ..." (pattern {sig}): {method}. Pitfalls: '
                "misreading which quantity the question asks for; check the final unit."
            )
            body = f"Solution: {reasoning}"
            answer_line = f"Answer: {answer}"
            tail = f"\nStrategy: {strategy}"
        else:
            body = f"Let's solve it step by step. {reasoning}"
            answer_line = f"Answer: {answer}"
            tail = ""
        body_tokens = _tokenize(body + "\n")
        answer_tokens = _tokenize(answer_line)
        tail_tokens = _tokenize(tail)
        log_c = math.log(conf)
        drawn: list[tuple[list[str], list[float]]] = []
        for part, tag in ((body_tokens + tail_tokens, "body"), (answer_tokens, "answer")):
            noise = _uniforms(len(part), self.seed, model, "lp", question, tag)
            mean = math.fsum(noise) / len(noise) if noise else 0.0
            spread = abs(log_c) * 0.5
            drawn.append((part, [log_c + spread * (e - mean) for e in noise]))  # zero-sum, <= 0
        # order tokens as in the text: body, answer line, then tail
        (first, first_lp), (answer_part, answer_lp) = drawn
        nb = len(body_tokens)
        tokens = (*first[:nb], *answer_part, *first[nb:])
        logprobs = (*first_lp[:nb], *answer_lp, *first_lp[nb:])
        prompt_tokens = sum(_count_tokens(str(m.get("content", ""))) + 4 for m in req["messages"])
        return _Reply(
            id="chatcmpl-" + _h(self.seed, model, prompt).hex()[:24],
            model=model,
            tokens=tokens,
            logprobs=logprobs,
            prompt_tokens=prompt_tokens,
        )


# ----------------------------------------------------------------------------- server
#: seconds a connection may sit idle or take to send a request (then it is closed)
DEFAULT_SOCKET_TIMEOUT_S = 30.0
#: handler threads at most; connections beyond them wait in a queue
DEFAULT_MAX_THREADS = 64
#: connections that may wait for a handler; more are answered 503 at once
DEFAULT_MAX_WAITING = 128
#: the longest a queued connection waits for a handler before it is answered 503
DEFAULT_ADMIT_WAIT_S = 2.0


class _BadFraming(Exception):
    """The request's body cannot be located (its Content-Length is unusable or false)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _reply_and_close(sock: socket.socket, status: int, message: str) -> None:
    """Answer an HTTP/1.1 error on a connection no handler will read, then close it."""
    body = json.dumps({"error": {"message": message, "type": "server_busy", "code": status}})
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    try:
        sock.settimeout(1.0)
        sock.sendall(head.encode() + body.encode())
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the client has gone; nothing to tell it
    finally:
        sock.close()


class _PooledHTTPServer(HTTPServer):
    """An ``HTTPServer`` whose connections are handled by at most ``max_threads`` threads.

    The stdlib ``ThreadingHTTPServer`` starts a thread per connection, so idle clients
    can hold any number of threads. Here accepted connections wait in a bounded queue for
    a pooled handler thread; one that finds the queue full, or that waited longer than
    ``admit_wait_s``, gets ``503`` with ``Retry-After`` and is closed.
    """

    request_queue_size = 128  # listen backlog: bursts of parallel clients are not refused

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_threads: int,
        max_waiting: int,
        admit_wait_s: float,
    ) -> None:
        super().__init__(address, handler)
        self.max_threads = max_threads
        self.admit_wait_s = admit_wait_s
        self._waiting: queue.Queue[tuple[socket.socket, Any, float] | None] = queue.Queue(
            max_waiting
        )
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._idle = 0
        self._active: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if self._idle <= self._waiting.qsize() and len(self._workers) < self.max_threads:
                worker = threading.Thread(
                    target=self._work, daemon=True, name=f"sim-serve-handler-{len(self._workers)}"
                )
                self._workers.append(worker)
                worker.start()
        try:
            self._waiting.put_nowait((request, client_address, time.monotonic()))
        except queue.Full:
            _reply_and_close(request, 503, "server busy: too many connections")

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            item = self._waiting.get()
            with self._lock:
                self._idle -= 1
            if item is None:
                return
            request, client_address, queued_at = item
            if time.monotonic() - queued_at > self.admit_wait_s:
                _reply_and_close(request, 503, "server busy: no handler free in time")
                continue
            with self._lock:
                self._active.add(request)
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                with self._lock:
                    self._active.discard(request)
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out and hang up are expected

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            active, workers = list(self._active), list(self._workers)
        for sock in active:  # wake handlers blocked on a keep-alive read
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].close()
        for _ in workers:
            self._waiting.put(None)
        deadline = time.monotonic() + 5  # daemon threads: a stuck one cannot block exit
        for worker in workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))


def _positive(name: str, value: float, *, integer: bool = False) -> None:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:
        kind = "an integer" if integer else "a finite number"
        raise InvalidArgumentError(name, f"must be {kind} > 0, got {value!r}")


class SimServer:
    """A running HTTP server around a :class:`SimBackend` (see :func:`start_server`).

    It is meant for loopback and tests, but holds up to hostile clients: every socket
    read or write gives up after ``timeout`` seconds; at most ``max_threads`` handler
    threads run (further connections queue, ``max_waiting`` at most, for at most
    ``admit_wait_s`` seconds, else get 503); and a bad request gets a JSON error
    (400 for a malformed, wrongly typed or too deeply nested body or a false
    ``Content-Length``, 413 for a body over :data:`MAX_BODY_BYTES`) instead of a dropped
    connection.
    """

    def __init__(
        self,
        backend: SimBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout: float = DEFAULT_SOCKET_TIMEOUT_S,
        max_threads: int = DEFAULT_MAX_THREADS,
        max_waiting: int = DEFAULT_MAX_WAITING,
        admit_wait_s: float = DEFAULT_ADMIT_WAIT_S,
    ) -> None:
        _positive("timeout", timeout)
        _positive("max_threads", max_threads, integer=True)
        _positive("max_waiting", max_waiting, integer=True)
        _positive("admit_wait_s", admit_wait_s)
        sim = backend
        socket_timeout = float(timeout)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms stalls)
            timeout = socket_timeout  # applied to the connection by StreamRequestHandler

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding") is not None:
                    raise _BadFraming(400, "Transfer-Encoding is not supported; send Content-Length")
                values = self.headers.get_all("Content-Length") or []
                if not values:
                    return b""
                raw = values[0].strip()
                if len(set(values)) > 1 or not re.fullmatch(r"[0-9]{1,18}", raw):
                    raise _BadFraming(400, "Content-Length must be one non-negative integer")
                length = int(raw)
                if length > MAX_BODY_BYTES:
                    raise _BadFraming(
                        413, f"request body over the {MAX_BODY_BYTES} bytes allowed"
                    )
                try:
                    body = self.rfile.read(length) if length else b""
                except TimeoutError:
                    body = b""
                if len(body) < length:
                    raise _BadFraming(400, "request body shorter than its Content-Length")
                return body

            def _serve(self) -> None:
                path = self.path.split("?")[0]
                try:
                    body = self._body()
                except _BadFraming as e:
                    # where the next request would start is unknown: answer, then close
                    self._send(sim._error(e.status, str(e), "invalid_request_error"), close=True)
                    return
                r = sim.respond(self.command, path, body)
                if r.timeout:  # stall past the client's timeout, then answer normally
                    time.sleep(sim.faults.timeout_s)
                    r = sim.respond(self.command, path, body)
                self._send(r)

            def _send(self, r: SimResponse, *, close: bool = False) -> None:
                self.send_response(r.status)
                for k, v in r.headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.body)))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                try:
                    self.end_headers()
                    self.wfile.write(r.body)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    self.close_connection = True  # client gave up (timeout)

            def send_error(
                self, code: int, message: str | None = None, explain: str | None = None
            ) -> None:
                # the stdlib's error page is HTML; clients of this server read JSON. A
                # request line too broken to parse leaves the version at HTTP/0.9, which
                # has no status line: answer as HTTP/1.1 anyway
                self.request_version = "HTTP/1.1"
                text = message or HTTPStatus(code).phrase
                self._send(sim._error(code, text, "invalid_request_error"), close=True)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: tests and benchmarks read stdout

        self.backend = backend
        self.httpd = _PooledHTTPServer(
            (host, port), Handler,
            max_threads=max_threads, max_waiting=max_waiting, admit_wait_s=float(admit_wait_s),
        )
        self.host, self.port = str(self.httpd.server_address[0]), int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> SimServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, daemon=True, name=f"sim-serve:{self.port}"
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


@contextmanager
def start_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    seed: int = 0,
    faults: Faults | None = None,
    backend: SimBackend | None = None,
    timeout: float = DEFAULT_SOCKET_TIMEOUT_S,
    max_threads: int = DEFAULT_MAX_THREADS,
    max_waiting: int = DEFAULT_MAX_WAITING,
    admit_wait_s: float = DEFAULT_ADMIT_WAIT_S,
) -> Iterator[SimServer]:
    """Run the simulator on a background thread for the ``with`` block (port 0 = any free
    port; read ``server.base_url``). The bounds are :class:`SimServer`'s."""
    sim = backend if backend is not None else SimBackend(seed=seed, faults=faults or Faults())
    server = SimServer(
        sim, host, port,
        timeout=timeout, max_threads=max_threads, max_waiting=max_waiting,
        admit_wait_s=admit_wait_s,
    ).start()
    try:
        yield server
    finally:
        server.close()


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    seed: int = 0,
    faults: Faults | None = None,
    ready: Callable[[str], None] | None = None,
    timeout: float = DEFAULT_SOCKET_TIMEOUT_S,
    max_threads: int = DEFAULT_MAX_THREADS,
) -> None:
    """Serve the simulator until interrupted (``intercascade sim-serve``); ``ready`` is
    called with the base URL (``http://HOST:PORT/v1``, the real port when ``port=0``).
    ``timeout`` and ``max_threads`` bound idle clients (see :class:`SimServer`)."""
    server = SimServer(
        SimBackend(seed=seed, faults=faults or Faults()), host, port,
        timeout=timeout, max_threads=max_threads,
    )
    if ready is not None:
        ready(server.base_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
