"""One client for OpenAI-compatible Chat Completions endpoints, with logprob confidence.

``ChatModel(base_url, model, api_key=..., client=...)`` posts
``{base_url}/chat/completions`` with ``logprobs: true`` and returns a frozen
:class:`Generation`. The caller may pass an ``httpx.Client`` with any transport (tests
pass ``httpx.MockTransport(sim.handler(...))``); otherwise the model owns one and closes
it in :meth:`ChatModel.close` / ``with``.

Settings per server (all speak the same protocol; only ``base_url``/key/model differ):

===================  =====================================================  =============
server               base_url                                               api_key
===================  =====================================================  =============
OpenAI               ``https://api.openai.com/v1``                          required
Gemini (OpenAI API)  ``https://generativelanguage.googleapis.com/v1beta/openai``  required
vLLM                 ``http://HOST:8000/v1`` (``vllm serve MODEL``)         optional
llama.cpp server     ``http://HOST:8080/v1`` (``llama-server -m F.gguf``)   optional
Ollama               ``http://HOST:11434/v1`` (Ollama >= 0.12 for logprobs)  any string
===================  =====================================================  =============

Notes: Gemini returns logprobs only for models that support them (e.g. gemini-2.0-flash);
llama-server needs no ``--logprobs`` flag (``logprobs: true`` per request is enough);
older Ollama versions silently drop ``logprobs``, which here raises
:class:`LogprobsUnavailable` rather than reporting a fake confidence of 1.0.

The server is untrusted: one attempt is bounded in wall-clock time however the reply
trickles in, the body is read with the bounded
:func:`~intercascade_core.core.untrusted_json.loads` and its fields type-checked, every
error text passes :func:`~intercascade_core.errors.redact` (the key never appears), and a
refused connection or an unresolvable host fails at once. Call :meth:`ChatModel.probe`
once before a long run to find a wrong URL or key before the first query.

``httpx`` is imported lazily, so the pure core may import the error types and
:class:`Generation` from this module without pulling the HTTP stack.
"""

from __future__ import annotations

import contextvars
import email.utils
import logging
import math
import random
import socket
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self, TypeGuard, TypeVar

from ..core import untrusted_json
from ..core.protocols import Generation, TextModel
from ..errors import (
    AuthenticationError,
    BadRequestError,
    ContextLengthExceeded,
    DeadlineExceeded,
    EndpointUnreachable,
    InvalidArgumentError,
    LogprobsUnavailable,
    MalformedJSONError,
    MalformedResponse,
    ModelError,
    RetriesExhausted,
    redact,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import httpx

__all__ = [
    "MAX_RESPONSE_BYTES",
    "PRICES",
    "ChatModel",
    "Generation",
    "Price",
    "TextModel",
    "answer_span_confidence",
    "confidence_from_logprobs",
    "price_for",
]


# ----------------------------------------------------------------------------- pricing
@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M input (prompt) and output (completion) tokens."""

    input_per_1m: float
    output_per_1m: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


# List prices at the time of writing; pass ``price=`` to ChatModel to override.
PRICES: Mapping[str, Price] = {
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gemini-2.0-flash": Price(0.10, 0.40),
    "gemini-2.5-flash": Price(0.30, 2.50),
    "gemini-1.5-flash": Price(0.075, 0.30),
    # the simulator's models (sim.py): a cheap weak and an expensive strong model
    "sim-weak": Price(0.50, 1.50),
    "sim-mid": Price(1.00, 4.00),
    "sim-strong": Price(2.50, 10.00),
}


def price_for(model: str) -> Price | None:
    """Exact match, else the longest table key that prefixes *model* (dated snapshots)."""
    if model in PRICES:
        return PRICES[model]
    bare = model.rsplit("/", 1)[-1]  # "models/gemini-2.0-flash", "openai/gpt-4o"
    keys = [k for k in PRICES if bare.startswith(k)]
    return PRICES[max(keys, key=len)] if keys else None


# ----------------------------------------------------------------------------- confidence
def confidence_from_logprobs(logprobs: Sequence[float]) -> float:
    """exp(mean token logprob), clipped to [0, 1]; 0.0 for an empty completion (§5)."""
    if len(logprobs) == 0:
        return 0.0
    mean = math.fsum(logprobs) / len(logprobs)
    return min(1.0, max(0.0, math.exp(mean)))


def answer_span_confidence(
    text: str, tokens: Sequence[str], logprobs: Sequence[float], marker: str = "answer:"
) -> float:
    """Confidence over the tokens of the last final-answer line only.

    Tokens are mapped to character offsets of ``"".join(tokens)``; the span is the last line
    containing *marker* (case-insensitive). Without such a line it falls back to the whole
    completion (the answer is then unparseable anyway, so grading marks it wrong).
    """
    joined = "".join(tokens)
    low = joined.lower()
    start = low.rfind(marker)
    if start < 0:
        return confidence_from_logprobs(logprobs)
    line_start = joined.rfind("\n", 0, start) + 1
    line_end = joined.find("\n", start)
    line_end = len(joined) if line_end < 0 else line_end
    span: list[float] = []
    pos = 0
    for tok, lp in zip(tokens, logprobs, strict=True):
        end = pos + len(tok)
        if end > line_start and pos < line_end and tok.strip():
            span.append(lp)
        pos = end
    return confidence_from_logprobs(span)


# ----------------------------------------------------------------------------- client
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
_CONTEXT_HINTS = (  # OpenAI, vLLM, Gemini, llama.cpp, Ollama wordings
    "context length",
    "context_length",
    "maximum context",
    "too many tokens",
    "context window",
    "context size",
    "prompt is too long",
    "exceeds the context",
    "input token count",
)
MAX_RESPONSE_BYTES = 16 * 2**20  # default bound on one completion body
_ERROR_BODY_BYTES = 64 * 2**10  # enough of an error body to classify and quote it
_WATCHDOG_GRACE_S = 0.25  # lets an attempt that noticed its own budget end close cleanly
_MIN_LOGPROB = -1e4  # lower clamp: -inf or -1e308 would overflow fsum
_MAX_TOKENS = 10**9  # no context window is larger; a bigger count is corrupt

_E = TypeVar("_E", bound=ModelError)


def _retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if not math.isnan(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when.timestamp() - now)


def _unreachable(exc: BaseException) -> str | None:
    """Why a connect error means the endpoint is not there (refused, name not resolved);
    None for anything that may pass (resets, timeouts)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cur, socket.gaierror):
            return f"host name not resolved ({cur.strerror or cur})"
        cur = cur.__cause__ or cur.__context__
    return None


def _key_problem(key: str) -> str | None:
    """What makes *key* unusable in a header, without quoting it."""
    for i, ch in enumerate(key):
        if not "!" <= ch <= "~":
            what = (f"U+{ord(ch):04X}" if unicodedata.category(ch)[0] in "CZ"
                    else "a non-ASCII character")
            return (f"character {i + 1} of {len(key)} is {what}; a key is visible ASCII "
                    "without spaces (a pasted newline or quote?). The key is not shown")
    return None


class _AttemptTimedOut(Exception):
    """The attempt's wall-clock budget ran out before the last byte of the reply."""


class _TooLarge(Exception):
    """A 200 body grew past the model's ``max_response_bytes``."""


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    content: bytes  # the whole 200 body; at most _ERROR_BODY_BYTES of any other
    retry_after: str | None
    latency_s: float


def check_settings(
    base_url: object, model: object, api_key: object, *, timeout: object, deadline: object,
    backoff_base: object, backoff_max: object, max_retries: object,
    max_response_bytes: object, confidence_span: object,
) -> None:
    """Refuse a bad client setting with :class:`InvalidArgumentError` naming it (the sync
    and the async client take the same settings)."""
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise InvalidArgumentError(
            "base_url", redact(f"expected an http(s) URL, got {base_url!r}"))
    if not isinstance(model, str) or not model:
        raise InvalidArgumentError("model", f"expected a non-empty model id, got {model!r}")
    if api_key is not None and not isinstance(api_key, str):
        raise InvalidArgumentError("api_key", f"expected a str, got {type(api_key).__name__}")
    problem = _key_problem(api_key) if api_key else None
    if problem is not None:
        raise InvalidArgumentError("api_key", problem)
    for name, value in (("timeout", timeout), ("deadline", deadline)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise InvalidArgumentError(name, f"must be a finite number > 0 seconds, got {value!r}")
    for name, value in (("backoff_base", backoff_base), ("backoff_max", backoff_max)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise InvalidArgumentError(name, f"must be a finite number >= 0 seconds, got {value!r}")
    if not (isinstance(max_retries, int) and max_retries >= 0):
        raise InvalidArgumentError("max_retries", f"must be an int >= 0, got {max_retries!r}")
    if not (isinstance(max_response_bytes, int) and max_response_bytes >= 1):
        raise InvalidArgumentError(
            "max_response_bytes", f"must be an int >= 1, got {max_response_bytes!r}")
    if confidence_span not in ("all", "answer"):
        raise InvalidArgumentError(
            "confidence_span", f"expected 'all' or 'answer', got {confidence_span!r}"
        )


def request_body(
    model: str, defaults: Mapping[str, Any], messages: Sequence[Mapping[str, str]],
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The Chat Completions request of one call: the model's default parameters, then the
    call's, and always ``logprobs: true`` (confidence needs them)."""
    if not messages:
        raise InvalidArgumentError("messages", "at least one message is required")
    body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages]}
    body.update(defaults)
    body.update(params)
    body["logprobs"] = True  # never let a caller switch them off
    return body


def log_retry(
    model: str, attempt: int, max_retries: int, delay: float, last: str, secrets: Sequence[str | None]
) -> None:
    """One WARNING per retry (attempt, what failed, the wait), redacted like every error text."""
    log.warning(
        "%s: attempt %d of %d failed (%s); retrying in %.2fs",
        model, attempt + 1, max_retries + 1, redact(last, secrets), delay,
    )


def retry_delay(
    attempt: int, retry_after: float | None, backoff_base: float, backoff_max: float,
    jitter: random.Random,
) -> float:
    """Seconds before retry ``attempt + 1``: the server's ``Retry-After`` when it sent one,
    else ``min(backoff_max, backoff_base * 2**attempt)`` times a jitter in [0.5, 1.5)."""
    if retry_after is not None:
        return retry_after
    return min(backoff_max, backoff_base * 2.0**attempt) * (0.5 + jitter.random())


@dataclass(frozen=True, slots=True)
class ReplyCodec:
    """What a server's reply means, for the sync and the async client alike: typed errors
    whose text is redacted with the model's key, the outcome of a non-200 status, and the
    parsing of a completion body into a :class:`Generation`."""

    model: str
    secrets: tuple[str, ...]
    price: Price | None
    confidence_span: Literal["all", "answer"]
    max_response_bytes: int

    def error(self, cls: type[_E], why: str, status: int | None = None) -> _E:
        """A typed error whose text has passed :func:`redact` with this model's key."""
        return cls(redact(f"{self.model}: {why}", self.secrets), model=self.model, status=status)

    def quote(self, content: bytes, limit: int) -> str:
        """A redacted prefix of a server's body, fit for an error message."""
        return redact(content.decode("utf-8", "replace"), self.secrets)[:limit]

    def quote_bytes(self, content: bytes, limit: int) -> bytes:
        """The same as bytes: the body's own bytes where nothing was redacted."""
        text = content[:_ERROR_BODY_BYTES].decode("utf-8", "surrogateescape")
        return redact(text, self.secrets).encode("utf-8", "surrogateescape")[:limit]

    def status_error(self, status: int, content: bytes) -> ModelError | None:
        """The error a non-200 reply ends the call with; None when it is to be retried."""
        text = self.quote(content, 500)
        if status in (401, 403):
            return self.error(AuthenticationError, f"HTTP {status}: {text}", status)
        if status in _RETRY_STATUS:
            return None
        lowered = text.lower()
        cls = (ContextLengthExceeded if any(h in lowered for h in _CONTEXT_HINTS)
               else BadRequestError)
        return self.error(cls, f"HTTP {status}: {text}", status)


    def parse(self, content: bytes, latency: float, attempts: int) -> Generation:
        """A 200 body as a :class:`Generation` (typed errors for anything else)."""
        def bad(why: str) -> MalformedResponse:
            return self.error(MalformedResponse, why, 200)

        try:
            data = untrusted_json.loads(content, max_bytes=self.max_response_bytes)
        except MalformedJSONError as e:
            raise bad(f"body is not JSON ({e}): {self.quote_bytes(content, 120)!r}") from None
        if not isinstance(data, dict):
            raise bad(f"body is a JSON {type(data).__name__}, not an object")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise bad("no choices[0] object")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise bad("choices[0].message is not an object")
        text = message.get("content")
        text = "" if text is None else text
        if not isinstance(text, str):
            raise bad(f"message.content is a {type(text).__name__}, not a string")
        lp_block = choice.get("logprobs")
        items = lp_block.get("content") if isinstance(lp_block, dict) else None
        if items is None:
            if text == "":
                items = []  # an empty completion legitimately has no token logprobs
            else:
                raise self.error(
                    LogprobsUnavailable, "the response has no choices[0].logprobs.content; "
                    "enable logprobs on the server or use a model that returns them")
        if not isinstance(items, list):
            raise bad("choices[0].logprobs.content is not a list")
        tokens: list[str] = []
        logprobs: list[float] = []
        # one pass of exact type checks (the reader makes plain dict, str, int and float;
        # bool is not a number): hundreds of items per reply
        for n, it in enumerate(items):
            if type(it) is dict:
                token, lp = it.get("token"), it.get("logprob")
            else:
                token = lp = None
            value = float(lp) if type(lp) is float or type(lp) is int else None
            if type(token) is not str or value is None:
                raise bad(f"logprobs.content[{n}] lacks a string token and a numeric logprob")
            if value > 1e-6:
                raise bad(f"logprobs.content[{n}]: a token logprob is positive")
            tokens.append(token)
            logprobs.append(value if value > _MIN_LOGPROB else _MIN_LOGPROB)  # -1e308: sums overflow
        usage = data.get("usage")
        usage = {} if usage is None else usage
        if not isinstance(usage, dict):
            raise bad("usage is not an object")
        prompt_tokens = self._count(usage, "prompt_tokens", 0)
        completion_tokens = self._count(usage, "completion_tokens", len(tokens))
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("model is not a string")
        finish = choice.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise bad("finish_reason is not a string")
        if self.confidence_span == "answer":
            conf = answer_span_confidence(text, tokens, logprobs)
        else:
            conf = confidence_from_logprobs(logprobs)
        cost = None if self.price is None else self.price.cost(prompt_tokens, completion_tokens)
        return Generation(
            text=text,
            tokens=tuple(tokens),
            logprobs=tuple(logprobs),
            confidence=conf,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            model=model or self.model,
            cost=cost,
            finish_reason=finish,
            latency_s=latency,
            attempts=attempts,
        )

    def _count(self, usage: dict[str, Any], name: str, default: int) -> int:
        """A token count: a whole number in [0, 1e9] (null or absent: *default*)."""
        value = usage.get(name)
        if value is None:
            return default
        if not _is_number(value) or not 0 <= value <= _MAX_TOKENS or value != int(value):
            raise self.error(
                MalformedResponse, f"usage.{name} is not a whole number in [0, {_MAX_TOKENS}]",
                200)
        return int(value)



class ChatModel:
    """An OpenAI-compatible chat model with logprob confidence and robust retries.

    Parameters
    ----------
    base_url, model, api_key:
        Endpoint root (``.../v1``), model id and optional bearer key (visible ASCII; it
        never appears in an error message).
    client:
        An ``httpx.Client`` to use (any transport). When omitted the model creates one and
        closes it in :meth:`close`; a passed client is never closed here.
    timeout:
        Wall-clock seconds for one attempt, from connecting to the last byte of the reply
        (a server that trickles its reply cannot stretch it).
    deadline:
        Total seconds for one :meth:`generate`, attempts and backoff sleeps included.
    max_retries, backoff_base, backoff_max:
        Retry budget on 429/5xx, timeouts and dropped connections: the n-th retry waits
        ``Retry-After`` when the server sends one, else ``min(backoff_max,
        backoff_base * 2**n)`` scaled by a jitter factor in [0.5, 1.5). A refused
        connection or an unresolvable host is never retried (:class:`EndpointUnreachable`).
    confidence_span:
        ``"all"`` (default: mean over all completion tokens) or ``"answer"`` (the final
        ``Answer:`` line only).
    price:
        Overrides the :data:`PRICES` lookup.
    params:
        Default request parameters (e.g. ``{"temperature": 0}``), overridable per call.
    max_response_bytes:
        A longer completion body is a :class:`MalformedResponse` (read no further).
    sleep, clock, jitter_seed:
        Injected for tests (instant, deterministic retries). ``clock`` measures the
        deadline between attempts; the bound inside one attempt is always real time.

    Each attempt runs on a short-lived daemon thread that the caller waits for at most the
    attempt's budget, so nothing a server does (trickled headers or body, a stalled
    name lookup) holds the caller longer; an abandoned attempt stops at its next chunk.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        client: httpx.Client | None = None,
        timeout: float = 60.0,
        deadline: float = 300.0,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        confidence_span: Literal["all", "answer"] = "all",
        price: Price | None = None,
        params: Mapping[str, Any] | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter_seed: int | None = None,
    ) -> None:
        import httpx  # lazy: the pure core imports this module's types only

        check_settings(
            base_url, model, api_key, timeout=timeout, deadline=deadline,
            backoff_base=backoff_base, backoff_max=backoff_max, max_retries=max_retries,
            max_response_bytes=max_response_bytes, confidence_span=confidence_span,
        )
        if client is not None and not isinstance(client, httpx.Client):
            raise InvalidArgumentError(
                "client", f"expected an httpx.Client, got {type(client).__name__}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._secrets: tuple[str, ...] = (api_key,) if api_key else ()
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client()
        self.timeout = float(timeout)
        self.deadline = float(deadline)
        self.max_retries = max_retries
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.confidence_span = confidence_span
        self.price = price if price is not None else price_for(model)
        self.params = dict(params or {})
        self.max_response_bytes = max_response_bytes
        self._sleep = sleep
        self._clock = clock
        self._jitter = random.Random(jitter_seed)
        self._codec = ReplyCodec(model, self._secrets, self.price, confidence_span,
                                 max_response_bytes)

    def __repr__(self) -> str:
        return redact(f"ChatModel({self.base_url!r}, {self.model!r})")

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, cls: type[_E], why: str, status: int | None = None) -> _E:
        return self._codec.error(cls, why, status)

    def _quote(self, content: bytes, limit: int) -> str:
        return self._codec.quote(content, limit)

    # -- the call --------------------------------------------------------------------------
    def generate(self, messages: Sequence[Mapping[str, str]], **params: Any) -> Generation:
        """POST one chat completion; retry transient failures; return a :class:`Generation`."""
        import httpx

        body = request_body(self.model, self.params, messages, params)
        url = f"{self.base_url}/chat/completions"
        start = self._clock()
        attempt = 0
        while True:
            remaining = self.deadline - (self._clock() - start)
            if remaining <= 0:
                raise self._error(
                    DeadlineExceeded,
                    f"deadline of {self.deadline}s passed after {attempt} attempts")
            budget = min(self.timeout, remaining)
            cut_by_deadline = budget < self.timeout
            retry_after: float | None = None
            try:
                reply = self._exchange("POST", url, body, budget, ok_limit=self.max_response_bytes)
            except _AttemptTimedOut:
                if cut_by_deadline:
                    raise self._error(
                        DeadlineExceeded, f"deadline of {self.deadline}s passed during attempt "
                        f"{attempt + 1} (no complete reply)") from None
                last = f"no complete reply within the {self.timeout}s attempt timeout"
            except _TooLarge:
                raise self._error(
                    MalformedResponse,
                    f"body longer than max_response_bytes={self.max_response_bytes}",
                    status=200) from None
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
                why = _unreachable(e) if isinstance(e, httpx.ConnectError) else None
                if why is not None:  # down or misconfigured, not flaky: retrying only waits
                    raise self._error(EndpointUnreachable, f"{url}: {why}") from None
                if cut_by_deadline and isinstance(e, httpx.TimeoutException):
                    raise self._error(
                        DeadlineExceeded, f"deadline of {self.deadline}s passed during attempt "
                        f"{attempt + 1} ({type(e).__name__})") from None
                # connect/read/write timeouts, reset connections, dropped replies
                last = f"{type(e).__name__}: {e}"
            except httpx.HTTPError as e:
                # proxy, bad URL scheme, local protocol or body-decoding errors: retrying cannot
                # help, but the caller still gets a typed, recordable ModelError
                raise self._error(ModelError, f"{type(e).__name__}: {e}") from None
            else:
                status = reply.status
                if status == 200:
                    return self._parse(reply.content, reply.latency_s, attempt + 1)
                error = self._codec.status_error(status, reply.content)
                if error is not None:
                    raise error
                last = f"HTTP {status}: {self._quote(reply.content, 200)}"
                retry_after = _retry_after_s(reply.retry_after, time.time())
            if attempt >= self.max_retries:
                raise self._error(
                    RetriesExhausted, f"gave up after {attempt + 1} attempts; last: {last}")
            delay = retry_delay(attempt, retry_after, self.backoff_base, self.backoff_max,
                                self._jitter)
            if self._clock() - start + delay >= self.deadline:
                raise self._error(
                    DeadlineExceeded, f"next retry in {delay:.2f}s would pass the "
                    f"{self.deadline}s deadline; last: {last}")
            log_retry(self.model, attempt, self.max_retries, delay, last, self._codec.secrets)
            self._sleep(delay)
            attempt += 1

    def probe(self) -> None:
        """Check once, before a run, that the endpoint answers and takes the key.

        ``GET {base_url}/models``; a server without that route (404/405) is asked for a
        1-token completion instead. One attempt, bounded by ``min(timeout, deadline)``.

        Raises :class:`EndpointUnreachable` (refused, unresolvable, no reply in time),
        :class:`AuthenticationError` (401/403) or :class:`BadRequestError` (neither route
        exists, or the completion request is refused: a wrong model id). Other replies
        (429, 5xx) show a server is there and are left to :meth:`generate`'s retries.
        """
        budget = min(self.timeout, self.deadline)
        status, text = self._probe_once("GET", f"{self.base_url}/models", None, budget)
        if status in (404, 405):
            ping = {"model": self.model, "max_tokens": 1,
                    "messages": [{"role": "user", "content": "ping"}]}
            url = f"{self.base_url}/chat/completions"
            status, text = self._probe_once("POST", url, ping, budget)
            if status in (404, 405):
                raise self._error(
                    BadRequestError, f"{self.base_url} has neither /models nor "
                    f"/chat/completions (HTTP {status}): is base_url the API root (.../v1)?",
                    status)
            if 400 <= status < 500 and status not in (401, 403, 408, 409, 425, 429):
                raise self._error(BadRequestError, f"HTTP {status}: {text}", status)
        if status in (401, 403):
            raise self._error(AuthenticationError, f"HTTP {status}: {text}", status)

    def _probe_once(
        self, method: str, url: str, payload: dict[str, Any] | None, budget: float
    ) -> tuple[int, str]:
        import httpx

        try:
            reply = self._exchange(method, url, payload, budget, ok_limit=None)
        except _AttemptTimedOut:
            raise self._error(EndpointUnreachable, f"{url}: no reply within {budget}s") from None
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
            why = _unreachable(e) or f"{type(e).__name__}: {e}"
            raise self._error(EndpointUnreachable, f"{url}: {why}") from None
        except httpx.HTTPError as e:
            raise self._error(ModelError, f"{url}: {type(e).__name__}: {e}") from None
        return reply.status, self._quote(reply.content, 300)

    def _exchange(
        self,
        method: str,
        url: str,
        payload: dict[str, Any] | None,
        budget: float,
        *,
        ok_limit: int | None,
    ) -> _Reply:
        """One request and its reply, from connecting to the last byte within *budget* real
        seconds (else :class:`_AttemptTimedOut`). A 200 body longer than *ok_limit* raises
        :class:`_TooLarge`; other bodies (or any, when *ok_limit* is None) are cut at
        ``_ERROR_BODY_BYTES``. httpx errors propagate unchanged."""
        end = time.monotonic() + budget
        abandoned = threading.Event()
        finished = threading.Event()
        results: list[_Reply] = []
        errors: list[BaseException] = []

        def attempt() -> _Reply:
            t0 = time.perf_counter()
            # the read timeout bounds a silent server; the clock check, a trickling one
            with self._client.stream(
                method, url, json=payload, headers=self._headers, timeout=budget
            ) as resp:
                limit = ok_limit if resp.status_code == 200 else None
                cap = _ERROR_BODY_BYTES if limit is None else limit
                buf = bytearray()
                for chunk in resp.iter_bytes():
                    buf += chunk
                    if len(buf) > cap:
                        if limit is not None:
                            raise _TooLarge
                        del buf[cap:]  # enough to classify and quote
                        break
                    if abandoned.is_set() or time.monotonic() > end:
                        raise _AttemptTimedOut
                return _Reply(resp.status_code, bytes(buf), resp.headers.get("retry-after"),
                              time.perf_counter() - t0)

        def run() -> None:
            try:
                results.append(attempt())
            except BaseException as e:  # handed to the caller's thread
                errors.append(e)
            finally:
                finished.set()

        worker = threading.Thread(target=contextvars.copy_context().run, args=(run,),
                                  name=f"ChatModel({self.model}) attempt", daemon=True)
        worker.start()
        if not finished.wait(budget + _WATCHDOG_GRACE_S):
            abandoned.set()  # the worker closes the connection at its next chunk
            raise _AttemptTimedOut
        if errors:
            raise errors[0]
        return results[0]

    def _parse(self, content: bytes, latency: float, attempts: int) -> Generation:
        return self._codec.parse(content, latency, attempts)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
