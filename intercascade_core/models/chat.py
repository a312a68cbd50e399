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

``httpx`` is imported lazily, so the pure core may import the error types and
:class:`Generation` from this module without pulling the HTTP stack.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self

from ..core.protocols import Generation, TextModel
from ..errors import (
    AuthenticationError,
    BadRequestError,
    ContextLengthExceeded,
    DeadlineExceeded,
    IntercascadeError,
    InvalidArgumentError,
    LogprobsUnavailable,
    MalformedResponse,
    ModelError,
    RetriesExhausted,
)

if TYPE_CHECKING:  # pragma: no cover
    import httpx

__all__ = [
    "PRICES",
    "ChatModel",
    "Generation",
    "Price",
    "TextModel",
    "answer_span_confidence",
    "confidence_from_logprobs",
    "price_for",
]


# ----------------------------------------------------------------------------- errors
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


# ----------------------------------------------------------------------------- generation
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


def _retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class ChatModel:
    """An OpenAI-compatible chat model with logprob confidence and robust retries.

    Parameters
    ----------
    base_url, model, api_key:
        Endpoint root (``.../v1``), model id and optional bearer key.
    client:
        An ``httpx.Client`` to use (any transport). When omitted the model creates one and
        closes it in :meth:`close`; a passed client is never closed here.
    timeout:
        Per-attempt timeout in seconds (connect/read/write/pool).
    deadline:
        Total seconds for one :meth:`generate`, backoff sleeps included.
    max_retries, backoff_base, backoff_max:
        Retry budget on 429/5xx/connect and read timeouts: the n-th retry waits
        ``Retry-After`` when the server sends one, else ``min(backoff_max,
        backoff_base * 2**n)`` scaled by a jitter factor in [0.5, 1.5).
    confidence_span:
        ``"all"`` (default: mean over all completion tokens) or ``"answer"`` (the final
        ``Answer:`` line only).
    price:
        Overrides the :data:`PRICES` lookup.
    params:
        Default request parameters (e.g. ``{"temperature": 0}``), overridable per call.
    sleep, clock, jitter_seed:
        Injected for tests (instant, deterministic retries).
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
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter_seed: int | None = None,
    ) -> None:
        import httpx  # lazy: the pure core imports this module's types only

        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidArgumentError("base_url", f"expected an http(s) URL, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError("model", f"expected a non-empty model id, got {model!r}")
        for name, value in (("timeout", timeout), ("deadline", deadline)):
            if not (isinstance(value, int | float) and value > 0):
                raise InvalidArgumentError(name, f"must be > 0 seconds, got {value!r}")
        for name, value in (("backoff_base", backoff_base), ("backoff_max", backoff_max)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise InvalidArgumentError(name, f"must be a finite number >= 0 seconds, got {value!r}")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            raise InvalidArgumentError("max_retries", f"must be an int >= 0, got {max_retries!r}")
        if confidence_span not in ("all", "answer"):
            raise InvalidArgumentError(
                "confidence_span", f"expected 'all' or 'answer', got {confidence_span!r}"
            )
        if client is not None and not isinstance(client, httpx.Client):
            raise InvalidArgumentError(
                "client", f"expected an httpx.Client, got {type(client).__name__}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
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
        self._sleep = sleep
        self._clock = clock
        self._jitter = random.Random(jitter_seed)

    def __repr__(self) -> str:
        return f"ChatModel({self.base_url!r}, {self.model!r})"

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the call --------------------------------------------------------------------------
    def generate(self, messages: Sequence[Mapping[str, str]], **params: Any) -> Generation:
        """POST one chat completion; retry transient failures; return a :class:`Generation`."""
        import httpx

        if not messages:
            raise InvalidArgumentError("messages", "at least one message is required")
        body: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in messages]}
        body.update(self.params)
        body.update(params)
        body["logprobs"] = True  # confidence needs them; never let a caller switch them off
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = f"{self.base_url}/chat/completions"
        start = self._clock()
        attempt = 0
        while True:
            remaining = self.deadline - (self._clock() - start)
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"{self.model}: deadline of {self.deadline}s passed after {attempt} attempts",
                    model=self.model,
                )
            t = min(self.timeout, remaining)
            retry_after: float | None = None
            try:
                t0 = time.perf_counter()
                resp = self._client.post(url, json=body, headers=headers, timeout=t)
                latency = time.perf_counter() - t0
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
                # connect/read/write timeouts, refused or reset connections, dropped replies
                last = f"{type(e).__name__}: {e}"
            except httpx.HTTPError as e:
                # proxy, bad URL scheme, local protocol or body-decoding errors: retrying cannot
                # help, but the caller still gets a typed, recordable ModelError
                raise ModelError(f"{self.model}: {type(e).__name__}: {e}", model=self.model) from e
            else:
                status = resp.status_code
                if status == 200:
                    return self._parse(resp.content, latency, attempt + 1)
                text = resp.text[:500]
                if status in (401, 403):
                    raise AuthenticationError(
                        f"{self.model}: HTTP {status}: {text}", model=self.model, status=status
                    )
                if status not in _RETRY_STATUS:
                    cls = (
                        ContextLengthExceeded
                        if any(h in text.lower() for h in _CONTEXT_HINTS)
                        else BadRequestError
                    )
                    raise cls(
                        f"{self.model}: HTTP {status}: {text}", model=self.model, status=status
                    )
                last = f"HTTP {status}: {text[:200]}"
                retry_after = _retry_after_s(resp.headers.get("retry-after"), time.time())
            if attempt >= self.max_retries:
                raise RetriesExhausted(
                    f"{self.model}: gave up after {attempt + 1} attempts; last: {last}",
                    model=self.model,
                )
            if retry_after is not None:
                delay = retry_after
            else:
                delay = min(self.backoff_max, self.backoff_base * 2**attempt)
                delay *= 0.5 + self._jitter.random()
            if self._clock() - start + delay >= self.deadline:
                raise DeadlineExceeded(
                    f"{self.model}: next retry in {delay:.2f}s would pass the {self.deadline}s "
                    f"deadline; last: {last}",
                    model=self.model,
                )
            self._sleep(delay)
            attempt += 1

    def _parse(self, content: bytes, latency: float, attempts: int) -> Generation:
        def bad(why: str) -> MalformedResponse:
            return MalformedResponse(f"{self.model}: {why}", model=self.model, status=200)

        try:
            data = json.loads(content)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"body is not JSON ({e}): {content[:120]!r}") from None
        try:
            choice = data["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
            usage = data.get("usage") or {}
            if not isinstance(text, str):
                raise TypeError("message.content is not a string")
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise bad(f"no choices[0].message.content ({type(e).__name__}: {e})") from None
        lp_block = choice.get("logprobs")
        items = lp_block.get("content") if isinstance(lp_block, dict) else None
        if items is None:
            if text == "":
                items = []  # an empty completion legitimately has no token logprobs
            else:
                raise LogprobsUnavailable(
                    f"{self.model}: the response has no choices[0].logprobs.content; enable "
                    "logprobs on the server or use a model that returns them",
                    model=self.model,
                )
        try:
            tokens = tuple(str(it["token"]) for it in items)
            logprobs = tuple(float(it["logprob"]) for it in items)
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"bad logprobs entry ({type(e).__name__}: {e})") from None
        if any(not math.isfinite(lp) or lp > 1e-6 for lp in logprobs):
            # -inf from some servers for impossible tokens: clamp; positive is corrupt
            if any(lp > 1e-6 or math.isnan(lp) for lp in logprobs):
                raise bad("a token logprob is positive or NaN")
            logprobs = tuple(max(lp, -1e4) for lp in logprobs)
        if self.confidence_span == "answer":
            conf = answer_span_confidence(text, tokens, logprobs)
        else:
            conf = confidence_from_logprobs(logprobs)
        try:
            prompt_tokens = int(usage.get("prompt_tokens", 0))
            completion_tokens = int(usage.get("completion_tokens", len(tokens)))
        except (TypeError, ValueError, AttributeError) as e:
            raise bad(f"bad usage block ({e})") from None
        cost = None if self.price is None else self.price.cost(prompt_tokens, completion_tokens)
        return Generation(
            text=text,
            tokens=tokens,
            logprobs=logprobs,
            confidence=conf,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            model=str(data.get("model") or self.model),
            cost=cost,
            finish_reason=choice.get("finish_reason"),
            latency_s=latency,
            attempts=attempts,
        )
