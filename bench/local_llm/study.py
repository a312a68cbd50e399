"""The pre-registered study of ``PROTOCOL.md``: do retrieved strategies help a real weak model?

    python bench/local_llm/study.py [--config bench/local_llm/config.toml] [--out docs/local-llm/study]

Steps 1-3 of the protocol, in order: calibrate both levels on the calibration split (the
strong level on the answer-and-strategy prompt it deploys with), let the strong model teach
from the separately drawn pool, then ask the weak model every test query in the five arms
(A0 alone, A1 strategy text, A2 approach only, A3 worked example, A4 gated strategy text).
Step 4 (the cascade) is ``intercascade eval --config`` on the same config; it replays
every identical call from the response logs when they are present (the study's step 4 ran
without the logs of steps 1-3 and asked those prompts again: ``arms.md``, "Reproduction").

Every call goes through the response logs of ``config.toml`` (``bench/local_llm/cache/``,
one fsynced line per real call), so the study runs in parts: an interrupted run resumes
where it stopped, and a finished one replays in seconds. Test queries are asked query by
query, all five arms at a time, so a partial run (``--budget-min``) holds paired results for
a prefix of the (shuffled) stream, and its ``results.json`` and ``arms.md`` are for that
prefix, marked as such; ``--report-only`` rewrites ``arms.md`` from ``results.json``.

Writes ``OUT/results.json`` (settings, per-call records, analysis) and ``OUT/arms.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

ARMS = ("A0", "A1", "A2", "A3", "A4")
ARM_NAMES = {
    "A0": "weak alone",
    "A1": "strategy text (the paper's format)",
    "A2": "approach only, numbers masked",
    "A3": "worked example",
    "A4": "strategy text, cosine gate",
}
K = 2              # PROTOCOL.md: the paper's k
TAU = 0.70         # PROTOCOL.md: the similarity gate, fixed before any embedding was computed
POOL_VARIANTS = 4  # PROTOCOL.md: the teaching pool, 4 variants per template
MAX_SOLUTION_CHARS = 2000
CASCADE_DIR = "cascade"  # step 4's eval output, beside arms.md
SHARED_SETTINGS = ("alpha", "delta", "split_delta", "min_n", "k")  # the study's and step 4's
CALL_TIMEOUT_S = 3600.0  # the config's upper limit
_NUMBER = re.compile(r"\d+(\.\d+)?")

APPROACH_PREFACE = (
    "Below are solution approaches from previously solved problems that may be similar to the "
    "new problem, with every number replaced by N. Use an approach only if it fits the new problem."
)
WORKED_PREFACE = (
    "Below are previously solved problems that may be similar to the new problem, each with a "
    "worked solution and its answer. Use a method only if it fits the new problem."
)


def mask_numbers(text: str) -> str:
    return _NUMBER.sub("N", text)


@dataclass(frozen=True)
class Taught:
    """One pool problem the strong model answered with the answer-and-strategy prompt."""

    uid: str
    query: str
    answer: str
    strategy: str
    solution: str
    confidence: float
    correct: bool
    stored: bool


def _examples(preface: str, bodies: Sequence[Sequence[str]], base: str) -> str:
    from intercascade_core.core.prompts import EXAMPLE_CLOSE, EXAMPLE_OPEN

    blocks = [preface, ""]
    for i, lines in enumerate(bodies, start=1):
        blocks += [EXAMPLE_OPEN.format(i=i), *lines, EXAMPLE_CLOSE.format(i=i), ""]
    blocks += ["Now the new problem.", ""]
    return "\n".join(blocks) + base


def arm_prompt(arm: str, query: Any, shown: Sequence[tuple[Taught, float]]) -> str:
    """The weak model's prompt for ``arm``; ``shown`` are the k nearest entries and cosines."""
    from intercascade_core.core.prompts import strategy_free_prompt, weak_prompt
    from intercascade_core.core.repository import Entry
    from intercascade_core.core.sanitize import MAX_QUERY_CHARS, MAX_STRATEGY_CHARS, sanitize_text

    def entries(items: Sequence[tuple[Taught, float]]) -> list[Entry]:
        return [Entry(query=t.query, answer=t.answer, strategy=t.strategy) for t, _ in items]

    base = strategy_free_prompt(query)
    if arm == "A0":
        return base
    if arm == "A1":
        return weak_prompt(query, entries(shown))
    if arm == "A4":
        return weak_prompt(query, entries([(t, c) for t, c in shown if c >= TAU]))
    if arm == "A2":
        return _examples(APPROACH_PREFACE, [
            [f"Approach: {mask_numbers(sanitize_text(t.strategy, max_chars=MAX_STRATEGY_CHARS))}"]
            for t, _ in shown], base)
    if arm == "A3":
        return _examples(WORKED_PREFACE, [
            [f"Problem: {sanitize_text(t.query, max_chars=MAX_QUERY_CHARS)}",
             f"Solution: {sanitize_text(t.solution, max_chars=MAX_SOLUTION_CHARS)}",
             f"Answer: {sanitize_text(t.answer, max_chars=200)}"]
            for t, _ in shown], base)
    raise ValueError(f"unknown arm {arm!r}")


# ----------------------------------------------------------------------------- statistics
def wilson(k: int, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of k successes in n trials."""
    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def mcnemar_exact(base: Sequence[bool], arm: Sequence[bool]) -> tuple[int, int, float]:
    """Discordant pairs (arm right where base wrong, and the reverse) and the exact two-sided
    p-value (binomial test of the discordant pairs at 1/2)."""
    b = sum(1 for x, y in zip(base, arm, strict=True) if not x and y)
    c = sum(1 for x, y in zip(base, arm, strict=True) if x and not y)
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return b, c, p


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


# ----------------------------------------------------------------------------- the steps
def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def calibrate(cal: Sequence[Any], levels: Sequence[Any], cfg: Any) -> Any:
    from intercascade_core.core.cascade import calibrate_levels
    from intercascade_core.core.state import CascadeConfig

    _log(f"step 1: calibrating {len(levels)} levels on {len(cal)} queries (single-call prompts)")
    run = calibrate_levels(
        cal, levels, alpha=cfg.cascade.alpha, delta=cfg.cascade.delta,
        config=CascadeConfig(k=K, strategy_mode="single_call"), split_delta=cfg.cascade.split_delta,
        min_n=cfg.cascade.min_n, progress=True)
    failed = [(lv.name, f) for lv, fs in zip(levels, run.failures, strict=True) for f in fs if f]
    if failed:  # a failed call would count as a wrong answer: stop, and let a rerun retry it
        raise SystemExit(f"{len(failed)} calibration calls failed (first: {failed[0]}); rerun to retry them")
    for lv, c in zip(levels, run.calibrations, strict=True):
        _log(f"  {lv.name}: threshold {c.threshold:.4f}, {c.n_accepted} accepted with {c.n_errors} errors, "
             f"risk bound {c.risk_bound:.3f}{' (abstains)' if c.abstained else ''}")
    return run


def teach(pool: Sequence[Any], strong: Any, threshold: float) -> tuple[list[Taught], bool]:
    """Step 2. Returns the taught records and whether the threshold abstained (then every
    parseable reply is stored, as the protocol says)."""
    from tqdm import tqdm

    from intercascade_core.core.prompts import (
        answer_and_strategy_prompt,
        as_messages,
        parse_strategy,
    )
    from intercascade_core.core.tasks import grade
    from intercascade_core.errors import MalformedStrategy, ModelError

    abstained = not math.isfinite(threshold)
    out: list[Taught] = []
    _log(f"step 2: the strong model teaches from {len(pool)} pool queries (threshold {threshold})")
    for q in tqdm(pool, desc="teach", unit="q"):
        try:
            gen = strong.model.generate(as_messages(answer_and_strategy_prompt(q)), **strong.params)
        except ModelError as e:
            raise SystemExit(f"teaching call for {q.id} failed: {e.reason}; rerun to retry it") from None
        g = grade(gen.text, q.gold, q.family)
        try:
            parsed = parse_strategy(gen.text, problem=q.text, strict=False)
        except MalformedStrategy:
            parsed = None
        clears = abstained or gen.confidence >= threshold
        out.append(Taught(
            uid=q.id, query=q.text, answer=g.answer if g.answer is not None else "",
            strategy=parsed.strategy if parsed else "", solution=parsed.solution if parsed else "",
            confidence=float(gen.confidence), correct=bool(g.correct),
            stored=parsed is not None and clears))
    return out, abstained


def nearest(test: Sequence[Any], stored: Sequence[Taught], embedder: Any) -> list[list[tuple[int, float]]]:
    """The k nearest stored entries (index, cosine) of every test query, exact."""
    if not stored:
        return [[] for _ in test]
    qv = np.asarray(embedder.embed([q.text for q in test]), dtype=np.float32)
    pv = np.asarray(embedder.embed([t.query for t in stored]), dtype=np.float32)
    sims = qv @ pv.T
    out = []
    for row in sims:
        idx = np.argsort(-row, kind="stable")[:K]
        out.append([(int(i), float(row[i])) for i in idx])
    return out


def ask_arms(test: Sequence[Any], stored: Sequence[Taught], near: Sequence[Sequence[tuple[int, float]]],
             weak: Any, deadline: float = math.inf) -> list[dict[str, Any]]:
    """Step 3: one weak call per (query, arm), query by query (identical prompts are replayed
    from the response log, so A4 costs nothing where it equals A1 or A0). No new query is
    started after ``deadline`` (``time.monotonic()``): a part of the run."""
    from tqdm import tqdm

    from intercascade_core.core.prompts import as_messages
    from intercascade_core.core.tasks import answers_match, grade
    from intercascade_core.errors import ModelError

    records = []
    _log(f"step 3: {len(test)} test queries x {len(ARMS)} arms")
    for qi, q in enumerate(tqdm(test, desc="arms", unit="q")):
        if time.monotonic() > deadline:
            _log(f"  time budget spent: stopping after {qi} of {len(test)} queries (rerun to resume)")
            break
        shown = [(stored[i], c) for i, c in near[qi]]
        for arm in ARMS:
            prompt = arm_prompt(arm, q, shown)
            rec: dict[str, Any] = {"query": q.id, "position": qi, "arm": arm,
                                   "shown": [t.uid for t, _ in shown] if arm != "A0" else [],
                                   "cosines": [round(c, 6) for _, c in shown] if arm != "A0" else []}
            if arm == "A4":
                rec["shown"] = [t.uid for t, c in shown if c >= TAU]
            try:
                gen = weak.model.generate(as_messages(prompt), **weak.params)
            except ModelError as e:
                raise SystemExit(f"weak call for {q.id} ({arm}) failed: {e.reason}; rerun to retry it") from None
            g = grade(gen.text, q.gold, q.family)
            shown_here = [t for t, _ in shown if t.uid in rec["shown"]]
            copied = (not g.correct and g.answer is not None
                      and any(t.answer and answers_match(g.answer, t.answer, q.family) for t in shown_here))
            rec.update(correct=bool(g.correct), answer=g.answer, confidence=float(gen.confidence),
                       prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                       copied_a_shown_answer=copied,
                       shown_from_wrong_strong_answers=sum(1 for t in shown_here if not t.correct))
            records.append(rec)
    return records


def analyse(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy with Wilson intervals per arm, and exact McNemar (Holm over A1-A4) against A0,
    over the queries every arm answered."""
    by: dict[str, dict[str, dict[str, Any]]] = {a: {} for a in ARMS}
    for r in records:
        by[r["arm"]][r["query"]] = r
    queries = [q for q in by["A0"] if all(q in by[a] for a in ARMS)]
    if not queries:
        return {"n_queries": 0}
    base = [bool(by["A0"][q]["correct"]) for q in queries]
    out: dict[str, Any] = {"n_queries": len(queries), "arms": {}}
    raw_p = []
    for arm in ARMS:
        rows = [by[arm][q] for q in queries]
        correct = [bool(r["correct"]) for r in rows]
        k = sum(correct)
        lo, hi = wilson(k, len(rows))
        conf_right = [r["confidence"] for r in rows if r["correct"] and r.get("confidence") is not None]
        conf_wrong = [r["confidence"] for r in rows if not r["correct"] and r.get("confidence") is not None]
        entry: dict[str, Any] = {
            "name": ARM_NAMES[arm], "correct": k, "n": len(rows),
            "accuracy": k / len(rows) if rows else math.nan, "wilson95": [lo, hi],
            "wrong_copying_a_shown_answer": sum(1 for r in rows if r.get("copied_a_shown_answer")),
            "shown_entries": sum(len(r["shown"]) for r in rows),
            "shown_from_wrong_strong_answers": sum(r.get("shown_from_wrong_strong_answers", 0) for r in rows),
            "mean_confidence_right": float(np.mean(conf_right)) if conf_right else None,
            "mean_confidence_wrong": float(np.mean(conf_wrong)) if conf_wrong else None,
        }
        if arm != "A0":
            b, c, p = mcnemar_exact(base, correct)
            entry.update(gained=b, lost=c, mcnemar_p=p)
            raw_p.append(p)
        out["arms"][arm] = entry
    for arm, p_adj in zip(ARMS[1:], holm(raw_p), strict=True):
        out["arms"][arm]["mcnemar_p_holm"] = p_adj
    gains = [a for a in ARMS[1:] if out["arms"][a]["mcnemar_p_holm"] < 0.05
             and out["arms"][a]["accuracy"] > out["arms"]["A0"]["accuracy"]]
    losses = [a for a in ARMS[1:] if out["arms"][a]["mcnemar_p_holm"] < 0.05
              and out["arms"][a]["accuracy"] < out["arms"]["A0"]["accuracy"]]
    diffs = {a: out["arms"][a]["accuracy"] - out["arms"]["A0"]["accuracy"] for a in ARMS[1:]}
    best = max(diffs, key=lambda a: (diffs[a], -ARMS.index(a)))
    out.update(significant_gains=gains, significant_losses=losses,
               best_arm=best if diffs[best] > 0 else "A1")  # PROTOCOL.md step 4's rule
    return out


def arms_table(analysis: dict[str, Any]) -> str:
    lines = ["| arm | format | correct | accuracy (95 % Wilson) | gained / lost vs A0 | McNemar p | Holm p |",
             "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        a = analysis["arms"][arm]
        lo, hi = a["wilson95"]
        tests = ("—", "—", "—") if arm == "A0" else (
            f"{a['gained']} / {a['lost']}", f"{a['mcnemar_p']:.3g}", f"{a['mcnemar_p_holm']:.3g}")
        lines.append(f"| {arm} | {a['name']} | {a['correct']}/{a['n']} | {a['accuracy']:.1%} "
                     f"({lo:.1%}–{hi:.1%}) | {tests[0]} | {tests[1]} | {tests[2]} |")
    return "\n".join(lines)


def write_report(doc: dict[str, Any], path: Path) -> None:
    """``arms.md``: the settings, calibration, teaching, the arms table and the secondary
    measures, from ``results.json`` alone."""
    st, cal, te, an = doc["settings"], doc["calibration"], doc["teaching"], doc["analysis"]
    # results.json of the first part's runner has no split sizes: they follow from the settings
    n_templates = len(st["templates"]) if isinstance(st["templates"], list) else st["templates"]
    doc = {"n_test": n_templates * st["variants"], "n_calibration": n_templates * st["calibration_variants"],
           **doc}
    n = an["n_queries"]
    lines = ["# The pre-registered study: retrieved strategies and a real weak model", ""]
    if not doc["complete"]:
        lines += [f"**PARTIAL RUN: {n} of {doc['n_test']} test queries so far. Not a result; the "
                  "protocol's analysis is over all test queries.**", ""]
    lines += [
        f"Protocol: `{doc['protocol']}` (committed before the first call). Runner: "
        "`python bench/local_llm/study.py` (steps 1–3); every number below comes from "
        "`results.json` beside this file"
        + (f", step 4's from `{CASCADE_DIR}/`." if (path.parent / CASCADE_DIR).is_dir() else "."), "",
        f"- Models: weak `{st['models']['weak']}`, strong `{st['models']['strong']}` (llama.cpp, "
        "greedy). Retrieval: " + st["embedder"] + f", exact cosine, k = {st['k']}, gate τ = {st['tau']}.",
        f"- Settings fixed in advance: α = {st['alpha']}, δ = {st['delta']} (split over the levels: "
        f"{st['split_delta']}), min_n = {st['min_n']}; GSM-Symbolic templates {st['templates']}, "
        f"{st['variants']} test / {st['calibration_variants']} calibration / {st['pool_variants']} pool "
        f"variants each, seed {st['seed']}.",
        f"- Calibration ({doc['n_calibration']} queries): weak accuracy {cal['weak_accuracy']:.1%}, "
        f"λ_w = {cal['weak_threshold']:.4f}; strong accuracy on the answer-and-strategy prompt "
        f"{cal['strong_accuracy']:.1%}, λ_s = {cal['strong_threshold']:.4f}"
        + (" (abstained: every parseable reply was stored)" if cal["strong_abstained"] else "") + ".",
        f"- Teaching pool: {te['pool']} problems, {te['stored']} strategies stored, "
        f"{te['stored_from_correct_answers']} of them from correct strong answers.",
    ]
    times = doc["model_time"]
    total = sum(t.get("total_s", 0.0) for t in times.values())
    lines.append("- Model time, every real call summed over all parts of the run: "
                 + ", ".join(f"{k} {t['calls']} calls, {t.get('total_s', 0.0) / 60:.0f} min" for k, t in times.items())
                 + f"; {total / 3600:.1f} h in all.")
    if n:
        lines += ["", f"## Weak accuracy per arm ({n} test queries, paired)", "", arms_table(an), "",
                  "McNemar: exact two-sided binomial test of the discordant pairs against A0; Holm over "
                  "the four comparisons.", "",
                  "## Secondary measures", "",
                  "| arm | entries shown | from wrong strong answers | wrong answers equal to a shown answer "
                  "| mean confidence right / wrong |", "|---|---|---|---|---|"]
        for arm in ARMS:
            a = an["arms"][arm]
            cr, cw = a["mean_confidence_right"], a["mean_confidence_wrong"]
            conf = f"{cr:.3f} / {cw:.3f}" if cr is not None and cw is not None else "—"
            lines.append(f"| {arm} | {a['shown_entries']} | {a['shown_from_wrong_strong_answers']} | "
                         f"{a['wrong_copying_a_shown_answer']} | {conf} |")
        if doc["complete"]:
            verdict = (f"significant gain: {', '.join(an['significant_gains'])}" if an["significant_gains"]
                       else "no arm gains significantly over A0")
            if an["significant_losses"]:
                verdict += f"; significant loss: {', '.join(an['significant_losses'])}"
            lines += ["", f"**Outcome:** {verdict} (Holm-adjusted p < 0.05). Best arm by the "
                      f"protocol's rule: {an['best_arm']}."]
    cascade = path.parent / CASCADE_DIR / "results.json"
    if cascade.is_file():
        outcomes_file = cascade.with_name("outcomes.jsonl")
        outcomes: list[dict[str, Any]] | None = None
        unread = ""
        try:
            if outcomes_file.is_file():
                outcomes = _outcome_records(outcomes_file.read_text())
        except (ValueError, OSError) as e:  # the section goes on without the answer comparison
            unread = f"`{CASCADE_DIR}/outcomes.jsonl` could not be read ({type(e).__name__}: {e})."
        try:
            lines += ["", *cascade_section(json.loads(cascade.read_text()), doc, outcomes)]
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:  # say so, keep arms.md
            lines += ["", f"## Step 4: `{CASCADE_DIR}/results.json` could not be read ({type(e).__name__}: {e})"]
        if unread:
            lines += ["", unread]
    write_atomically(path, "\n".join(lines) + "\n")


def _outcome_records(text: str) -> list[dict[str, Any]]:
    """The eval's ``outcomes.jsonl`` lines, each checked for what the reproduction line reads
    (a ValueError names the first bad line)."""
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        rec = json.loads(line)
        if not (isinstance(rec, dict) and isinstance(rec.get("variant"), str) and isinstance(rec.get("id"), str)
                and isinstance(rec.get("weak_answer"), (str, type(None)))):
            raise ValueError(f"line {n} is not an outcome record with string variant and id and a string or "
                             f"null weak_answer: {line[:80]!r}")
        out.append(rec)
    return out


def _threshold(level: dict[str, Any]) -> str:
    if level.get("abstained"):
        return "abstain"
    return f"{level['threshold']:.4f}" + ("" if level["guaranteed"] else " (no guarantee)")


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def cascade_section(doc: dict[str, Any], study: dict[str, Any] | None = None,
                    outcomes: Sequence[dict[str, Any]] | None = None) -> list[str]:
    """Step 4 in brief, from the eval's ``results.json`` (its ``report.md`` has every table).
    With the study's own ``results.json`` (``study``), the split sizes, α, δ, δ's split, min_n
    and k are compared, and a difference is printed above the tables; with the eval's
    ``outcomes.jsonl`` records too, the weak model's answers on Jung's stream are set against
    arm A0's (the same strategy-free prompts) to show how far the models' replies reproduced."""
    from intercascade_core.lab.report import answered_nothing

    st, data = doc["settings"], doc["dataset"]
    lines = [f"## Step 4: the cascade ([`{CASCADE_DIR}/report.md`]({CASCADE_DIR}/report.md))", ""]
    if study is not None:
        ours = {"n_test": study["n_test"], "n_calibration": study["n_calibration"],
                **{k: study["settings"][k] for k in SHARED_SETTINGS}}
        theirs = {"n_test": data.get("n_test"), "n_calibration": data.get("n_calibration"),
                  **{k: st.get(k) for k in SHARED_SETTINGS}}
        differ = [f"{k} {theirs[k]} (the study's: {v})" for k, v in ours.items() if theirs[k] != v]
        if differ:
            lines += [f"**NOT THE STUDY'S STEP 4: this eval differs in {', '.join(differ)}.**", ""]
    lines += [f"`intercascade eval`: {data.get('n_test')} test and {data.get('n_calibration')} calibration "
              f"queries, α = {st.get('alpha')}, δ = {st.get('delta')}, min_n = {st.get('min_n')}, k = {st.get('k')}, "
              f"{str(st.get('strategy_mode')).replace('_', '-')} teaching, storage rule `{st.get('store_rule')}`.", "",
              "| calibration | prompt | accuracy | λ | accepted | errors | risk bound |",
              "|---|---|---|---|---|---|---|"]
    levels = doc["calibration"]["levels"]
    cals = [("Jung", levels, ["strategy-free"] * len(levels))]
    if "teach_calibration" in doc:
        tc = doc["teach_calibration"]
        cals.append(("Inter-Cascade", tc["levels"], [p.replace("_", "-") for p in tc["prompts"]]))
    if "insitu" in doc:
        ins = doc["insitu"]["levels"]
        cals.append(("in-situ", ins, ["replays of the Retrieval cascade"] * len(ins)))
    for who, lvs, prompts in cals:
        for lv, prompt in zip(lvs, prompts, strict=True):
            lines.append(f"| {who}, {lv['name']} | {prompt} | {_pct(lv.get('calibration_accuracy'))} | "
                         f"{_threshold(lv)} | {lv['n_accepted']} | {lv['n_errors']} | {lv['risk_bound']:.3f} |")
    lines += ["", "| pipeline | pipeline acc. | coverage | strong calls | weak acc. | accepted per level "
              "| discarded | failed | strategies stored |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in doc["variants"].items():
        acc = "— (answered nothing)" if answered_nothing(v) else _pct(v["pipeline_accuracy"])
        lines.append(f"| {name} | {acc} | {_pct(v['coverage'])} | {v['strong_calls']} of {v['n_queries']} | "
                     f"{_pct(v['weak_accuracy'])} | {', '.join(map(str, v['accepted_per_level']))} | "
                     f"{v['discarded']} | {v['failed']} | {v['repository_size']} |")
    if study is not None:
        lines += ["", *_reproduction(doc, study, outcomes)]
    return lines


def _reproduction(doc: dict[str, Any], study: dict[str, Any],
                  outcomes: Sequence[dict[str, Any]] | None) -> list[str]:
    """Step 4's replies against steps 1-3's on the same prompts: the calibration accuracies
    (aggregates: neither step keeps per-item calibration results) and, with the eval's
    outcomes, the weak model's answers on the test stream (Jung's against arm A0's)."""
    from intercascade_core.core.tasks import answers_match

    cal = study.get("calibration") or {}
    weak_cal = doc["calibration"]["levels"][0].get("calibration_accuracy")
    teach = doc.get("teach_calibration")
    strong_cal = teach["levels"][-1].get("calibration_accuracy") if teach else None
    pairs = [("weak", weak_cal, cal.get("weak_accuracy"))]
    if teach:
        pairs.append(("strong on the answer-and-strategy prompt", strong_cal, cal.get("strong_accuracy")))
    parts = [f"calibration accuracy, {who}: {_pct(here)} here, {_pct(there)} in step 1" for who, here, there in pairs]
    # a step-1 figure that is missing shows no difference
    reproduced = all(here == there for _, here, there in pairs if here is not None and there is not None)
    if outcomes is not None:
        a0 = {r["query"]: r for r in study.get("records", []) if r.get("arm") == "A0"}
        jung = {r["id"]: r for r in outcomes if r.get("variant") == "jung" and r.get("id") in a0}

        def same(x: str | None, y: str | None) -> bool:
            return x == y if x is None or y is None else answers_match(x, y, "math")

        if jung:
            differ = sum(not same(a0[q].get("answer"), r.get("weak_answer")) for q, r in jung.items())
            reproduced = reproduced and differ == 0
            parts.append(f"weak model on the {len(jung)} test queries: "
                         f"{sum(bool(r.get('weak_correct')) for r in jung.values())} correct here (Jung), "
                         f"{sum(bool(a0[q].get('correct')) for q in jung)} in arm A0, with a different final "
                         f"answer on {differ} of them")
    text = "**Reproduction.** Step 4 against steps 1-3 on the same prompts (greedy decoding): " + "; ".join(parts) + "."
    if not reproduced:
        text += (" A known cause, not isolated here: llama.cpp's server reuses the cached prompt prefix of the "
                 "previous request, so after a different predecessor the same prompt is computed in other batch "
                 "shapes, and greedy decoding can flip on near-ties (ggml-org/llama.cpp#4902). Comparisons are "
                 "therefore made within a step: the arms within steps 1-3, the pipelines within step 4.")
    return [text]


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` whole: a unique temporary file beside it, fsynced, then
    renamed (a crash or a concurrent run leaves the old file or the new one, never a part)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "config.toml")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "local-llm" / "study")
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                    help="MiniLM precision for retrieval (default: fp32, the reference model)")
    ap.add_argument("--budget-min", type=float, default=math.inf,
                    help="start no new test query after this many minutes (a part of the run: "
                         "results.json then covers the queries done so far and says so)")
    ap.add_argument("--no-servers", action="store_true", help="the model servers are already running")
    ap.add_argument("--report-only", action="store_true", help="rewrite arms.md from results.json")
    args = ap.parse_args(argv)
    if args.report_only:
        write_report(json.loads((args.out / "results.json").read_text()), args.out / "arms.md")
        return 0

    from run import _port, call_times  # the eval runner's helpers

    from intercascade_core.lab.config import load_config
    from intercascade_core.lab.datasets import gsm_symbolic_split, to_queries
    from intercascade_core.lab.evaluate import make_levels
    from intercascade_core.models.local_llm import LocalServer
    from intercascade_core.models.minilm import MiniLMEmbedder

    cfg = load_config(args.config)
    # the study runs at idle priority beside other work: a slow call is waited for, never cut
    # off and counted as a failure (an operational setting; no protocol value changes)
    cfg = replace(cfg, models=tuple(replace(m, timeout=CALL_TIMEOUT_S, max_retries=0) for m in cfg.models))
    d = cfg.data
    split = gsm_symbolic_split(templates=d.templates, variants=d.variants,
                               calibration_variants=d.calibration_variants, seed=d.seed, order=d.order,
                               pool_variants=POOL_VARIANTS)
    cal, test, pool = to_queries(split.calibration), to_queries(split.test), to_queries(split.pool)
    _log(f"data: {len(test)} test, {len(cal)} calibration, {len(pool)} pool queries")
    t0, t_start = time.perf_counter(), time.monotonic()
    weak_cfg, strong_cfg = cfg.models[0], cfg.models[-1]
    servers = [] if args.no_servers else [LocalServer("weak", port=_port(weak_cfg.base_url)),
                                          LocalServer("strong", port=_port(strong_cfg.base_url))]
    for s in servers:
        s.start()
    try:
        levels = make_levels(cfg.models)
        weak, strong = levels[0], levels[-1]
        run = calibrate(cal, levels, cfg)
        lam_w, lam_s = (float(c.threshold) for c in run.calibrations)
        taught, abstained = teach(pool, strong, lam_s)
        stored = [t for t in taught if t.stored]
        _log(f"  stored {len(stored)} of {len(taught)} strategies "
             f"({sum(t.correct for t in stored)} from correct strong answers)")
        embedder = MiniLMEmbedder(precision=args.precision)
        near = nearest(test, stored, embedder)
        records = ask_arms(test, stored, near, weak, deadline=t_start + args.budget_min * 60)
    finally:
        for s in servers:
            s.stop()
    wall = time.perf_counter() - t0
    analysis = analyse(records)
    times = {m.name: call_times(Path(m.response_cache)) for m in cfg.models}
    doc = {
        "protocol": "bench/local_llm/PROTOCOL.md",
        "complete": analysis["n_queries"] == len(test),
        "n_test": len(test),
        "n_calibration": len(cal),
        "settings": {"alpha": cfg.cascade.alpha, "delta": cfg.cascade.delta, "min_n": cfg.cascade.min_n,
                     "split_delta": cfg.cascade.split_delta, "k": K, "tau": TAU, "pool_variants": POOL_VARIANTS,
                     "templates": list(d.templates) if not isinstance(d.templates, int) else d.templates,
                     "variants": d.variants, "calibration_variants": d.calibration_variants, "seed": d.seed,
                     "embedder": f"all-MiniLM-L6-v2 ({args.precision})",
                     "models": {m.name: m.model for m in cfg.models}},
        "calibration": {"weak_threshold": lam_w, "strong_threshold": lam_s, "strong_abstained": abstained,
                        "weak_accuracy": float(np.mean(run.correct[0])),
                        "strong_accuracy": float(np.mean(run.correct[-1]))},
        "teaching": {"pool": len(taught), "stored": len(stored),
                     "stored_from_correct_answers": sum(t.correct for t in stored),
                     "records": [t.__dict__ for t in taught]},
        "analysis": analysis,
        "model_time": times,
        "wall_s_this_invocation": wall,
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out / "results.json", json.dumps(doc, indent=1, default=float) + "\n")
    write_report(doc, args.out / "arms.md")
    if analysis["n_queries"]:
        _log(f"analysis over {analysis['n_queries']} of {len(test)} queries:\n" + arms_table(analysis))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
