"""The gateway's work behind the HTTP layer: one request through the cascade, async.

:meth:`Gateway.complete` hands the query to :meth:`~intercascade_core.service.Cascade.aask`,
the service's async driver: the same :class:`~intercascade_core.core.machine.QueryMachine`
decides and the same commit stores, as for :meth:`~intercascade_core.service.Cascade.ask`.
The gateway only performs the machine's requests: model calls on the levels' async clients
and embeddings on the micro-batching worker thread.

Deadline. Every request has ``deadline_s``. Model calls get what is left of it minus
``commit_reserve_s``; a call cut by the deadline is a failed call
(:class:`~intercascade_core.errors.DeadlineExceeded`) and the cascade's rule for failures
applies (the level defers), so the query still ends with an outcome that is committed. If
nothing is left for the embedding or the commit, the client gets a 504 at the deadline;
a commit already started still completes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from ..core.audit import RiskAlarm, apply_alarm
from ..core.machine import Call, Embed, single_call
from ..core.protocols import Generation
from ..core.tasks import Query
from ..errors import DeadlineExceeded, InvalidArgumentError, ModelError, ServiceClosedError
from ..service import Cascade
from .audit import AuditBook
from .batching import EmbedBatcher
from .metrics import GatewayMetrics
from .protocol import (
    CASCADE_MODEL,
    ChatRequest,
    RequestError,
    decision,
    decision_headers,
    usage_of,
    without_strategy,
)

__all__ = ["Answer", "AsyncLevel", "AsyncTextModel", "Gateway"]

log = logging.getLogger("intercascade.gateway")


class AsyncTextModel(Protocol):
    """What the gateway needs from a level's model (``AsyncChatModel``)."""

    @property
    def model(self) -> str: ...
    async def generate(self, messages: Sequence[Mapping[str, str]], **params: Any) -> Generation: ...


@dataclass(frozen=True, slots=True)
class AsyncLevel:
    """One level as the gateway calls it: an async model, its name and request params."""

    model: AsyncTextModel
    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Answer:
    """What a completion response is made of."""

    cid: str
    created: int
    model: str
    text: str
    usage: dict[str, int]
    extension: dict[str, Any]
    headers: dict[str, str]


@dataclass(slots=True)
class _Served:
    """A completion the gateway remembers for feedback."""

    tenant: str | None
    level: int | None  # the audited level that accepted it, or None
    why_not: str  # why feedback on it is not audited (when level is None)
    labelled: bool = False


class Gateway:
    """The cascade served to async HTTP handlers (module docstring).

    ``cascade`` holds the state and commits; ``levels`` are the async twins of its levels
    (same names, in order); ``batcher`` embeds; ``audit`` watches accepted answers.
    """

    def __init__(
        self,
        cascade: Cascade,
        levels: Sequence[AsyncLevel],
        batcher: EmbedBatcher,
        audit: AuditBook,
        *,
        deadline_s: float = 60.0,
        commit_reserve_s: float | None = None,
        commit_threads: int = 8,
        retrieve_threads: int = 4,
        remember: int = 100_000,
    ) -> None:
        names = tuple(lv.name for lv in levels)
        if names != cascade.names:
            raise InvalidArgumentError(
                "levels", f"async levels {names} differ from the cascade's {cascade.names}"
            )
        if CASCADE_MODEL in names:
            raise InvalidArgumentError("levels", f"a level may not be named {CASCADE_MODEL!r}")
        if not (isinstance(deadline_s, int | float) and math.isfinite(deadline_s) and deadline_s > 0):
            raise InvalidArgumentError("deadline_s", f"must be a finite number > 0, got {deadline_s!r}")
        self.cascade = cascade
        self.levels = tuple(levels)
        self.names = names
        self.batcher = batcher
        self.audit = audit
        self.deadline_s = float(deadline_s)
        self.commit_reserve_s = (
            min(1.0, 0.1 * self.deadline_s) if commit_reserve_s is None else commit_reserve_s
        )
        self.models = (CASCADE_MODEL, *names)
        self.metrics = GatewayMetrics(names, lambda: cascade.state, lambda: audit.states,
                                      lambda: batcher.stats)
        self._executor = ThreadPoolExecutor(commit_threads, thread_name_prefix="gateway-commit")
        # retrievals on their own threads: never queued behind commits waiting for their turn
        self._retrievals = ThreadPoolExecutor(retrieve_threads,
                                              thread_name_prefix="gateway-retrieve")
        self._served: OrderedDict[str, _Served] = OrderedDict()
        self._remember = remember
        for level, alarm in audit.alarms():  # a restart under the same calibration
            self._apply_alarm(level, alarm)

    # -- cascade completions -------------------------------------------------------------
    async def complete(
        self, req: ChatRequest, tenant: str | None, *, started: float | None = None
    ) -> Answer:
        """Run one request through the cascade; raises :class:`RequestError` (400, 502,
        503, 504) when there is no answer to give. The deadline runs from ``started``
        (a ``time.perf_counter()`` value: when the request arrived; default now)."""
        t0 = time.perf_counter()
        query = Query(text=req.problem(), family=req.family, id=req.query_id)
        thresholds = self.cascade.state.thresholds  # as this request starts
        deadline_at = (t0 if started is None else started) + self.deadline_s
        answers: dict[int, Generation] = {}
        spent = {"model": 0.0, "embed": 0.0}

        async def perform(call: Call) -> object:
            t = time.perf_counter()
            if isinstance(call, Embed):
                try:
                    return await self.batcher.embed(call.text)
                finally:
                    spent["embed"] += time.perf_counter() - t
            level = self.levels[call.level]
            left = deadline_at - self.commit_reserve_s - t
            if left <= 0:
                return DeadlineExceeded(
                    f"{level.name}: the request's {self.deadline_s:g}s deadline left no time "
                    "for this call", model=level.name)
            try:
                async with asyncio.timeout(left):
                    gen = await level.model.generate(call.messages, **level.params)
            except ModelError as e:
                return e
            except TimeoutError:
                return DeadlineExceeded(
                    f"{level.name}: cut at the request's {self.deadline_s:g}s deadline",
                    model=level.name)
            finally:
                spent["model"] += time.perf_counter() - t
            if call.purpose == "answer":
                answers[call.level] = gen
            return gen

        try:
            async with asyncio.timeout(deadline_at - time.perf_counter()):
                out = await self.cascade.aask(
                    query, tenant=tenant, perform=perform, executor=self._executor,
                    retrieve_off_loop=True, retrieve_executor=self._retrievals,
                )
        except TimeoutError:
            raise RequestError(
                504, f"the request did not finish within its {self.deadline_s:g}s deadline",
                type="server_error", code="deadline_exceeded") from None
        except ServiceClosedError:
            raise RequestError(503, "the gateway is shutting down", type="server_error",
                               code="unavailable") from None
        total = time.perf_counter() - t0
        phases = {
            "model": spent["model"],
            "embed": spent["embed"],
            "retrieval": max(0.0, out.latency_s - spent["model"] - spent["embed"]),
            "commit": max(0.0, total - out.latency_s),
        }
        m = self.metrics
        m.outcome(out)
        for phase, seconds in phases.items():
            m.phase.labels(phase).observe(seconds)
        m.overhead.observe(max(0.0, total - spent["model"]))

        ext = decision(out, self.names, thresholds)
        # where this request's time went, in the gateway (excludes HTTP parsing and writing)
        ext["timing_ms"] = {"total": round(total * 1e3, 3),
                            **{k: round(v * 1e3, 3) for k, v in phases.items()}}
        cid = "chatcmpl-" + secrets.token_hex(12)
        at = ext["level"]
        if at is None:  # every level failed: nothing to answer with
            cut = any(f is not None and "DeadlineExceeded" in f for f in out.failures)
            self._remember_served(cid, _Served(tenant, None, "no answer was given"))
            failures = "; ".join(f for f in out.failures if f is not None)
            if cut:
                raise RequestError(504, f"no level answered within the deadline: {failures}",
                                   type="server_error", code="deadline_exceeded")
            raise RequestError(502, f"every level of the cascade failed: {failures}",
                               type="server_error", code="upstream_failed")
        audited = out.status == "accepted" and at < len(self.names) - 1
        why = ("" if audited else
               "the answer was not accepted (discarded)" if out.status != "accepted" else
               "answers of the last level are not audited")
        self._remember_served(cid, _Served(tenant, at if audited else None, why))
        gen = answers.get(at)
        text = gen.text if gen is not None else ""
        if single_call(at, len(self.names), self.cascade.config):
            text = without_strategy(text)  # the answer is the client's, the strategy ours
        return Answer(
            cid=cid, created=int(time.time()), model=CASCADE_MODEL, text=text,
            usage=usage_of(out), extension={"id": cid, **ext}, headers=decision_headers(ext),
        )

    # -- direct calls --------------------------------------------------------------------
    async def direct(
        self, req: ChatRequest, tenant: str | None, *, started: float | None = None
    ) -> Answer:
        """Forward the request to one level (its id as ``model``): no cascade, no commit."""
        i = self.names.index(req.model)
        level = self.levels[i]
        left = self.deadline_s - (0.0 if started is None else time.perf_counter() - started)
        try:
            async with asyncio.timeout(left):
                gen = await level.model.generate(list(req.messages), **level.params)
        except TimeoutError:
            raise RequestError(504, f"{level.name} did not answer within the "
                               f"{self.deadline_s:g}s deadline", type="server_error",
                               code="deadline_exceeded") from None
        except ModelError as e:
            raise RequestError(502, f"{level.name} failed: {e.reason}", type="server_error",
                               code="upstream_failed") from None
        self.metrics.calls.labels(str(i), level.name).inc()
        cid = "chatcmpl-" + secrets.token_hex(12)
        self._remember_served(cid, _Served(tenant, None, "a direct call is not a cascade decision"))
        ext = {"id": cid, "direct": True, "level": i, "model": level.name,
               "confidence": gen.confidence if math.isfinite(gen.confidence) else None}
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                 "total_tokens": gen.prompt_tokens + gen.completion_tokens}
        headers = {"x-intercascade-level": str(i), "x-intercascade-model": level.name,
                   "x-intercascade-status": "direct"}
        return Answer(cid, int(time.time()), level.name, gen.text, usage, ext, headers)

    # -- feedback ------------------------------------------------------------------------
    def _remember_served(self, cid: str, served: _Served) -> None:
        self._served[cid] = served
        while len(self._served) > self._remember:
            self._served.popitem(last=False)

    async def feedback(self, cid: str, correct: bool, tenant: str | None) -> dict[str, Any]:
        """One label for the audit of the level that accepted completion ``cid``."""
        served = self._served.get(cid)
        if served is None or served.tenant != tenant:
            raise RequestError(
                404, f"no completion {cid[:80]!r} is known to this server (it remembers the "
                f"last {self._remember} completions since it started)", code="not_found",
                param="id")
        if served.labelled:
            raise RequestError(409, f"completion {cid[:80]!r} already has feedback",
                               code="duplicate_feedback", param="id")
        served.labelled = True
        if served.level is None:
            return {"id": cid, "audited": False, "reason": served.why_not}
        level = served.level
        loop = asyncio.get_running_loop()
        state, alarm = await loop.run_in_executor(self._executor, self.audit.observe, level, correct)
        if alarm is not None:
            await loop.run_in_executor(self._executor, self._apply_alarm, level, alarm)
        return {"id": cid, "audited": True, "level": level, "model": self.names[level],
                "audit": state.summary()}

    def _apply_alarm(self, level: int, alarm: RiskAlarm) -> None:
        """(Blocking.) Stop accepting at ``level``: its threshold abstains until a new
        calibration."""
        state = apply_alarm(self.cascade.state, alarm, level=level)
        self.cascade.replace_calibrations(state.calibrations)
        log.warning(
            "risk alarm at level %d (%s): %d of %d audited answers wrong, risk lower bound "
            "%.3f > alpha %.3f; the level now defers every query until a new calibration",
            level, self.names[level], alarm.n_wrong, alarm.n_window, alarm.lower_bound,
            alarm.alpha)

    # -- lifecycle -----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop: embed what is queued, drain and checkpoint the cascade, keep the audit.
        The worker pools are shut down even when a step fails (its error is raised)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.batcher.close)
            await loop.run_in_executor(None, self.cascade.close)
            await loop.run_in_executor(None, self.audit.save)
            for level in self.levels:
                aclose = getattr(level.model, "aclose", None)
                if aclose is not None:
                    await aclose()
        finally:
            self._executor.shutdown(wait=True)
            self._retrievals.shutdown(wait=True)
