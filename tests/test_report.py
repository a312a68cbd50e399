"""report.py on synthetic data: tables equal results.json, files exist, plots are real PNGs."""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from intercascade_core.errors import InvalidArgumentError
from intercascade_core.lab.report import (
    LABELS,
    PLOTS,
    README_END,
    README_START,
    confidence_histograms_figure,
    format_percent,
    readme_section,
    render_insitu,
    render_markdown,
    render_risk,
    render_tables,
    stream_figure,
    threshold_accuracy_figure,
    update_readme,
    write_report,
)

METRICS = ("pipeline_accuracy", "strong_call_rate", "coverage", "weak_accuracy", "weak_correct_accepted")
COLUMNS = {
    "Pipeline Acc. (%)": "pipeline_accuracy",
    "Strong Call (%)": "strong_call_rate",
    "Cov. (%)": "coverage",
    "Weak Acc. (%)": "weak_accuracy",
    "Weak Corr. Accpt. (%)": "weak_correct_accepted",
    "Token Reduction (%)": "token_reduction",
    "Cost Reduction (%)": "cost_reduction",
    "Teaching Tokens": "teaching_tokens",
    "Cost Reduction incl. Teaching (%)": "cost_reduction_with_teaching",
}


def parse_tables(markdown: str) -> dict[str, dict[str, str]]:
    """{variant label: {metric key: cell text}} from every Markdown table with a Pipeline column."""
    out: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "Pipeline":
            header = cells
        elif header and not set(line) <= set("|-: "):
            for name, cell in zip(header[1:], cells[1:], strict=True):
                out.setdefault(cells[0], {})[COLUMNS[name]] = cell
    return out


def check_report_matches_results(folder: Path) -> dict[str, Any]:
    results = json.loads((folder / "results.json").read_text())
    tables = parse_tables((folder / "report.md").read_text())
    for variant, values in results["variants"].items():
        row = tables[LABELS[variant]]
        keys = METRICS + (("token_reduction", "cost_reduction") if variant != "jung" else ())
        for key in keys:
            assert row[key] == format_percent(values[key]), (variant, key)
            if values[key] is not None:
                assert abs(float(row[key]) - 100 * values[key]) <= 0.005 + 1e-9
    return results


def png_info(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, text, size = 8, {}, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            k, _, v = body.partition(b"\0")
            text[k.decode("latin-1")] = v.decode("latin-1")
        elif kind == b"iTXt":  # keyword\0 flag method lang\0 translated\0 text
            k, _, rest = body.partition(b"\0")
            _, _, rest = rest[2:].partition(b"\0")
            _, _, v = rest.partition(b"\0")
            text[k.decode("latin-1")] = v.decode("utf-8")
        pos += 12 + length
        if kind == b"IEND":
            break
    return {"size": size, "text": text, "bytes": len(data)}


def check_plots(folder: Path) -> None:
    for name in PLOTS:
        info = png_info(folder / name)
        w, h = info["size"]
        assert 400 <= w <= 2500 and 250 <= h <= 1500, (name, w, h)
        assert info["bytes"] > 10_000, name
        labels = info["text"]["Description"]
        for v in ("jung", "random", "retrieval"):
            assert LABELS[v] in labels or name == PLOTS[1], (name, labels)


# --------------------------------------------------------------------------- synthetic data


def _synthetic(n: int = 120, seed: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    outcomes = []
    variants: dict[str, Any] = {}
    for j, v in enumerate(("jung", "random", "retrieval")):
        conf = np.clip(rng.beta(2 + 2 * j, 2, n), 0, 1)
        ok = rng.random(n) < conf * (0.5 + 0.2 * j)
        weak_acc = conf >= 0.7
        for i in range(n):
            outcomes.append(
                {
                    "variant": v,
                    "index": i,
                    "decision": "weak_accepted" if weak_acc[i] else "strong_accepted",
                    "weak_confidence": float(conf[i]),
                    "weak_correct": bool(ok[i]),
                }
            )
        variants[v] = {
            "pipeline_accuracy": 0.6 + 0.05 * j + 1 / 3 * 0.01,
            "strong_call_rate": float(1 - weak_acc.mean()),
            "coverage": 0.95 if j else 1.0,
            "weak_accuracy": float(ok.mean()),
            "weak_correct_accepted": float((ok & weak_acc).mean()),
            "weak_accepted_risk": float((~ok & weak_acc).sum() / max(1, weak_acc.sum())),
            "strong_calls": int((~weak_acc).sum()),
            "n_queries": n,
            "repository_size": 3 * j,
        }
        if j:
            variants[v].update(token_reduction=0.1 * j, cost_reduction=-0.01 if j == 1 else 0.23456,
                               token_reduction_total=0.05, cost_reduction_total=float("nan"))
    results = {
        "dataset": {"name": "synthetic", "n_test": n, "n_calibration": 50, "order": "shuffled"},
        "settings": {"alpha": 0.2, "delta": 0.1, "k": 2, "models": [{"name": "weak", "model": "w"}]},
        "calibration": {"levels": [
            {"name": "weak", "threshold": 0.7, "n_calibration": 50, "n_accepted": 30, "n_errors": 2,
             "risk_bound": 0.19, "guaranteed": True},
            {"name": "strong", "threshold": None, "n_calibration": 20, "n_accepted": 0, "n_errors": 0,
             "risk_bound": 1.0, "guaranteed": True},
        ]},
        "variants": variants,
    }
    return results, outcomes


def test_write_report_files_tables_and_plots(tmp_path: Path) -> None:
    results, outcomes = _synthetic()
    files = write_report(results, outcomes, tmp_path / "rep")
    assert files.report.exists() and files.results.exists() and files.outcomes.exists()
    assert [p.name for p in files.plots] == list(PLOTS)
    doc = check_report_matches_results(files.folder)
    assert doc["plots"] == list(PLOTS)
    assert doc["variants"]["retrieval"]["cost_reduction_total"] is None  # NaN -> null, strict JSON
    md = files.report.read_text()
    for title in ("Table 3", "Table 4", "Table 5", "Calibration"):
        assert title in md
    assert "∞ (abstains" in md  # the strong level abstained
    for p in PLOTS:
        assert f"]({p})" in md
    lines = files.outcomes.read_text().splitlines()
    assert len(lines) == len(outcomes) and json.loads(lines[0])["variant"] == "jung"
    check_plots(files.folder)


def test_tables_render_negative_reduction_and_nan() -> None:
    results, _ = _synthetic()
    results["variants"]["jung"]["pipeline_accuracy"] = math.nan
    md = render_tables(results)
    rows = parse_tables(md)
    assert rows[LABELS["jung"]]["pipeline_accuracy"] == "n/a"
    assert rows[LABELS["random"]]["cost_reduction"] == "-1.00"
    assert rows[LABELS["retrieval"]]["cost_reduction"] == "23.46"
    assert "token_reduction" not in rows[LABELS["jung"]]
    assert "answered nothing" not in md


def test_a_reduction_that_rounds_to_zero_is_neither_negative_nor_explained() -> None:
    # a real run: 41 964 strong tokens against Jung's 41 962 is -0.0048 %, shown as 0.00
    results, _ = _synthetic()
    results["variants"]["random"]["token_reduction"] = -4.77e-05
    results["variants"]["retrieval"]["token_reduction"] = -0.0123
    md = render_markdown(results, plots=())
    rows = parse_tables(md)
    assert rows[LABELS["random"]]["token_reduction"] == "0.00"
    assert rows[LABELS["retrieval"]]["token_reduction"] == "-1.23"
    note = next(line for line in md.splitlines() if line.startswith("- A negative reduction"))
    assert LABELS["retrieval"] in note and LABELS["random"] not in note
    assert "also writes a strategy" not in note  # no strategy mode given: no single-call cause
    results["settings"]["strategy_mode"] = "single_call"
    assert "each strong answer call also writes a strategy" in render_markdown(results, plots=())
    results["variants"]["retrieval"]["token_reduction"] = -4.0e-05
    assert "A negative reduction" not in render_markdown(results, plots=())


def test_a_pipeline_that_answered_nothing_is_flagged() -> None:
    results, _ = _synthetic()
    results["variants"]["retrieval"].update(pipeline_accuracy=1.0, coverage=0.0)  # Jung's convention
    md = render_tables(results)
    assert parse_tables(md)[LABELS["retrieval"]]["pipeline_accuracy"] == "100.00"
    assert f"{LABELS['retrieval']} answered nothing (coverage 0)" in md
    assert LABELS["jung"] + " answered" not in md


def test_figures_label_the_three_variants() -> None:
    _, outcomes = _synthetic(60)
    for make in (threshold_accuracy_figure, stream_figure):
        fig = make(outcomes)
        texts = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
        assert {LABELS["jung"], LABELS["random"], LABELS["retrieval"]} <= texts
    fig = confidence_histograms_figure(outcomes, weak_threshold=0.7)
    assert [ax.get_title() for ax in fig.axes] == [LABELS[v] for v in ("jung", "random", "retrieval")]


def test_threshold_accuracy_curve_values() -> None:
    outcomes = [
        {"variant": "jung", "index": i, "decision": "strong_accepted", "weak_confidence": c, "weak_correct": ok}
        for i, (c, ok) in enumerate([(0.9, True), (0.8, False), (0.5, True), (0.2, False)])
    ]
    fig = threshold_accuracy_figure(outcomes)
    line = fig.axes[0].get_lines()[0]
    x, y = line.get_xdata(), line.get_ydata()
    at = {round(float(a), 3): float(b) for a, b in zip(x, y, strict=True)}
    assert at[0.0] == pytest.approx(50.0)
    assert at[0.5] == pytest.approx(100 * 2 / 3)
    assert at[0.85] == pytest.approx(100.0)
    assert math.isnan(at[0.95])


def test_write_report_rejects_empty_results(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="variants"):
        write_report({"variants": {}}, [], tmp_path)


def test_no_plots_option(tmp_path: Path) -> None:
    results, outcomes = _synthetic(30)
    files = write_report(results, outcomes, tmp_path, plots=False)
    assert files.plots == () and not any(tmp_path.glob("*.png"))
    assert "## Plots" not in files.report.read_text()
    assert re.search(r"\| Inter-Cascade \(Retrieval\) \|", files.report.read_text())


def test_readme_block_is_regenerated_between_markers(tmp_path: Path) -> None:
    results, _ = _synthetic(30)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n{README_START}\nold text\n{README_END}\n\n## After\n")
    section = readme_section(results, plot="docs/demo/strong_calls_along_stream.png", command="intercascade demo")
    assert update_readme(readme, section) is True
    text = readme.read_text()
    assert "old text" not in text and text.startswith("# Title") and text.endswith("## After\n")
    assert "![Strong-LLM calls along the stream](docs/demo/strong_calls_along_stream.png)" in text
    rows = parse_tables(text)
    for v, values in results["variants"].items():
        assert rows[LABELS[v]]["strong_call_rate"] == format_percent(values["strong_call_rate"])
    assert update_readme(readme, section) is False  # idempotent
    bare = tmp_path / "R2.md"
    bare.write_text("no markers\n")
    with pytest.raises(InvalidArgumentError, match="markers"):
        update_readme(bare, section)


# --------------------------------------------------------------------------- the risk view


def _risk(threshold: float | None, accepted: int, errors: int, *, with_s: float | None, verdict: str,
          alarm: int | None = None) -> dict[str, Any]:
    return {
        "alpha": 0.2, "delta": 0.05, "threshold": threshold, "accepted": accepted, "errors": errors,
        "empirical_risk": errors / accepted if accepted else None,
        "exceeds_alpha": bool(accepted) and errors / accepted > 0.2, "risk_upper": 0.3,
        "alpha_certified_without_strategies": 0.1849, "alpha_certified_with_strategies": with_s,
        "audit": {"verdict": verdict, "alarm_at_label": alarm, "n_labels": accepted},
    }


def _with_risk() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    results, outcomes = _synthetic(60)
    v = results["variants"]
    v["jung"]["risk"] = _risk(0.7, 10, 1, with_s=None, verdict="inconclusive")
    v["random"]["risk"] = _risk(0.7, 0, 0, with_s=0.5, verdict="inconclusive")
    v["retrieval"]["risk"] = _risk(0.7, 40, 12, with_s=0.3333, verdict="alarm", alarm=30)
    v["retrieval_insitu"] = {**v["retrieval"], "risk": _risk(None, 0, 0, with_s=1.0, verdict="inconclusive")}
    outcomes += [{**o, "variant": "retrieval_insitu"} for o in outcomes if o["variant"] == "retrieval"]
    results["insitu"] = {
        "thresholds": [None, 0.25], "rounds": 2, "converged": False, "n_calibration": 50,
        "replay_with_strategies": 40, "thresholds_per_round": [[0.7, 0.2], [None, 0.25], [None, 0.25]],
        "levels": [{"threshold": None, "n_accepted": 0, "n_errors": 0, "risk_bound": 1.0}],
        "theorem_view": {"static_threshold": 0.7, "alpha_certified_without_strategies": 0.1849, "n_without": 30,
                         "errors_without": 2, "alpha_certified_with_strategies": 0.41, "n_with": 35,
                         "errors_with": 9, "insitu_threshold": None},
    }
    return results, outcomes


def test_risk_section_matches_results() -> None:
    results, _ = _with_risk()
    md = render_markdown(results, plots=())
    assert md.index("## Results") < md.index("## Risk of accepted weak answers") < md.index("## Notes")
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in md.splitlines() if ln.startswith("| ") and "λ_w |" not in ln}
    jung = rows[LABELS["jung"]]
    assert jung[1:] == ["0.7000", "10", "1", "10.00", "20.00", "no", "18.49", "–", "inconclusive"]
    assert rows[LABELS["random"]][4] == "–"  # nothing accepted: no empirical risk
    assert rows[LABELS["retrieval"]][6:] == ["**yes**", "18.49", "33.33", "alarm (label 30)"]
    assert rows[LABELS["retrieval_insitu"]][1] == "abstain"
    assert LABELS["retrieval_insitu"] == "Inter-Cascade (in-situ λ)"
    # the in-situ block: rounds, non-convergence, Theorem 2.2's view
    ins = render_insitu(results)
    assert ins.strip() in md and "**did not converge**" in ins and "(0.7000, 0.2000) → (∞, 0.2500)" in ins
    assert "| static λ_w, first replay with strategies | 0.7000 | 35 | 9 | 41.00 |" in ins
    assert "| in-situ λ_w, last replay | abstain | 0 | 0 | 100.00 |" in ins
    # the Tables 3-5 carry the fourth variant too
    assert LABELS["retrieval_insitu"] in parse_tables(render_tables(results))


def test_no_risk_blocks_no_risk_section() -> None:
    results, _ = _synthetic(30)
    assert render_risk(results) == "" and render_insitu(results) == ""
    assert "Risk of accepted weak answers" not in render_markdown(results, plots=())


def test_plots_with_the_insitu_variant(tmp_path: Path) -> None:
    results, outcomes = _with_risk()
    files = write_report(results, outcomes, tmp_path)
    doc = check_report_matches_results(files.folder)
    assert doc["variants"]["retrieval_insitu"]["risk"]["threshold"] is None
    check_plots(files.folder)
    assert LABELS["retrieval_insitu"] in png_info(files.folder / PLOTS[2])["text"]["Description"]
    fig = confidence_histograms_figure(outcomes, weak_threshold=0.7, thresholds={"retrieval_insitu": None})
    assert [ax.get_title() for ax in fig.axes][-1] == LABELS["retrieval_insitu"]
    assert len(fig.axes[-1].get_lines()) == 0 and len(fig.axes[0].get_lines()) == 1  # abstains: no λ line


def test_table5_teaching_column_settings_and_simulator_knobs_are_reported() -> None:
    results, _ = _synthetic()
    for j, v in enumerate(("random", "retrieval"), start=1):
        results["variants"][v].update(teaching_tokens=1234 * j, cost_reduction_with_teaching=-0.5 + 0.1 * j,
                                      strategies_rejected=j)
    results["settings"].update(
        min_n=10, strategy_mode="single_call", store_rule="strict", preregistered="bench/x.toml",
        simulated=True,
        simulator={"weak_base_accuracy": 0.15, "strong_base_accuracy": 0.8, "weak_taught_accuracy": 0.85,
                   "knobs": {"taught_accuracy": 0.6, "mislead_rate": 0.9, "mislead_conf": [0.94, 1.0, 1.0],
                             "confidence_boost": 0.5}},
    )
    results["teach_calibration"] = {"levels": [
        {"name": "weak", "threshold": 0.7, "n_calibration": 50, "n_accepted": 30, "n_errors": 2,
         "risk_bound": 0.19, "guaranteed": True},
        {"name": "strong", "threshold": 0.6543, "n_calibration": 50, "n_accepted": 40, "n_errors": 3,
         "risk_bound": 0.18, "guaranteed": True},
    ]}
    md = render_markdown(results, plots=())
    rows = parse_tables(md)
    assert rows[LABELS["retrieval"]]["teaching_tokens"] == "2468"
    assert rows[LABELS["random"]]["cost_reduction_with_teaching"] == format_percent(-0.4)
    assert "α = 0.2, δ = 0.1 (δ split across levels), min_n = 10 (fixed in bench/x.toml" in md
    assert "single-call" in md and "storage rule: strict" in md
    assert "rejected by the storage rule: Inter-Cascade (Random) 1, Inter-Cascade (Retrieval) 2" in md
    assert "`mislead_rate` = 0.9" in md and "`confidence_boost` = 0.5" in md and "= 0.60" in md
    assert "| strong | 0.6543 |" in md  # the strong level's own single-call calibration
    assert "*Teaching Tokens*" in md and "as the paper's Table 5 does" in md
