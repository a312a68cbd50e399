"""The asynchronous twin of :class:`~intercascade_core.models.chat.ChatModel`.

``AsyncChatModel(base_url, model, client=httpx.AsyncClient(...))`` posts the same
``{base_url}/chat/completions`` request (``logprobs: true``) and returns the same
:class:`~intercascade_core.core.protocols.Generation`, raising the same typed
:class:`~intercascade_core.errors.ModelError` subclasses, with the same retry rules
(``Retry-After``, jittered exponential backoff, a total ``deadline``). Only the waiting
differs: ``await model.generate(messages)`` suspends instead of blocking a thread, so one
event loop (the gateway's) can keep thousands of calls in flight.

The settings check, the request body, the retry delay, the outcome of a status and the
parsing of a reply are :mod:`~intercascade_core.models.chat`'s (:func:`~.chat.request_body`,
:class:`~.chat.ReplyCodec`...), not a copy: a reply means the same thing to both clients. ``httpx.MockTransport`` works here too (its handler may be sync or async),
which is how the gateway serves the in-process simulator.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Self

from ..core.protocols import Generation
from ..errors import (
    DeadlineExceeded,
    EndpointUnreachable,
    InvalidArgumentError,
    MalformedResponse,
    ModelError,
    RetriesExhausted,
    redact,
)
from . import chat

if TYPE_CHECKING:  # pragma: no cover
    import httpx

__all__ = ["AsyncChatModel"]


class AsyncChatModel:
    """An OpenAI-compatible chat model for ``asyncio``; see the module docstring.

    Parameters are :class:`~intercascade_core.models.chat.ChatModel`'s, except that
    ``client`` is an ``httpx.AsyncClient`` (when omitted the model owns one and closes it
    in :meth:`aclose`) and ``sleep`` is a coroutine function. ``timeout`` bounds one attempt
    from connecting to the last byte; ``deadline`` bounds a whole :meth:`generate`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        deadline: float = 300.0,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        confidence_span: Literal["all", "answer"] = "all",
        price: chat.Price | None = None,
        params: Mapping[str, Any] | None = None,
        max_response_bytes: int = chat.MAX_RESPONSE_BYTES,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter_seed: int | None = None,
    ) -> None:
        import httpx

        chat.check_settings(
            base_url, model, api_key, timeout=timeout, deadline=deadline,
            backoff_base=backoff_base, backoff_max=backoff_max, max_retries=max_retries,
            max_response_bytes=max_response_bytes, confidence_span=confidence_span,
        )
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise InvalidArgumentError(
                "client", f"expected an httpx.AsyncClient, got {type(client).__name__}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.deadline = float(deadline)
        self.max_retries = max_retries
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.confidence_span = confidence_span
        self.price = price if price is not None else chat.price_for(model)
        self.params = dict(params or {})
        self.max_response_bytes = max_response_bytes
        self._codec = chat.ReplyCodec(model, (api_key,) if api_key else (), self.price,
                                      confidence_span, max_response_bytes)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # parsed once: httpx parses a str URL on every request
        self._url = httpx.URL(f"{self.base_url}/chat/completions")
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._sleep = sleep
        self._clock = clock
        self._jitter = random.Random(jitter_seed)

    def __repr__(self) -> str:
        return redact(f"AsyncChatModel({self.base_url!r}, {self.model!r})")

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the call --------------------------------------------------------------------------
    async def generate(self, messages: Sequence[Mapping[str, str]], **params: Any) -> Generation:
        """POST one chat completion; retry transient failures; return a :class:`Generation`."""
        import httpx

        c = self._codec
        body = chat.request_body(self.model, self.params, messages, params)
        url = f"{self.base_url}/chat/completions"
        start = self._clock()
        attempt = 0
        while True:
            remaining = self.deadline - (self._clock() - start)
            if remaining <= 0:
                raise c.error(
                    DeadlineExceeded,
                    f"deadline of {self.deadline}s passed after {attempt} attempts")
            budget = min(self.timeout, remaining)
            cut_by_deadline = budget < self.timeout
            retry_after: float | None = None
            try:
                status, content, retry_header, latency = await self._exchange(body, budget)
            except TimeoutError:
                if cut_by_deadline:
                    raise c.error(
                        DeadlineExceeded, f"deadline of {self.deadline}s passed during attempt "
                        f"{attempt + 1} (no complete reply)") from None
                last = f"no complete reply within the {self.timeout}s attempt timeout"
            except _TooLarge:
                raise c.error(
                    MalformedResponse,
                    f"body longer than max_response_bytes={self.max_response_bytes}",
                    status=200) from None
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
                why = chat._unreachable(e) if isinstance(e, httpx.ConnectError) else None
                if why is not None:  # down or misconfigured, not flaky: retrying only waits
                    raise c.error(EndpointUnreachable, f"{url}: {why}") from None
                if cut_by_deadline and isinstance(e, httpx.TimeoutException):
                    raise c.error(
                        DeadlineExceeded, f"deadline of {self.deadline}s passed during attempt "
                        f"{attempt + 1} ({type(e).__name__})") from None
                last = f"{type(e).__name__}: {e}"
            except httpx.HTTPError as e:
                raise c.error(ModelError, f"{type(e).__name__}: {e}") from None
            else:
                if status == 200:
                    return c.parse(content, latency, attempt + 1)
                error = c.status_error(status, content)
                if error is not None:
                    raise error
                last = f"HTTP {status}: {c.quote(content, 200)}"
                retry_after = chat._retry_after_s(retry_header, time.time())
            if attempt >= self.max_retries:
                raise c.error(
                    RetriesExhausted, f"gave up after {attempt + 1} attempts; last: {last}")
            delay = chat.retry_delay(attempt, retry_after, self.backoff_base, self.backoff_max,
                                     self._jitter)
            if self._clock() - start + delay >= self.deadline:
                raise c.error(
                    DeadlineExceeded, f"next retry in {delay:.2f}s would pass the "
                    f"{self.deadline}s deadline; last: {last}")
            chat.log_retry(self.model, attempt, self.max_retries, delay, last, c.secrets)
            await self._sleep(delay)
            attempt += 1

    async def _exchange(
        self, payload: dict[str, Any], budget: float
    ) -> tuple[int, bytes, str | None, float]:
        """One request and its reply within ``budget`` seconds (``TimeoutError``): status,
        body (a 200 body up to ``max_response_bytes``, else :class:`_TooLarge`; any other
        cut at the error-body bound), ``Retry-After`` and latency."""
        t0 = time.perf_counter()
        async with asyncio.timeout(budget):
            async with self._client.stream(
                "POST", self._url, json=payload, headers=self._headers, timeout=budget
            ) as resp:
                ok = resp.status_code == 200
                cap = self.max_response_bytes if ok else chat._ERROR_BODY_BYTES
                buf = bytearray()
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    if len(buf) > cap:
                        if ok:
                            raise _TooLarge
                        del buf[cap:]
                        break
                return (resp.status_code, bytes(buf), resp.headers.get("retry-after"),
                        time.perf_counter() - t0)


class _TooLarge(Exception):
    """A 200 body grew past ``max_response_bytes``."""
