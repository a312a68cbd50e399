"""Evaluation: Jung, Random and Retrieval on the same stream with the same calibration.

:func:`evaluate` runs the paper's comparison (Tables 3–5):

1. the strategy-free calibration split goes through every level once and
   :func:`~intercascade_core.core.cascade.calibrate_levels` fixes the thresholds
   (Jung's sequential rule, fixed-sequence testing at (α, δ));
2. the *same* test stream, with the *same* thresholds, runs through three cascades:
   ``jung`` (no strategies: the baseline), ``random`` (k random stored strategies) and
   ``retrieval`` (the top-k most similar: Inter-Cascade), each from an empty repository;
3. Table-2 metrics per variant, with token and cost reductions against ``jung``;
4. optionally (``insitu=True``) a fourth variant, ``retrieval_insitu``: the Retrieval
   cascade deployed with thresholds calibrated *in situ*
   (:func:`~intercascade_core.core.insitu.insitu_calibrate`: the cascade replayed over the
   calibration split with strategies, λ recalibrated on the replay's confidences).

:func:`results_document` adds to every variant a ``"risk"`` block
(:func:`~intercascade_core.core.insitu.risk_summary`): the empirical risk of the accepted weak
answers against α, the α certified at λ_w without and with strategies (Theorem 2.2's
view) and the online audit's verdict replayed over the stream.

:func:`results_document` and :func:`outcome_records` turn the result into the plain data
that :mod:`intercascade_core.lab.report` writes. :func:`make_levels` builds the cascade's
levels from :class:`~intercascade_core.lab.config.ModelConfig` records (real endpoints over
HTTP, or the in-process simulator for ``base_url = "sim:<level>"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import httpx
import numpy as np

from ..core.audit import AuditConfig
from ..core.cascade import (
    CalibrationRun,
    CascadeConfig,
    Level,
    Outcome,
    StreamResult,
    calibrate_levels,
    run_stream,
)
from ..core.insitu import InSituCalibration, insitu_calibrate, risk_summary
from ..core.metrics import Metrics, compute_metrics
from ..core.protocols import Embedder
from ..core.tasks import Query
from ..errors import EndpointError, InvalidArgumentError, MissingAPIKeyError
from ..models.chat import ChatModel, Price
from ..models.response_cache import ResponseCache
from ..models.sim import SimBackend, SimKnobs
from .config import DataConfig, ModelConfig
from .datasets import gsm_symbolic_split, load_dataset, order_stream, split_problems, to_queries

__all__ = [
    "INSITU_VARIANT",
    "VARIANTS",
    "CachedEmbedder",
    "Evaluation",
    "check_calibration_run",
    "evaluate",
    "load_streams",
    "make_embedder",
    "make_levels",
    "outcome_records",
    "results_document",
    "risk_document",
    "sim_client",
    "variant_summary",
]

VARIANTS: Final = ("jung", "random", "retrieval")
#: The variant ``evaluate(..., insitu=True)`` adds: Retrieval with in-situ thresholds.
INSITU_VARIANT: Final = "retrieval_insitu"


def check_calibration_run(run: CalibrationRun, names: Sequence[str]) -> None:
    """Raise :class:`EndpointError` when every calibration call of some level failed
    (a wrong URL, key or model name), instead of silently deferring everything."""
    for name, fails in zip(names, run.failures, strict=True):
        if fails and all(f is not None for f in fails):
            raise EndpointError(f"every calibration call to level {name!r} failed; first error: {fails[0]}")


# --------------------------------------------------------------------------- embeddings


class CachedEmbedder:
    """An :class:`~intercascade_core.core.protocols.Embedder` that remembers every text's vector.

    The three variants embed the same stream; :meth:`prime` embeds it once in batches
    (much faster than one text per call) and later calls are dictionary lookups.
    """
    def __init__(self, inner: Embedder, *, batch_size: int = 64) -> None:
        self.inner = inner
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    @property
    def model_id(self) -> str:
        return str(getattr(self.inner, "model_id", type(self.inner).__name__))

    def prime(self, texts: Sequence[str], *, progress: bool = False) -> None:
        """Embed the texts not cached yet, ``batch_size`` at a time."""
        from tqdm.auto import tqdm

        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        batches = range(0, len(todo), self.batch_size)
        for start in tqdm(batches, desc="embedding", unit="batch", disable=not progress or not todo, leave=False):
            chunk = todo[start : start + self.batch_size]
            rows = np.asarray(self.inner.embed(chunk), dtype=np.float32)
            for t, row in zip(chunk, rows, strict=True):
                row = row.copy()
                row.flags.writeable = False
                self._cache[t] = row

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        self.prime(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.stack([self._cache[t] for t in texts]))


# --------------------------------------------------------------------------- models


def make_embedder(kind: str, model_path: str = "", tokenizer_path: str = "", precision: str = "") -> Embedder:
    """The embedder of an ``[embedder]`` config: ``hashing`` (the test double) or MiniLM
    (``model_path``/``tokenizer_path`` for an ONNX file of one's own; ``precision`` "" keeps
    MiniLM's default, fp32 or ``$INTERCASCADE_MINILM_PRECISION``)."""
    if kind == "hashing":
        from ..models.hashing import HashingEmbedder

        return HashingEmbedder(384)
    from ..models.minilm import MiniLMEmbedder

    return MiniLMEmbedder(model_path or None, tokenizer_path or None, precision=precision or None)


def make_levels(
    models: Sequence[ModelConfig],
    *,
    environ: Mapping[str, str] | None = None,
    client: httpx.Client | None = None,
    sim_client: httpx.Client | None = None,
    probe: bool = False,
) -> tuple[Level, ...]:
    """Cascade levels for configured endpoints, weakest first.

    A ``base_url`` of ``sim:<level>`` is served by the deterministic simulator through
    ``sim_client`` (an ``httpx.Client`` over a ``MockTransport``: no socket, no key; see
    :func:`sim_client`); its ``model`` (``sim-weak``, ``sim-mid``, ``sim-strong``) picks
    the simulated profile. Other models are :class:`~intercascade_core.models.chat.ChatModel`
    clients over ``client`` (default: their own, memoising temperature-0 replies in the
    model's ``response_cache`` file when one is set); a model whose ``api_key_env`` names an
    unset variable raises :class:`MissingAPIKeyError`. With ``probe`` every real endpoint
    without a response cache is asked once (:meth:`ChatModel.probe`), so a refused,
    unresolvable or unauthorised endpoint fails here, at once, not after a calibration of
    failed calls.
    """
    env = os.environ if environ is None else environ
    levels = []
    for i, m in enumerate(models):
        if not m.simulated:
            _check_endpoint(i, m, env)
        price = Price(m.price_input, m.price_output) if m.price_input is not None and m.price_output is not None else None
        params = {"max_tokens": m.max_tokens, "temperature": m.temperature}
        if m.simulated:
            if sim_client is None:
                raise InvalidArgumentError(f"models[{i}].base_url", "a simulated model needs sim_client=")
            model = ChatModel("http://sim.invalid/v1", m.model, client=sim_client, price=price,
                              confidence_span=m.confidence_span)  # type: ignore[arg-type]
        else:
            key = None
            if m.api_key_env:
                key = env.get(m.api_key_env)
                if not key:
                    raise MissingAPIKeyError(
                        f"models[{i}] ({m.name}): environment variable {m.api_key_env} is not set"
                    )
            model_client = client
            if m.response_cache and client is None:
                try:
                    model_client = httpx.Client(transport=ResponseCache(m.response_cache))
                except InvalidArgumentError as e:
                    raise InvalidArgumentError(f"models[{i}].response_cache", str(e)) from None
            model = ChatModel(
                m.base_url, m.model, api_key=key, client=model_client, timeout=m.timeout,
                max_retries=m.max_retries, confidence_span=m.confidence_span,  # type: ignore[arg-type]
                price=price,
            )
        levels.append(Level(model=model, name=m.name, params=params))
    if probe:  # after every level is built: a configuration error is reported first
        for m, lv in zip(models, levels, strict=True):
            if not m.simulated and not m.response_cache and isinstance(lv.model, ChatModel):
                lv.model.probe()
    return tuple(levels)


def _check_endpoint(i: int, m: ModelConfig, env: Mapping[str, str]) -> None:
    """What httpx would only reject at the first request (as a raw exception), refused
    up front: a ``base_url`` that is not a well-formed http(s) URL with a host, and a key
    that cannot be sent in a header (non-ASCII or control characters; never quoted)."""
    try:
        url = httpx.URL(m.base_url)
        ok = url.scheme in ("http", "https") and bool(url.host)
        ok = ok and (url.port is None or 0 < url.port < 65536)
    except (httpx.InvalidURL, ValueError, TypeError):
        ok = False
    if not ok:
        raise InvalidArgumentError(
            f"models[{i}].base_url", f"{m.base_url[:200]!r} is not a well-formed http(s) URL with a host"
        )
    key = env.get(m.api_key_env) if m.api_key_env else None
    if key and not (key.isascii() and key.isprintable()):
        raise InvalidArgumentError(
            f"models[{i}].api_key_env",
            f"environment variable {m.api_key_env} holds a character that cannot be sent in an HTTP "
            "header (non-ASCII or a control character)",
        )


def sim_client(problems: Sequence[Query], *, seed: int = 0, knobs: SimKnobs | None = None) -> httpx.Client:
    """An ``httpx.Client`` whose transport is the in-process simulator (no socket).

    The simulator knows the gold answers of ``problems`` (and nothing else about them: it
    recognises a problem's template from the question text alone, see
    :func:`~intercascade_core.models.sim.same_template`). ``knobs``: what a shown strategy
    does (:class:`~intercascade_core.models.sim.SimKnobs`; default: the paper's assumption).
    """
    import httpx


    answer_key = {q.text.strip(): q.gold for q in problems if q.gold is not None}
    backend = SimBackend(seed=seed, answer_key=answer_key, knobs=knobs or SimKnobs())
    return httpx.Client(transport=httpx.MockTransport(backend.handler()))


# --------------------------------------------------------------------------- data


def load_streams(
    data: DataConfig, *, limit: int | None = None, progress: bool = False
) -> tuple[tuple[Query, ...], tuple[Query, ...], dict[str, Any]]:
    """The calibration split, the test stream and a description, from a ``[data]`` config.

    ``gsm_symbolic`` is generated (templates × variants, calibration drawn separately);
    the file datasets are loaded from ``path`` with calibration from ``calibration_path``
    or a seeded random ``n_calibration`` items split off. The test stream is put in
    ``order`` and then cut to ``limit`` (or ``data.limit``) queries.
    """
    cap = limit if limit is not None else (data.limit or None)
    if data.dataset == "gsm_symbolic":
        sp = gsm_symbolic_split(templates=data.templates, variants=data.variants,
                                calibration_variants=data.calibration_variants, seed=data.seed, order=data.order)
        cal, test = sp.calibration, sp.test
        tpl = (f"{data.templates}" if isinstance(data.templates, int)
               else f"{len(data.templates)} ({', '.join(map(str, data.templates))})")
        desc = (f"GSM-Symbolic (reasoning-gym): {tpl} templates, {data.variants} test and "
                f"{data.calibration_variants} calibration variants per template")
    else:
        kw: dict[str, Any] = {"seed": data.seed} if data.dataset == "nasa_history" else {}
        problems = load_dataset(data.dataset, data.path, **kw)
        if data.calibration_path:
            cal = load_dataset(data.dataset, data.calibration_path, **kw)
            test = problems
        else:
            sp = split_problems(problems, data.n_calibration, seed=data.seed)
            cal, test = sp.calibration, sp.test
        test = order_stream(test, data.order, seed=data.seed)
        desc = f"{data.dataset} from {data.path}"
    if cap is not None:
        test = test[:cap]
    info = {
        "name": data.dataset,
        "description": desc,
        "n_test": len(test),
        "n_calibration": len(cal),
        "order": data.order,
        "seed": data.seed,
    }
    return to_queries(cal), to_queries(test), info


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, slots=True, eq=False)
class Evaluation:
    """The calibration run, each variant's stream result and its Table-2 metrics.

    ``insitu``: the in-situ calibration behind the ``retrieval_insitu`` variant (None
    when it did not run)."""
    calibration: CalibrationRun
    queries: tuple[Query, ...]
    runs: Mapping[str, StreamResult]
    metrics: Mapping[str, Metrics]
    level_names: tuple[str, ...]
    alpha: float
    delta: float
    k: int
    backend: str
    seed: int
    split_delta: bool
    insitu: InSituCalibration | None = None
    min_n: int = 30
    strategy_mode: str = "single_call"
    store_rule: str = "paper"
    #: the teaching variants' calibration when their last level answers another prompt than
    #: Jung's (single-call mode); None when they share ``calibration``
    teach_calibration: CalibrationRun | None = None


def evaluate(
    calibration: Sequence[Query],
    test: Sequence[Query],
    levels: Sequence[Level],
    embedder: Embedder,
    *,
    alpha: float,
    delta: float,
    k: int = 2,
    backend: str = "numpy",
    seed: int = 0,
    split_delta: bool = True,
    min_n: int = 30,
    variants: Sequence[str] = VARIANTS,
    insitu: bool = False,
    insitu_max_rounds: int = 4,
    progress: bool = True,
    on_variant: Callable[[str], None] | None = None,
    calibration_run: CalibrationRun | None = None,
    strategy_mode: str = "single_call",
    store_rule: str = "paper",
) -> Evaluation:
    """Calibrate once on ``calibration``, then run each variant on ``test``.

    ``strategy_mode`` / ``store_rule``: the teaching variants' (see
    :class:`~intercascade_core.core.state.CascadeConfig`). In single-call mode their strong
    level answers the answer-and-strategy prompt, so it is calibrated on that prompt in a
    second calibration run (``Evaluation.teach_calibration``); Jung keeps the strategy-free one.

    ``calibration_run``: the strategy-free calibration (a Jung cascade's, every level on
    the strategy-free prompt) made earlier for these levels, e.g. a saved calibration's
    ``calibration_run()``, used instead of calibrating it here. The teaching variants'
    single-call calibration (and ``insitu``) still run on ``calibration``.

    ``variants`` must include ``"jung"`` (the baseline of the reductions). The embedder
    is wrapped in a :class:`CachedEmbedder` so the stream is embedded once.

    ``insitu``: also calibrate the Retrieval cascade in situ
    (:func:`~intercascade_core.core.insitu.insitu_calibrate` on the same calibration split,
    piloted by the strategy-free calibration, at most ``insitu_max_rounds`` replays) and
    run it on ``test`` as the variant ``"retrieval_insitu"``. The replays call the models
    on the calibration split again (calibration-time cost, not counted in the metrics).
    """
    if not test:
        raise InvalidArgumentError("test", "the test stream is empty")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "jung" not in variants:
        raise InvalidArgumentError("variants", f"must include 'jung' and only {VARIANTS}; got {tuple(variants)}")
    if calibration_run is None:
        cal_run = calibrate_levels(
            calibration, levels, alpha=alpha, delta=delta, config=CascadeConfig(policy="jung"),
            split_delta=split_delta, min_n=min_n, progress=progress
        )
        check_calibration_run(cal_run, [lv.name for lv in levels])
    elif not isinstance(calibration_run, CalibrationRun) or len(calibration_run.calibrations) != len(levels):
        raise InvalidArgumentError("calibration_run", f"must be a CalibrationRun with {len(levels)} levels")
    else:
        cal_run = calibration_run
    teach_cfg = CascadeConfig(k=k, backend=backend, seed=seed, strategy_mode=strategy_mode,  # type: ignore[arg-type]
                              store_rule=store_rule)  # type: ignore[arg-type]
    teach_run: CalibrationRun | None = None
    if strategy_mode == "single_call" and (insitu or any(v != "jung" for v in variants)):
        if not calibration:
            raise InvalidArgumentError(
                "calibration", "single-call teaching calibrates the strong level on its own prompt: "
                "needs the calibration split")
        teach_run = calibrate_levels(
            calibration, levels, alpha=alpha, delta=delta, config=teach_cfg, split_delta=split_delta,
            min_n=min_n, progress=progress)
        check_calibration_run(teach_run, [lv.name for lv in levels])
    cached = embedder if isinstance(embedder, CachedEmbedder) else CachedEmbedder(embedder)
    if insitu:
        cached.prime([q.text for q in calibration], progress=progress)
    if insitu or any(v != "jung" for v in variants):
        cached.prime([q.text for q in test], progress=progress)
    runs: dict[str, StreamResult] = {}
    for v in [v for v in VARIANTS if v in variants]:
        if on_variant is not None:
            on_variant(v)
        cfg = replace(teach_cfg, policy=v)
        run_cal = cal_run if v == "jung" or teach_run is None else teach_run
        runs[v] = run_stream(test, levels, cached, calibrations=run_cal.calibrations, config=cfg,
                             progress=progress, desc=f"stream [{v}]")
    ins: InSituCalibration | None = None
    if insitu:

        if on_variant is not None:
            on_variant(INSITU_VARIANT)
        cfg = teach_cfg
        ins = insitu_calibrate(calibration, levels, cached, alpha=alpha, delta=delta, config=cfg,
                               split_delta=split_delta, pilot=teach_run or cal_run, max_rounds=insitu_max_rounds,
                               progress=progress, min_n=min_n)
        runs[INSITU_VARIANT] = run_stream(test, levels, cached, calibrations=ins.calibrations, config=cfg,
                                          progress=progress, desc="stream [retrieval, in-situ λ]")
    base = runs["jung"].outcomes
    metrics = {
        v: compute_metrics(r.outcomes) if v == "jung" else compute_metrics(r.outcomes, baseline=base)
        for v, r in runs.items()
    }
    return Evaluation(
        calibration=cal_run,
        queries=tuple(test),
        runs=runs,
        metrics=metrics,
        level_names=tuple(lv.name for lv in levels),
        alpha=float(alpha),
        delta=float(delta),
        k=k,
        backend=backend,
        seed=seed,
        split_delta=split_delta,
        insitu=ins,
        min_n=min_n,
        strategy_mode=strategy_mode,
        store_rule=store_rule,
        teach_calibration=teach_run,
    )


# --------------------------------------------------------------------------- plain data


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _plain_dict(x: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = _plain(x)
    return out


def _plain(x: Any) -> Any:
    """Strict-JSON plain data: NaN/inf floats become None, numpy scalars Python ones."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _num(float(x))
    return x


def _level_records(names: Sequence[str], cals: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"name": name, **c.summary()} for name, c in zip(names, cals, strict=True)]


def _calibration_levels(names: Sequence[str], run: CalibrationRun) -> list[dict[str, Any]]:
    """Each level's calibration summary with its accuracy on the prompt it was calibrated on."""
    return [
        {**record, "calibration_accuracy": (sum(corr) / len(corr)) if corr else None, "n_items": len(corr)}
        for record, corr in zip(_level_records(names, run.calibrations), run.correct, strict=True)
    ]


def risk_document(ev: Evaluation, variant: str) -> dict[str, Any]:
    """The ``"risk"`` block of one variant (:func:`~intercascade_core.core.insitu.risk_summary`).

    The weak level's threshold is the variant's own (the in-situ one for
    ``retrieval_insitu``, the shared strategy-free one otherwise). Both certified α's are
    Clopper–Pearson bounds at that level's δ (δ/levels under ``split_delta``, the level the
    calibration itself used): "without strategies" on the strategy-free calibration data,
    "with strategies" on the test stream's weak answers whose prompt carried strategies.
    The audit (:func:`~intercascade_core.core.audit.audit_outcomes`, every accepted weak answer
    labelled by its gold answer) spends the full δ.
    """
    if variant == INSITU_VARIANT:
        if ev.insitu is None:
            raise InvalidArgumentError("variant", "the in-situ variant needs ev.insitu")
        cal = ev.insitu.calibrations[0]
    else:
        cal = ev.calibration.calibrations[0]
    return _plain_dict(
        risk_summary(
            ev.runs[variant].outcomes, cal, alpha=ev.alpha, delta=cal.delta,
            strategy_free=(ev.calibration.confidences[0], ev.calibration.correct[0]),
            audit=AuditConfig(alpha=ev.alpha, delta=ev.delta),
        )
    )


def insitu_document(ev: Evaluation) -> dict[str, Any] | None:
    """The top-level ``"insitu"`` block: thresholds, rounds and Theorem 2.2's view."""
    ins = ev.insitu
    if ins is None:
        return None
    return _plain_dict(
        {
            "thresholds": list(ins.thresholds),
            "levels": _level_records(ev.level_names, ins.calibrations),
            "rounds": ins.rounds,
            "converged": ins.converged,
            "thresholds_per_round": [list(t) for t in ins.thresholds_per_round],
            "replay_with_strategies": sum(ins.with_strategies),
            "n_calibration": len(ins.with_strategies),
            "theorem_view": ins.theorem_view(),
        }
    )


def variant_summary(metrics: Metrics, outcomes: Sequence[Outcome], *, baseline: bool) -> dict[str, Any]:
    """The JSON summary of one variant (fractions in [0, 1]; counts; tokens; cost)."""
    weak_acc = [o for o in outcomes if o.status == "accepted" and o.level == 0]
    weak_wrong = sum(not o.correct for o in weak_acc)
    out: dict[str, Any] = {
        "pipeline_accuracy": _num(metrics.pipeline_accuracy),
        "strong_call_rate": _num(metrics.strong_call_rate),
        "coverage": _num(metrics.coverage),
        "weak_accuracy": _num(metrics.weak_accuracy),
        "weak_correct_accepted": _num(metrics.weak_correct_accepted),
    }
    if not baseline:
        out.update(
            token_reduction=_num(metrics.token_reduction),
            cost_reduction=_num(metrics.cost_reduction),
            token_reduction_total=_num(metrics.token_reduction_total),
            cost_reduction_total=_num(metrics.cost_reduction_total),
            token_reduction_with_teaching=_num(metrics.token_reduction_with_teaching),
            cost_reduction_with_teaching=_num(metrics.cost_reduction_with_teaching),
        )
    out.update(
        weak_accepted_risk=(weak_wrong / len(weak_acc)) if weak_acc else None,
        n_queries=metrics.n,
        weak_calls=metrics.calls_per_level[0],
        strong_calls=metrics.calls_per_level[-1],
        accepted_per_level=list(metrics.accepted_per_level),
        correct_accepted_per_level=list(metrics.correct_accepted_per_level),
        discarded=metrics.n_discarded,
        failed=metrics.n_failed,
        unparseable=metrics.n_unparseable,
        repository_size=metrics.n_strategies_stored,
        strategies_rejected=metrics.n_strategies_rejected,
        strong_tokens=metrics.strong_tokens,
        teaching_tokens=metrics.teaching_tokens,
        teaching_cost=_num(metrics.teaching_cost),
        total_tokens=metrics.total_tokens,
        strong_cost=_num(metrics.strong_cost),
        total_cost=_num(metrics.total_cost),
    )
    return out


def results_document(
    ev: Evaluation,
    *,
    dataset: Mapping[str, Any],
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``results.json``: ``{"variants": {...}, "calibration": ..., "dataset": ..., "settings": ...}``."""
    st = {
        "alpha": ev.alpha,
        "delta": ev.delta,
        "split_delta": ev.split_delta,
        "k": ev.k,
        "backend": ev.backend,
        "seed": ev.seed,
        "min_n": ev.min_n,
        "strategy_mode": ev.strategy_mode,
        "store_rule": ev.store_rule,
    }
    st["insitu"] = ev.insitu is not None
    st.update(settings or {})
    variants: dict[str, Any] = {}
    for v in ev.runs:
        variants[v] = variant_summary(ev.metrics[v], ev.runs[v].outcomes, baseline=(v == "jung"))
        variants[v]["risk"] = risk_document(ev, v)
    doc: dict[str, Any] = {
        "schema": "intercascade.eval/1",
        "dataset": dict(dataset),
        "settings": st,
        "calibration": {"levels": _calibration_levels(ev.level_names, ev.calibration),
                        "n_calibration": len(ev.calibration.confidences[0])},
        **({"teach_calibration": {
            "levels": _calibration_levels(ev.level_names, ev.teach_calibration),
            "prompts": list(ev.teach_calibration.prompts),
        }} if ev.teach_calibration is not None else {}),
        "variants": variants,
    }
    ins = insitu_document(ev)
    if ins is not None:
        doc["insitu"] = ins
    return doc


def outcome_records(ev: Evaluation) -> list[dict[str, Any]]:
    """One flat JSON record per (variant, query) for ``outcomes.jsonl``."""
    recs = []
    for v, run in ev.runs.items():
        for q, o in zip(ev.queries, run.outcomes, strict=True):
            last = o.n_levels - 1
            recs.append(
                {
                    "variant": v,
                    "index": o.index,
                    "id": o.query_id,
                    "template": o.template,
                    "gold": q.gold,
                    "decision": o.kind,
                    "level": o.level,
                    "answer": o.answer,
                    "correct": o.correct,
                    "weak_confidence": o.confidences[0],
                    "weak_answer": o.level_answers[0],
                    "weak_correct": o.level_correct[0],
                    "strong_confidence": o.confidences[last],
                    "strong_answer": o.level_answers[last],
                    "strong_correct": o.level_correct[last],
                    "confidences": list(o.confidences),
                    "strategies": [
                        [{"entry_id": s.entry_id, "similarity": round(s.similarity, 6)} for s in lvl]
                        for lvl in o.strategies
                    ],
                    "stored_in": list(o.stored_in),
                    "strategy_rejected": o.strategy_rejected,
                    "failures": list(o.failures),
                    "calls": [u.calls + t.calls for u, t in zip(o.usage, o.teach_usage, strict=True)],
                    "completion_tokens": [
                        u.completion_tokens + t.completion_tokens
                        for u, t in zip(o.usage, o.teach_usage, strict=True)
                    ],
                    "tokens": [u.tokens + t.tokens for u, t in zip(o.usage, o.teach_usage, strict=True)],
                    "cost": [
                        None if u.cost is None or t.cost is None else u.cost + t.cost
                        for u, t in zip(o.usage, o.teach_usage, strict=True)
                    ],
                }
            )
    return recs
