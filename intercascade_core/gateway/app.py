"""The gateway's HTTP face: a Starlette app speaking the OpenAI API.

Routes::

    POST /v1/chat/completions   the cascade (model "intercascade") or one level directly
    GET  /v1/models             "intercascade" and each level's id
    POST /v1/feedback           {"id": completion id, "correct": bool}: a label for the audit
    GET  /healthz               {"status": "ok"} while serving
    GET  /metrics               Prometheus text (no key needed)

Every error is an OpenAI error object (``{"error": {"message", "type", "param",
"code"}}``) with a fitting status: 400 malformed or unsupported input, 401 a missing or
unknown key (with a keys file), 404 an unknown model, route or completion, 405 a wrong
method, 408 a body that does not arrive within the deadline, 409 repeated feedback, 413 a
body over 1 MiB, 502 every level failed, 503 shutting down, 504 the deadline passed, 500
anything unforeseen. A response never carries a stack trace: an unforeseen error is logged
on the server with an incident id the client is given.

Streaming (``"stream": true``): the cascade decides before it can answer (the weak answer
is shown only if its confidence clears the threshold), so the decided answer is streamed
once the decision is made. The first byte therefore comes after the decision, about the
non-streamed latency; what streaming still buys a client is the OpenAI chunk protocol
(its code runs unchanged) and the decision headers before the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .engine import Answer, Gateway
from .keys import KeyRing
from .metrics import CONTENT_TYPE
from .protocol import (
    CASCADE_MODEL,
    MAX_BODY_BYTES,
    RequestError,
    chunks,
    completion,
    error_body,
    parse_chat_request,
    parse_feedback,
)

__all__ = ["create_app"]

log = logging.getLogger("intercascade.gateway")

Handler = Callable[[Request], Awaitable[Response]]


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")).encode(), status_code=status,
                    media_type="application/json", headers=dict(headers or {}))


def _error(exc: RequestError) -> Response:
    return _json(exc.body(), exc.status, exc.headers)


async def _body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it passes :data:`MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or len(declared) > 18:
            raise RequestError(400, "Content-Length must be a non-negative integer")
        if int(declared) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes",
                               code="request_too_large")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes",
                               code="request_too_large")
    return bytes(buf)


def create_app(
    gateway: Gateway,
    *,
    keys: KeyRing | None = None,
    on_ready: Callable[[], None] | None = None,
) -> Starlette:
    """The ASGI app over ``gateway``. With ``keys`` every ``/v1`` route needs a key; the
    lifespan calls ``on_ready`` once serving and closes the gateway on shutdown."""
    metrics = gateway.metrics

    def tenant_of(request: Request) -> str | None:
        if keys is None:
            return None
        tenant = keys.tenant(request.headers.get("authorization"))
        if tenant is None:
            raise RequestError(
                401, "missing or unknown API key: send 'Authorization: Bearer KEY' with a key "
                "listed (by its sha256) in the server's keys file", code="invalid_api_key")
        return tenant

    def endpoint(name: str, handler: Handler) -> Handler:
        """Count, time and shield one route: every failure becomes an error object."""

        async def run(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                response = await handler(request)
            except RequestError as e:
                response = _error(e)
                metrics.errors.labels(name, e.code or e.type).inc()
            except Exception:
                incident = secrets.token_hex(6)
                log.exception("unexpected error in %s (incident %s)", name, incident)
                response = _json(error_body(
                    f"internal error (incident {incident}; the server log has the details)",
                    "server_error", "internal_error"), 500)
                metrics.errors.labels(name, "internal_error").inc()
            metrics.requests.labels(name, str(response.status_code)).inc()
            metrics.seconds.labels(name).observe(time.perf_counter() - t0)
            return response

        return run

    async def body_within_deadline(request: Request) -> bytes:
        try:
            async with asyncio.timeout(gateway.deadline_s):
                return await _body(request)
        except TimeoutError:
            raise RequestError(408, "the request body did not arrive within the "
                               f"{gateway.deadline_s:g}s deadline", code="timeout") from None

    async def chat(request: Request) -> Response:
        started = time.perf_counter()  # the deadline runs from here
        tenant = tenant_of(request)
        req = parse_chat_request(await body_within_deadline(request), gateway.models)
        if req.model == CASCADE_MODEL:
            answer = await gateway.complete(req, tenant, started=started)
        else:
            answer = await gateway.direct(req, tenant, started=started)
        if req.stream:
            return _stream(answer, req.include_usage)
        body = completion(answer.cid, answer.created, answer.model, answer.text, answer.usage,
                          answer.extension)
        return _json(body, headers={**answer.headers, "x-request-id": answer.cid})

    async def models(request: Request) -> Response:
        tenant_of(request)
        data = [{"id": CASCADE_MODEL, "object": "model", "created": 0, "owned_by": "intercascade"}]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "intercascade",
                  "intercascade": {"level": i}} for i, n in enumerate(gateway.names)]
        return _json({"object": "list", "data": data})

    async def feedback(request: Request) -> Response:
        tenant = tenant_of(request)
        cid, correct = parse_feedback(await body_within_deadline(request))
        return _json(await gateway.feedback(cid, correct, tenant))

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok", "levels": list(gateway.names)})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        what = "no such route" if status == 404 else "method not allowed" if status == 405 else "error"
        metrics.requests.labels("other", str(status)).inc()
        return _json(error_body(f"{what}: {request.method} {request.url.path[:200]}",
                                "invalid_request_error", "not_found" if status == 404 else None),
                     status)

    async def unexpected(request: Request, exc: Exception) -> Response:
        incident = secrets.token_hex(6)
        log.error("unexpected error (incident %s)", incident, exc_info=exc)
        return _json(error_body(f"internal error (incident {incident})", "server_error",
                                "internal_error"), 500)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await gateway.aclose()

    routes = [
        Route("/v1/chat/completions", endpoint("chat", chat), methods=["POST"]),
        Route("/v1/models", endpoint("models", models), methods=["GET"]),
        Route("/v1/feedback", endpoint("feedback", feedback), methods=["POST"]),
        Route("/healthz", endpoint("healthz", healthz), methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: unexpected},
        lifespan=lifespan,
    )


def _stream(answer: Answer, include_usage: bool) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        for event in chunks(answer.cid, answer.created, answer.model, answer.text,
                            answer.usage if include_usage else None, answer.extension):
            yield event

    headers = {**answer.headers, "x-request-id": answer.cid, "cache-control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
