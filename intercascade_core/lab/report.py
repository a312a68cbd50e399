"""The evaluation report: ``report.md``, ``results.json``, ``outcomes.jsonl`` and PNG plots.

Input is plain data, so this module knows nothing about models or HTTP:

* ``results`` — the JSON document (see :func:`intercascade_core.lab.evaluate.results_document`):
  ``{"variants": {"jung": {...}, "random": {...}, "retrieval": {...}}, "calibration": ...,
  "dataset": ..., "settings": ...}``, every rate a fraction in [0, 1]; each variant may
  carry a ``"risk"`` block (:func:`intercascade_core.core.insitu.risk_summary`), rendered as the
  "Risk of accepted weak answers" table, and the document an ``"insitu"`` block
  (thresholds, rounds, Theorem 2.2's view) when the in-situ variant
  ``retrieval_insitu`` ran;
* ``outcomes`` — one flat record per (variant, query) with at least ``variant``, ``index``,
  ``decision``, ``weak_confidence``, ``weak_correct``.

The tables in ``report.md`` are rendered from ``results`` only (percentages with two
decimals), so they agree with ``results.json`` by construction; ``tests/test_report*.py``
checks that they do. Plots use matplotlib's object-oriented API (no pyplot, no global
backend state); matplotlib is imported lazily and is only needed when plots are written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..core.insitu import risk_table
from ..errors import InvalidArgumentError
from ..storage.store import atomic_write_bytes

__all__ = [
    "LABELS",
    "PLOTS",
    "README_END",
    "README_START",
    "VARIANTS",
    "ReportFiles",
    "confidence_histograms_figure",
    "format_percent",
    "readme_section",
    "render_insitu",
    "render_markdown",
    "render_risk",
    "render_tables",
    "stream_figure",
    "threshold_accuracy_figure",
    "update_readme",
    "write_report",
]

#: Variant keys in table order and their display labels (the paper's Tables 3–5).
VARIANTS: Final = ("jung", "random", "retrieval")
LABELS: Final[Mapping[str, str]] = {
    "jung": "Jung (baseline)",
    "random": "Inter-Cascade (Random)",
    "retrieval": "Inter-Cascade (Retrieval)",
    "retrieval_insitu": "Inter-Cascade (in-situ λ)",
}
_COLORS: Final[Mapping[str, str]] = {
    "jung": "#7f7f7f", "random": "#ff7f0e", "retrieval": "#1f77b4", "retrieval_insitu": "#9467bd",
}

#: Plot files written by :func:`write_report`.
PLOTS: Final = (
    "weak_accuracy_vs_threshold.png",
    "confidence_histograms.png",
    "strong_calls_along_stream.png",
)

TABLE3: Final = (("pipeline_accuracy", "Pipeline Acc. (%)"), ("strong_call_rate", "Strong Call (%)"), ("coverage", "Cov. (%)"))
TABLE4: Final = (("weak_accuracy", "Weak Acc. (%)"), ("weak_correct_accepted", "Weak Corr. Accpt. (%)"))
TABLE5: Final = (
    ("token_reduction", "Token Reduction (%)"),
    ("cost_reduction", "Cost Reduction (%)"),
    ("teaching_tokens", "Teaching Tokens"),
    ("cost_reduction_with_teaching", "Cost Reduction incl. Teaching (%)"),
)
#: columns that are counts, not fractions
_COUNTS: Final = frozenset({"teaching_tokens"})


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """Paths written by :func:`write_report`."""
    folder: Path
    report: Path
    results: Path
    outcomes: Path
    plots: tuple[Path, ...]


def format_percent(x: Any) -> str:
    """A fraction as a percentage with two decimals (``n/a`` for None/NaN); a value that rounds
    to zero prints as ``0.00``, never ``-0.00``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{_rounded_percent(x) + 0.0:.2f}"  # + 0.0 turns -0.0 into 0.0


def _rounded_percent(x: Any) -> float:
    return round(100.0 * float(x), 2)


def _cell(key: str, x: Any) -> str:
    if key in _COUNTS:
        return "n/a" if x is None else str(int(x))
    return format_percent(x)


def _table(title: str, variants: Mapping[str, Mapping[str, Any]], cols: Sequence[tuple[str, str]],
           names: Sequence[str]) -> str:
    head = "| Pipeline | " + " | ".join(label for _, label in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    rows = [
        f"| {LABELS.get(v, v)} | " + " | ".join(_cell(key, variants[v].get(key)) for key, _ in cols) + " |"
        for v in names
    ]
    return "\n".join([f"**{title}**", "", head, rule, *rows])


def _ordered(variants: Mapping[str, Any]) -> list[str]:
    names = [v for v in VARIANTS if v in variants]
    return names + [v for v in variants if v not in names]


def answered_nothing(variant: Mapping[str, Any]) -> bool:
    """Whether a variant's summary is of a pipeline that output no answer (coverage 0), whose
    Pipeline Acc. is then 100 % by Jung's convention (selective accuracy over no answers)."""
    return variant.get("coverage") == 0 and variant.get("pipeline_accuracy") == 1.0


def render_tables(results: Mapping[str, Any]) -> str:
    """The paper's Tables 3, 4 and 5 as Markdown, from ``results["variants"]``; under Table 3
    a line names the pipelines that answered nothing (:func:`answered_nothing`)."""
    variants = results["variants"]
    names = _ordered(variants)
    reduced = [v for v in names if "token_reduction" in variants[v]]
    parts = [
        _table("Table 3 — pipeline accuracy, strong-LLM call rate and coverage", variants, TABLE3, names),
        _table("Table 4 — the weak LLM's accuracy and its correct answers accepted", variants, TABLE4, names),
    ]
    silent = [LABELS.get(v, v) for v in names if answered_nothing(variants[v])]
    if silent:  # a 100 % beside Cov. 0 would read as a result
        parts[0] += (f"\n\n{', '.join(silent)} answered nothing (coverage 0): a Pipeline Acc. of 100 % is "
                     "Jung's convention for selective accuracy over no answers, not a measurement.")
    if reduced:
        parts.append(_table("Table 5 — strong-LLM token and cost reduction against Jung (strong answer calls, "
                            "as the paper counts them), the separate teaching calls, and the cost reduction "
                            "with teaching included", variants, TABLE5, reduced))
    return "\n\n".join(parts) + "\n"


def render_risk(results: Mapping[str, Any]) -> str:
    """The risk table (:func:`intercascade_core.core.insitu.risk_table`) of the variants that
    carry a ``"risk"`` block, in table order; "" when none does."""
    variants = results["variants"]
    risk = {v: variants[v]["risk"] for v in _ordered(variants) if isinstance(variants[v].get("risk"), Mapping)}
    return risk_table(risk, labels=LABELS) if risk else ""


def _cert_row(label: str, lam: Any, n: Any, k: Any, bound: Any) -> str:
    t = "abstain" if lam is None else f"{float(lam):.4f}"
    b = "–" if bound is None else f"{100.0 * float(bound):.2f}"
    return f"| {label} | {t} | {n} | {k} | {b} |"


def render_insitu(results: Mapping[str, Any]) -> str:
    """The in-situ calibration (``results["insitu"]``) as Markdown: rounds, thresholds and
    Theorem 2.2's view at the static λ_w; "" when in-situ calibration did not run."""
    ins = results.get("insitu")
    if not isinstance(ins, Mapping):
        return ""
    view = ins.get("theorem_view", {})
    levels = ins.get("levels", [])
    rounds = ins.get("rounds")
    per_round = " → ".join(
        "(" + ", ".join("∞" if t is None else f"{float(t):.4f}" for t in ts) + ")"
        for ts in ins.get("thresholds_per_round", [])
    )
    lines = [
        (
            f"**In-situ calibration** — {rounds} replay{'s' if rounds != 1 else ''} of the "
            f"{ins.get('n_calibration', '?')} calibration queries through the Retrieval cascade "
            f"({ins.get('replay_with_strategies', '?')} weak prompts of the last replay carried strategies); "
            f"{'converged' if ins.get('converged') else '**did not converge** (the last round is deployed)'}. "
            f"Thresholds (weak, …, strong) per round, then the deployed ones: {per_round}."
        ),
        "",
        (
            "**Theorem 2.2's view** at the static (strategy-free) λ_w: the α it certifies on the strategy-free "
            "calibration data, u(n, k), and on the first replay, which deployed the static thresholds with "
            "strategies, u(n′, k′). The theorem predicts the second is smaller; copied wrong strategies can "
            "make it larger. The in-situ λ_w is certified on the last replay."
        ),
        "",
        "| Threshold, data | λ_w | accepted | wrong | α certified (%) |",
        "|---|---:|---:|---:|---:|",
        _cert_row("static λ_w, calibration without strategies", view.get("static_threshold"),
                  view.get("n_without"), view.get("errors_without"), view.get("alpha_certified_without_strategies")),
        _cert_row("static λ_w, first replay with strategies", view.get("static_threshold"),
                  view.get("n_with"), view.get("errors_with"), view.get("alpha_certified_with_strategies")),
    ]
    if levels:
        w = levels[0]
        lines.append(_cert_row("in-situ λ_w, last replay", w.get("threshold"), w.get("n_accepted"),
                               w.get("n_errors"), w.get("risk_bound")))
    return "\n".join(lines) + "\n"


def _fmt_threshold(level: Mapping[str, Any]) -> str:
    t = level.get("threshold")
    return "∞ (abstains: defers everything)" if t is None else f"{float(t):.4f}"


def render_markdown(results: Mapping[str, Any], plots: Sequence[str] = PLOTS) -> str:
    """The whole ``report.md``: setup, calibration, Tables 3–5, notes and plots."""
    ds = results.get("dataset", {})
    st = results.get("settings", {})
    cal = results.get("calibration", {})
    lines = ["# Inter-Cascade evaluation", ""]
    desc = ds.get("description") or ds.get("name", "")
    models = ", ".join(f"{m.get('name')} = `{m.get('model')}`" for m in st.get("models", []))
    lines += [
        f"- Data: {desc}; {ds.get('n_test', '?')} test queries in {ds.get('order', '?')} order, "
        f"{ds.get('n_calibration', '?')} calibration queries drawn separately.",
        f"- Models: {models}{' (simulated, in-process)' if st.get('simulated') else ''}.",
        f"- Risk control: α = {st.get('alpha')}, δ = {st.get('delta')}"
        f"{' (δ split across levels)' if st.get('split_delta', True) else ''}, min_n = {st.get('min_n', '?')}"
        f"{' (fixed in ' + str(st['preregistered']) + ' before any model ran)' if st.get('preregistered') else ''}"
        f"; k = {st.get('k')} strategies per query; "
        f"embeddings: {st.get('embedder', '?')}; retrieval backend: {st.get('backend', '?')}.",
        f"- Teaching: {_MODES.get(str(st.get('strategy_mode')), str(st.get('strategy_mode', '?')))}; "
        f"{_RULES.get(str(st.get('store_rule')), str(st.get('store_rule', '?')))}.",
    ]
    if st.get("simulated"):
        lines.append(_simulator_line(st.get("simulator", {})))
    lines += [
        "",
        "## Calibration (strategy-free, shared by all three pipelines)"
        if not isinstance(results.get("teach_calibration"), Mapping)
        else "## Calibration (strategy-free prompts: Jung, and the weak level of every pipeline)",
        "",
        *_calibration_table(cal.get("levels", [])),
    ]
    tc = results.get("teach_calibration")
    if isinstance(tc, Mapping):
        lines += [
            "",
            "In single-call mode the strong level of the Random and Retrieval pipelines answers the "
            "answer-and-strategy prompt, so it is calibrated on that prompt (same split, same α, δ and min_n); "
            "these thresholds are the ones those pipelines deploy:",
            "",
            *_calibration_table(tc.get("levels", [])),
        ]
    lines += ["", "## Results", "", render_tables(results).rstrip(), ""]
    risk = render_risk(results)
    if risk:
        n_lv = len(cal.get("levels", [])) or 1
        split = st.get("split_delta", True) and n_lv > 1
        lines += [
            "## Risk of accepted weak answers",
            "",
            (
                f"Per pipeline, on the test stream: the weak answers accepted at λ_w, how many were wrong and "
                f"their empirical risk against α = {st.get('alpha')}; the α certified at λ_w (Clopper–Pearson "
                f"upper bound at the weak level's δ{f' = δ/{n_lv}' if split else ''}) without strategies (on the "
                "strategy-free calibration data) and with strategies (on this stream's weak answers whose prompt "
                "carried strategies): Theorem 2.2's view; and the verdict of the online risk audit "
                f"(`intercascade_core.core.audit`, every accepted weak answer labelled, δ = {st.get('delta')}) "
                "replayed over the stream: *certified* (upper bound ≤ α), *inconclusive*, or *alarm* (the risk "
                "is above α at level δ)."
            ),
            "",
            risk.rstrip(),
            "",
        ]
        ins = render_insitu(results)
        if ins:
            lines += [ins.rstrip(), ""]
    notes = _notes(results)
    if notes:
        lines += ["## Notes", "", *notes, ""]
    if plots:
        lines += ["## Plots", ""]
        captions = {
            PLOTS[0]: "Weak-LLM accuracy of the queries whose confidence is at or above each threshold (cf. the paper's Figure 2a).",
            PLOTS[1]: "Weak-LLM confidence histograms, correct vs. wrong answers, with the calibrated threshold (cf. Figure 2b–d).",
            PLOTS[2]: "Strong-LLM call rate along the stream (moving window) and cumulative strong calls: the teacher effect over time.",
        }
        for p in plots:
            lines += [f"![{p}]({p})", "", captions.get(p, ""), ""]
    return "\n".join(lines).rstrip() + "\n"


_MODES: Final[Mapping[str, str]] = {
    "single_call": "single-call (the strong model answers and writes the strategy in one generation, as in the paper)",
    "two_call": "two-call (the strong model answers the strategy-free prompt; an accepted answer is followed by a "
                "separate strategy call, counted as teaching)",
}
_RULES: Final[Mapping[str, str]] = {
    "paper": "storage rule: the paper's (every strategy whose strong answer cleared the threshold is stored)",
    "strict": "storage rule: strict (strategies that are too short, too long or quote three or more of the "
              "problem's numbers are rejected)",
}


def _calibration_table(levels: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| Level | Threshold λ | Calibration items | Accepted | Errors | Risk bound (1−δ) | Guarantee |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for lvl in levels:
        rb = lvl.get("risk_bound")
        lines.append(
            f"| {lvl.get('name')} | {_fmt_threshold(lvl)} | {lvl.get('n_calibration')} | {lvl.get('n_accepted')} | "
            f"{lvl.get('n_errors')} | {'n/a' if rb is None else f'{rb:.4f}'} | "
            f"{'yes' if lvl.get('guaranteed') else 'no'} |"
        )
    return lines


def _simulator_line(sim: Mapping[str, Any]) -> str:
    """What the simulator assumes, knob by knob (``settings["simulator"]``)."""
    knobs = sim.get("knobs") or {}
    taught = knobs.get("taught_accuracy")
    taught = sim.get("weak_taught_accuracy") if taught is None else taught
    text = (
        "- The models are **simulated** (`intercascade_core.models.sim`, in-process): deterministic stand-ins that "
        "answer real problem text with logprob-based confidences"
    )
    if sim.get("weak_base_accuracy") is not None and sim.get("strong_base_accuracy") is not None:
        text += (f" (weak base accuracy ≈ {float(sim['weak_base_accuracy']):.2f}, "
                 f"strong ≈ {float(sim['strong_base_accuracy']):.2f})")
    text += (
        ". A model recognises an example of the same template from the problem texts alone (no template labels "
        "reach it). **Knobs** (`SimKnobs`), as set for this run: "
        f"a fitting strategy raises the weak accuracy to `taught_accuracy` = "
        f"{'?' if taught is None else f'{float(taught):.2f}'} (an assumption of the simulator, not a finding); "
        f"a fitting strategy from a *wrong* strong answer is copied (wrong answer, confidence from "
        f"{knobs.get('mislead_conf', '?')}) with probability `mislead_rate` = {knobs.get('mislead_rate', 0)}; "
        f"a fitting strategy moves confidence a fraction `confidence_boost` = {knobs.get('confidence_boost', 0)} "
        "of the way to 1."
    )
    if not knobs.get("mislead_rate") and not knobs.get("confidence_boost"):
        text += (" With these defaults the simulator encodes the paper's assumption: a strategy of the same "
                 "template helps even when it comes from a wrong answer, and confidence ignores strategies, so "
                 "the gain below follows from `taught_accuracy` and measures the mechanism, not real LLMs.")
    else:
        text += (" This is a misleading-teacher setting: strategies can hurt, and the threshold calibrated "
                 "without strategies no longer bounds the risk of taught answers.")
    return text + (" The numbers exercise the whole mechanism — calibration, routing, embedding retrieval, "
                   "teaching, token and cost accounting — but they are not measurements of real LLMs.")


def _notes(results: Mapping[str, Any]) -> list[str]:
    variants = results["variants"]
    out = []
    alpha = results.get("settings", {}).get("alpha")
    risks = [
        f"{LABELS.get(v, v)} {format_percent(variants[v].get('weak_accepted_risk'))} %"
        for v in _ordered(variants) if variants[v].get("weak_accepted_risk") is not None
    ]
    if risks and alpha is not None:
        out.append(
            f"- Error rate of accepted weak answers on the test stream (target α = {100 * float(alpha):.0f} %): "
            + ", ".join(risks) + ". The shared threshold was calibrated without strategies; with strategies the "
            "weak model's confidence distribution shifts, so for the strategy pipelines this is measured, not "
            "guaranteed" + (
                "." if not any(isinstance(variants[v].get("risk"), Mapping) for v in variants)
                else " (see *Risk of accepted weak answers*; the in-situ variant is calibrated on "
                "strategy-augmented prompts)." if "retrieval_insitu" in variants
                else " (see *Risk of accepted weak answers*)."
            )
        )
    if "retrieval" in variants and "strong_calls" in variants["retrieval"]:
        out.append(
            "- Strong calls: " + ", ".join(
                f"{LABELS.get(v, v)} {variants[v]['strong_calls']}" for v in _ordered(variants)
                if "strong_calls" in variants[v]
            ) + f" of {variants['retrieval'].get('n_queries', '?')} queries; strategies stored: "
            + ", ".join(f"{LABELS.get(v, v)} {variants[v].get('repository_size', 0)}" for v in _ordered(variants)
                        if v != "jung")
            + "; rejected by the storage rule: "
            + ", ".join(f"{LABELS.get(v, v)} {variants[v].get('strategies_rejected', 0)}" for v in _ordered(variants)
                        if v != "jung")
            + "."
        )
    # only what Table 5 shows as negative: a difference of a few tokens in 40 000 prints as 0.00
    negative = [v for v in _ordered(variants) if v != "jung"
                and _rounded_percent(variants[v].get("token_reduction") or 0) < 0]
    if negative:
        why = ("each strong answer call also writes a strategy, and the strategies shown to the weak model "
               "did not save enough strong calls to make up for the longer replies"
               if results.get("settings", {}).get("strategy_mode") == "single_call" else
               "the strategies shown to the weak model did not save strong answer calls or tokens")
        out.append(
            "- A negative reduction means a pipeline spent *more* strong-LLM answer tokens than Jung ("
            + ", ".join(LABELS.get(v, v) for v in negative) + f"): {why}."
        )
    out.append(
        "- What Table 5 counts. *Token / Cost Reduction*: prompt and completion tokens (and fees) of the strong "
        "LLM's answer calls against Jung's, as the paper's Table 5 does; in single-call mode the answer call also "
        "writes the strategy, so its strategy tokens are in this figure, as in the paper. *Teaching Tokens*: the "
        "separate strategy calls of two-call mode (0 in single-call mode), which the paper's pipeline does not "
        "make. *Cost Reduction incl. Teaching*: strong answers plus teaching calls against Jung. `results.json` "
        "also has `token_reduction_with_teaching` and `token_reduction_total` / `cost_reduction_total` over "
        "every call of both models. Calibration calls are not counted."
    )
    return out


# --------------------------------------------------------------------------- plots


def _by_variant(outcomes: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for rec in outcomes:
        groups.setdefault(str(rec["variant"]), []).append(rec)
    for recs in groups.values():
        recs.sort(key=lambda r: int(r["index"]))
    ordered: dict[str, list[Mapping[str, Any]]] = {v: groups[v] for v in VARIANTS if v in groups}
    ordered.update({v: r for v, r in groups.items() if v not in ordered})
    return ordered


def _weak_arrays(recs: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    conf = np.array([float(r["weak_confidence"]) for r in recs], dtype=np.float64)
    ok = np.array([bool(r["weak_correct"]) for r in recs], dtype=np.bool_)
    return conf, ok


def threshold_accuracy_figure(outcomes: Iterable[Mapping[str, Any]], *, weak_threshold: float | None = None) -> Any:
    """Figure 2(a): weak accuracy among queries with confidence ≥ λ, per variant."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), dpi=110, layout="constrained")
    ax = fig.subplots()
    grid = np.linspace(0.0, 1.0, 201)
    for v, recs in _by_variant(outcomes).items():
        conf, ok = _weak_arrays(recs)
        order = np.argsort(-conf, kind="stable")
        c_sorted, ok_sorted = conf[order], ok[order]
        # number of items with conf >= λ: count of c_sorted >= λ (descending array)
        n = np.searchsorted(-c_sorted, -grid, side="right")
        cum = np.concatenate([[0], np.cumsum(ok_sorted)])
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(n > 0, cum[n] / np.maximum(n, 1), np.nan)
        ax.plot(grid, 100.0 * acc, label=LABELS.get(v, v), color=_COLORS.get(v), linewidth=2)
    if weak_threshold is not None and math.isfinite(weak_threshold):
        ax.axvline(weak_threshold, color="black", linestyle="--", linewidth=1, label=f"λ_w = {weak_threshold:.3f}")
    ax.set_xlabel("confidence threshold λ")
    ax.set_ylabel("weak-LLM accuracy of queries with confidence ≥ λ (%)")
    ax.set_title("Weak-LLM accuracy vs. confidence threshold")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def confidence_histograms_figure(
    outcomes: Iterable[Mapping[str, Any]],
    *,
    weak_threshold: float | None = None,
    thresholds: Mapping[str, float | None] | None = None,
) -> Any:
    """Figure 2(b–d): weak-confidence histograms (correct vs. wrong), one panel per variant.
    ``thresholds`` overrides ``weak_threshold`` per variant (the in-situ variant's own λ_w)."""
    from matplotlib.figure import Figure

    groups = _by_variant(outcomes)
    fig = Figure(figsize=(4.0 * max(1, len(groups)), 3.8), dpi=110, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(groups)), sharey=True))
    bins = np.linspace(0.0, 1.0, 26)
    for ax, (v, recs) in zip(axes, groups.items(), strict=False):
        conf, ok = _weak_arrays(recs)
        ax.hist([conf[ok], conf[~ok]], bins=bins, stacked=True, color=["#2ca02c", "#d62728"],
                label=["correct", "wrong"])
        thr = (thresholds or {}).get(v, weak_threshold)
        if thr is not None and math.isfinite(thr):
            ax.axvline(thr, color="black", linestyle="--", linewidth=1)
        ax.set_title(LABELS.get(v, v))
        ax.set_xlabel("weak-LLM confidence")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    axes[0].set_ylabel("queries")
    fig.suptitle("Weak-LLM confidence (dashed: calibrated threshold λ_w)")
    return fig


def stream_figure(outcomes: Iterable[Mapping[str, Any]], *, window: int | None = None) -> Any:
    """Strong-call rate along the stream (moving window) and cumulative strong calls."""
    from matplotlib.figure import Figure

    groups = _by_variant(outcomes)
    n = max((len(r) for r in groups.values()), default=0)
    w = window or max(10, n // 10)
    fig = Figure(figsize=(11.0, 4.2), dpi=110, layout="constrained")
    ax_rate, ax_cum = fig.subplots(1, 2)
    for v, recs in groups.items():
        strong = np.array([r["decision"] != "weak_accepted" for r in recs], dtype=np.float64)
        x = np.arange(1, strong.size + 1)
        kernel = np.ones(min(w, max(1, strong.size)))
        rolling = np.convolve(strong, kernel, mode="full")[: strong.size] / np.minimum(x, kernel.size)
        ax_rate.plot(x, 100.0 * rolling, label=LABELS.get(v, v), color=_COLORS.get(v), linewidth=2)
        ax_cum.plot(x, np.cumsum(strong), label=LABELS.get(v, v), color=_COLORS.get(v), linewidth=2)
    ax_rate.set_title(f"Strong-LLM call rate, moving window of {w} queries")
    ax_rate.set_xlabel("query index in the stream")
    ax_rate.set_ylabel("strong calls (%)")
    ax_rate.set_ylim(-2, 102)
    ax_cum.set_title("Cumulative strong-LLM calls")
    ax_cum.set_xlabel("query index in the stream")
    ax_cum.set_ylabel("strong calls")
    for ax in (ax_rate, ax_cum):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    return fig


def _save(fig: Any, path: Path, title: str) -> None:
    labels = []
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is not None:
            labels += [t.get_text() for t in leg.get_texts()]
    meta = {"Title": title, "Description": "labels: " + "; ".join(dict.fromkeys(labels)), "Software": "intercascade"}
    fig.savefig(path, format="png", metadata=meta)


# --------------------------------------------------------------------------- README

README_START: Final = "<!-- intercascade-demo-results:start -->"
README_END: Final = "<!-- intercascade-demo-results:end -->"


def readme_section(results: Mapping[str, Any], *, plot: str | None, command: str) -> str:
    """The README's results block: how it was made, Tables 3–5 and one plot."""
    ds = results.get("dataset", {})
    st = results.get("settings", {})
    lines = [
        f"Generated by `{command}` — {ds.get('n_test', '?')} test queries "
        f"({ds.get('description', ds.get('name', ''))}), α = {st.get('alpha')}, δ = {st.get('delta')}, "
        f"min_n = {st.get('min_n', '?')}, {str(st.get('strategy_mode', '?')).replace('_', '-')} teaching, "
        f"k = {st.get('k')}, embeddings `{st.get('embedder', '?')}`"
        + (", simulated models (see `report.md` in the output folder for what the simulator assumes)"
           if st.get("simulated") else "")
        + ".",
        "",
        render_tables(results).rstrip(),
    ]
    if plot:
        lines += ["", f"![Strong-LLM calls along the stream]({plot})"]
    return "\n".join(lines) + "\n"


def update_readme(readme: str | Path, section: str) -> bool:
    """Replace the text between :data:`README_START` and :data:`README_END` in ``readme``
    with ``section`` (atomically). Returns whether the file changed."""
    path = Path(readme)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError("readme", f"{path}: no such file") from None
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise InvalidArgumentError(
            "readme", f"{path}: needs the markers {README_START} and {README_END} (in that order)"
        )
    new = text[: start + len(README_START)] + "\n" + section + text[end:]
    if new == text:
        return False
    _atomic_write(path, new)
    return True


# --------------------------------------------------------------------------- files


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _finite(x: Any) -> Any:
    """Replace NaN/inf floats by None (JSON has no such numbers), recursively."""
    if isinstance(x, Mapping):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _atomic_write(path: Path, text: str) -> None:

    atomic_write_bytes(path, text.encode("utf-8"))


def write_report(
    results: Mapping[str, Any],
    outcomes: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    plots: bool = True,
) -> ReportFiles:
    """Write ``report.md``, ``results.json``, ``outcomes.jsonl`` and (optionally) the plots."""
    if "variants" not in results or not results["variants"]:
        raise InvalidArgumentError("results", "needs a non-empty 'variants' mapping")
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgumentError("out_dir", f"cannot create {folder}: {exc.strerror or exc}") from None
    plot_paths: list[Path] = []
    doc = _finite(dict(results))
    if plots:
        thr = _weak_threshold(results)
        figures = (
            (PLOTS[0], threshold_accuracy_figure(outcomes, weak_threshold=thr), "Weak-LLM accuracy vs. confidence threshold"),
            (PLOTS[1], confidence_histograms_figure(outcomes, weak_threshold=thr,
                                                    thresholds=_variant_thresholds(results)),
             "Weak-LLM confidence histograms"),
            (PLOTS[2], stream_figure(outcomes), "Strong-LLM calls along the stream"),
        )
        for name, fig, title in figures:
            _save(fig, folder / name, title)
            plot_paths.append(folder / name)
        doc["plots"] = [p.name for p in plot_paths]
    else:
        doc["plots"] = []
    results_path = folder / "results.json"
    _atomic_write(results_path, json.dumps(doc, indent=2, default=_json_default, allow_nan=False) + "\n")
    outcomes_path = folder / "outcomes.jsonl"
    _atomic_write(
        outcomes_path,
        "".join(json.dumps(_finite(r), default=_json_default, allow_nan=False) + "\n" for r in outcomes),
    )
    report_path = folder / "report.md"
    _atomic_write(report_path, render_markdown(doc, [p.name for p in plot_paths]))
    return ReportFiles(folder, report_path, results_path, outcomes_path, tuple(plot_paths))


def _variant_thresholds(results: Mapping[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for v, s in results.get("variants", {}).items():
        risk = s.get("risk") if isinstance(s, Mapping) else None
        if isinstance(risk, Mapping) and "threshold" in risk:
            t = risk["threshold"]
            out[v] = None if t is None else float(t)
    return out


def _weak_threshold(results: Mapping[str, Any]) -> float | None:
    levels = results.get("calibration", {}).get("levels", [])
    if not levels:
        return None
    t = levels[0].get("threshold")
    return None if t is None else float(t)
