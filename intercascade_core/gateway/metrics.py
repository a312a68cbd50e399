"""``GET /metrics``: the gateway in Prometheus text format (``prometheus-client``).

Counters and histograms are updated per request; the repository sizes per tenant, the
thresholds, the strong-call rate and the audit are read from the live state at scrape time
(:class:`StateCollector`), so they are never stale. Each gateway has its own registry.

==========================================  ===========================================
``intercascade_requests_total``              requests by endpoint and HTTP status
``intercascade_errors_total``                error responses by endpoint and error type
``intercascade_level_accepted_total``        queries accepted at each level
``intercascade_level_deferred_total``        queries a level answered (or failed) and passed on
``intercascade_level_calls_total``           answer calls per level
``intercascade_discarded_total``             queries no level accepted
``intercascade_strong_call_rate``            answer calls at the last level / cascade queries
``intercascade_request_seconds``             wall time per request (histogram, by endpoint)
``intercascade_overhead_seconds``            request time minus time in model calls
``intercascade_phase_seconds``               per request: model, embed, retrieval, commit
``intercascade_repository_entries``          strategies per level and tenant
``intercascade_threshold``                   each level's threshold in force (+Inf: abstains)
``intercascade_calibration_guaranteed``      1 when a level's calibration carries the (α, δ)
                                             guarantee, 0 for ``on_fail="jung"``'s fallback
``intercascade_audit_*``                     labels, wrong labels, risk bounds, alarm per level
``intercascade_embed_*``                     texts embedded, embedder calls (batches), seconds in them
==========================================  ===========================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..core.audit import AuditState
from ..core.state import CascadeState, Outcome
from .batching import BatchStats

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "StateCollector"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


class StateCollector(Collector):
    """Scrape-time gauges read from the cascade state and the audit book."""

    def __init__(
        self,
        names: Sequence[str],
        state: Callable[[], CascadeState],
        audits: Callable[[], Sequence[AuditState]],
        embedding: Callable[[], BatchStats] | None = None,
    ) -> None:
        self._names = tuple(names)
        self._state = state
        self._audits = audits
        self._embedding = embedding

    def collect(self) -> Iterator[Metric]:
        if self._embedding is not None:
            stats = self._embedding()
            for name, value, doc in (
                ("texts", stats.texts, "Texts embedded"),
                ("batches", stats.batches, "Embedder calls (a batch of texts each)"),
                ("seconds", stats.seconds, "Seconds inside the embedder"),
            ):
                family = CounterMetricFamily(f"intercascade_embed_{name}", doc)
                family.add_metric([], value)
                yield family
        state = self._state()
        entries = GaugeMetricFamily(
            "intercascade_repository_entries", "Strategies stored, per level and tenant",
            labels=["level", "model", "tenant"])
        for i, repo in enumerate(state.repositories):
            for tenant in repo.tenant_names:
                entries.add_metric([str(i), self._names[i], tenant], repo.tenant_size(tenant))
        yield entries
        thr = GaugeMetricFamily("intercascade_threshold",
                                "Confidence threshold in force per level (+Inf: accepts nothing)",
                                labels=["level", "model"])
        for i, t in enumerate(state.thresholds):
            thr.add_metric([str(i), self._names[i]], t)
        yield thr
        certified = GaugeMetricFamily("intercascade_calibration_guaranteed",
                                      "1 when the level's calibration carries the (alpha, delta) guarantee; "
                                      "0 for the on_fail='jung' fallback threshold",
                                      labels=["level", "model"])
        for i, cal in enumerate(state.calibrations):
            certified.add_metric([str(i), self._names[i]], 1.0 if cal.guaranteed else 0.0)
        yield certified
        calls = state.counters.calls
        n = state.n_queries
        rate = GaugeMetricFamily("intercascade_strong_call_rate",
                                 "Answer calls at the last level per cascade query since start")
        rate.add_metric([], calls[-1] / n if n and calls else math.nan)
        yield rate
        audits = self._audits()
        families = {
            "labels": GaugeMetricFamily("intercascade_audit_labels",
                                        "Feedback labels in the current audit epoch",
                                        labels=["level", "model"]),
            "wrong": GaugeMetricFamily("intercascade_audit_wrong",
                                       "Labels that said the accepted answer was wrong",
                                       labels=["level", "model"]),
            "upper": GaugeMetricFamily("intercascade_audit_risk_upper",
                                       "Clopper-Pearson upper bound on the accepted answers' risk",
                                       labels=["level", "model"]),
            "lower": GaugeMetricFamily("intercascade_audit_risk_lower",
                                       "Clopper-Pearson lower bound on the accepted answers' risk",
                                       labels=["level", "model"]),
            "alarm": GaugeMetricFamily("intercascade_audit_alarm",
                                       "1 when the audit found the risk above alpha: the level "
                                       "defers everything until a new calibration",
                                       labels=["level", "model"]),
        }
        for i, a in enumerate(audits):
            lab = [str(i), self._names[i]]
            families["labels"].add_metric(lab, a.n)
            families["wrong"].add_metric(lab, a.n_wrong)
            families["upper"].add_metric(lab, a.risk_upper)
            families["lower"].add_metric(lab, a.risk_lower)
            families["alarm"].add_metric(lab, 1.0 if a.alarm is not None else 0.0)
        yield from families.values()


class GatewayMetrics:
    """The gateway's registry, its per-request instruments and the state collector."""

    def __init__(
        self,
        names: Sequence[str],
        state: Callable[[], CascadeState],
        audits: Callable[[], Sequence[AuditState]],
        embedding: Callable[[], BatchStats] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("intercascade_requests", "Requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("intercascade_errors", "Error responses by endpoint and type",
                              ["endpoint", "type"], registry=r)
        self.accepted = Counter("intercascade_level_accepted", "Queries accepted per level",
                                ["level", "model"], registry=r)
        self.deferred = Counter("intercascade_level_deferred",
                                "Queries a level answered or failed and passed on",
                                ["level", "model"], registry=r)
        self.calls = Counter("intercascade_level_calls", "Answer calls per level",
                             ["level", "model"], registry=r)
        self.discarded = Counter("intercascade_discarded", "Queries no level accepted", registry=r)
        self.seconds = Histogram("intercascade_request_seconds", "Wall time per request",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("intercascade_overhead_seconds",
                                  "Cascade request time minus time in model calls",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.phase = Histogram("intercascade_phase_seconds",
                               "Time per cascade request in each phase (model calls, embedding, "
                               "retrieval and decisions, commit)",
                               ["phase"], buckets=_LATENCY_BUCKETS, registry=r)
        r.register(StateCollector(names, state, audits, embedding))

    def outcome(self, out: Outcome) -> None:
        """Count a committed outcome per level."""
        for i, name in enumerate(self.names):
            asked = out.confidences[i] is not None or out.failures[i] is not None
            if not asked:
                continue
            self.calls.labels(str(i), name).inc()
            if out.level == i:
                self.accepted.labels(str(i), name).inc()
            else:
                self.deferred.labels(str(i), name).inc()
        if out.status != "accepted":
            self.discarded.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
