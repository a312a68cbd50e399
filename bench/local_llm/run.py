"""The cascade end to end with a real local weak/strong LLM pair on the CPU.

    python bench/local_llm/run.py [--out docs/local-llm] [--config bench/local_llm/config.toml]

1. starts the two llama.cpp servers of ``config.toml`` (``LocalServer``: 2 threads,
   ``OMP_WAIT_POLICY=PASSIVE``; the GGUF files are assembled and sha256-checked first;
   install them with ``scripts/prepare-local-llm.sh``);
2. runs ``intercascade eval --config config.toml --out OUT`` (Jung, Random, Retrieval and,
   with ``insitu = true``, Retrieval with in-situ thresholds) and keeps its log;
3. appends to ``OUT/report.md`` what ``eval`` cannot know: per-model accuracy on the stream,
   seconds per call and per query per model (from the response logs), the machine, its
   load and the wall time.

Sizing (measured on the 2-core machine before the run): a weak call takes ~10 s, a strong
call ~20 s. Calibration asks both models all 40 calibration queries (~20 min); each policy
asks the weak model all 30 test queries (~5 min) plus the strong model (and its strategy
call) for the deferred ones; the in-situ calibration replays the 40 calibration queries up
to twice. Identical temperature-0 requests (the strategy-free calls every policy shares)
are answered once and memoised (``response_cache``), which is what makes four policies fit
in about 60-90 minutes. Response logs live in ``bench/local_llm/cache/`` (git-ignored); a
rerun with them replays the same replies in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SECTION = "## Real local models: accuracy and time"


def _port(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1].split("/", 1)[0])


def _load_avg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def call_times(cache_file: Path) -> dict[str, Any]:
    """Per-model timing from a response log: every record is one real (uncached) call.

    A least-squares fit ``seconds = a + b * completion_tokens + c * prompt_tokens`` turns
    a policy's token counts into model seconds (replays from the log took no model time;
    prompts with strategies are longer, and reading them costs time on a CPU).
    """
    from intercascade_core.models.response_cache import read_cache

    recs = read_cache(cache_file)
    out: dict[str, Any] = {"calls": len(recs)}
    if not recs:
        return out
    usage = [json.loads(r.body).get("usage") or {} for r in recs]
    secs = np.array([r.elapsed_s for r in recs], dtype=np.float64)
    comp = np.array([u.get("completion_tokens") or 0 for u in usage], dtype=np.float64)
    prompt = np.array([u.get("prompt_tokens") or 0 for u in usage], dtype=np.float64)
    out.update(total_s=float(secs.sum()), median_s=float(np.median(secs)), mean_s=float(secs.mean()),
               mean_completion_tokens=float(comp.mean()), mean_prompt_tokens=float(prompt.mean()),
               completion_tokens_per_s=float(comp.sum() / secs.sum()) if secs.sum() > 0 else None)
    design = np.column_stack([np.ones_like(secs), comp, prompt])
    if len(recs) >= 4 and np.linalg.matrix_rank(design) == 3:
        a, b, c = np.linalg.lstsq(design, secs, rcond=None)[0]
        out.update(fit_a=float(a), fit_b=float(b), fit_c=float(c))
    else:  # too few or degenerate calls for a fit: the mean call
        out.update(fit_a=float(secs.mean()), fit_b=0.0, fit_c=0.0)
    return out


def model_seconds(calls: float, completion_tokens: float, prompt_tokens: float, t: dict[str, Any]) -> float:
    return calls * t["fit_a"] + completion_tokens * t["fit_b"] + prompt_tokens * t["fit_c"]


def _accuracy_row(label: str, level: dict[str, Any], recs: list[dict[str, Any]], variant: str, key: str, *,
                  deferred: bool) -> str:
    """One row of the per-model accuracy table: the level's calibration accuracy and its
    correct answers among ``variant``'s test records that asked it."""
    acc_cal = level.get("calibration_accuracy")
    cal_s = f"{acc_cal:.0%} of {level.get('n_items', '?')}" if acc_cal is not None else "-"
    asked = [bool(r[key]) for r in recs if r["variant"] == variant and r.get(key) is not None]
    test = f"{sum(asked)}/{len(asked)} = {sum(asked) / len(asked):.0%} ({variant}" if asked else "-"
    if asked:
        test += ", deferred queries only)" if deferred else ")"
    return f"| {label} | {cal_s} | {test} |"


def summarise(out: Path, cfg_path: Path, command: str, wall_s: float, load_before: str,
              load_after: str) -> str:
    from intercascade_core.lab.config import load_config

    cfg = load_config(cfg_path)
    if len(cfg.models) != 2:
        raise SystemExit(f"{cfg_path}: this report is written for a weak/strong pair, got {len(cfg.models)} models")
    doc = json.loads((out / "results.json").read_text())
    recs = [json.loads(line) for line in (out / "outcomes.jsonl").read_text().splitlines() if line]
    names = [m.name for m in cfg.models]
    times = {m.name: call_times(Path(m.response_cache)) for m in cfg.models}
    model_s = sum(t.get("total_s", 0.0) for t in times.values())
    n_real = sum(t["calls"] for t in times.values())
    lines = [SECTION, ""]
    lines.append(f"The response logs hold {n_real} real model calls, {model_s / 60:.1f} min of model time "
                 f"in all (the logs may span several invocations of this script); every other call of "
                 f"the {len(doc['variants'])} policies repeated one of them byte for byte and was replayed "
                 f"from the log. Wall time of the invocation that wrote this report: {wall_s / 60:.1f} min.")
    lines.append("")
    lines.append(f"Made by `{command}` on {os.cpu_count()} cores "
                 f"({_cpu_name()}); load average (1/5/15 min) {load_before} before, {load_after} "
                 f"after. Models: " + ", ".join(f"{m.name} = `{m.model}`" for m in cfg.models)
                 + ", greedy decoding (temperature 0), llama.cpp via xllamacpp, 2 threads each.")
    lines += ["", ("**Per-model accuracy** on the calibration split and the test stream (strategy-free "
              "prompt, Jung's stream; in single-call mode also the strong model on the "
              "answer-and-strategy prompt, Retrieval's stream)"), "",
              "| model | calibration split | test stream |", "|---|---|---|"]
    for i, lv in enumerate(doc["calibration"]["levels"]):
        lines.append(_accuracy_row(names[i], lv, recs, "jung", "weak_correct" if i == 0 else "strong_correct",
                                   deferred=i > 0))
    teach = doc.get("teach_calibration")
    if teach and "retrieval" in doc["variants"]:  # single-call: the strong level's own prompt
        lines.append(_accuracy_row(f"{names[-1]}, answer-and-strategy prompt", teach["levels"][-1], recs,
                                   "retrieval", "strong_correct", deferred=True))
    lines += ["", ("**Seconds per call** (every real call in the response logs; replays of identical "
              "temperature-0 requests are not counted)"), "",
              ("| model | real calls | median s/call | mean s/call | prompt tokens/call | completion tokens/call "
              "| completion tokens per wall second |"),
              "|---|---|---|---|---|---|---|"]
    for name, t in times.items():
        if t["calls"]:
            lines.append(f"| {name} | {t['calls']} | {t['median_s']:.1f} | {t['mean_s']:.1f} | "
                         f"{t['mean_prompt_tokens']:.0f} | {t['mean_completion_tokens']:.0f} | "
                         f"{t['completion_tokens_per_s']:.1f} |")
    lines += ["", "**Model seconds per query** on the test stream, per policy: each policy's calls "
              "and tokens (answers and strategy writing) priced with the per-model least-squares fit "
              "`s = a + b * completion_tokens + c * prompt_tokens` of the calls above ("
              + "; ".join(f"{n}: a = {t['fit_a']:.2f} s, b = {t['fit_b'] * 1000:.0f} ms, "
                          f"c = {t['fit_c'] * 1000:.1f} ms per token"
                          for n, t in times.items() if t["calls"]) + ").", "",
              "| policy | " + " | ".join(f"{n} calls/query | {n} s/query" for n in names) + " | total s/query |",
              "|---|" + "---|" * (2 * len(names) + 1)]
    for v in doc["variants"]:
        rows = [r for r in recs if r["variant"] == v]
        cells, total = [], 0.0
        for i, n in enumerate(names):
            calls = sum(r["calls"][i] for r in rows)
            comp = sum(r["completion_tokens"][i] for r in rows)
            prompt = sum(r["tokens"][i] - r["completion_tokens"][i] for r in rows)
            sec = model_seconds(calls, comp, prompt, times[n]) if times[n]["calls"] else float("nan")
            total += sec
            cells += [f"{calls / len(rows):.2f}", f"{sec / len(rows):.1f}"]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {total / len(rows):.1f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "config.toml")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "local-llm")
    ap.add_argument("--summary-only", action="store_true",
                    help="only (re)write the appended section from an existing run in --out")
    args = ap.parse_args(argv)

    from intercascade_core.lab.config import load_config
    from intercascade_core.models.local_llm import LocalServer

    cfg = load_config(args.config)
    def rel(p):
        return os.path.relpath(p, ROOT)
    command = f"python {rel(__file__)} --config {rel(args.config)} --out {rel(args.out)}"
    if args.summary_only:
        meta = json.loads((args.out / "run.json").read_text())
        text = summarise(args.out, args.config, meta["command"], meta["wall_s"], meta["load_before"],
                         meta["load_after"])
    else:
        load_before = _load_avg()
        t0 = time.perf_counter()
        weak, strong = cfg.models[0], cfg.models[-1]
        with LocalServer("weak", port=_port(weak.base_url)), LocalServer("strong", port=_port(strong.base_url)):
            eval_cmd = [sys.executable, "-m", "intercascade_core", "eval", "--config", str(args.config),
                        "--out", str(args.out)]
            print("+", shlex.join(eval_cmd), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "eval.log", "w") as log:
                proc = subprocess.Popen(eval_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                assert proc.stdout is not None
                for line in proc.stdout:
                    sys.stdout.write(line)
                    log.write(line)
                rc = proc.wait()
        if rc != 0:
            print(f"intercascade eval failed (exit {rc}); see {args.out / 'eval.log'}", file=sys.stderr)
            return rc
        wall = time.perf_counter() - t0
        meta = {"command": command, "wall_s": wall, "load_before": load_before, "load_after": _load_avg()}
        (args.out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
        text = summarise(args.out, args.config, command, wall, load_before, meta["load_after"])
    report = args.out / "report.md"
    body = report.read_text()
    if SECTION in body:
        body = body[: body.index(SECTION)].rstrip() + "\n\n"
    report.write_text(body + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
