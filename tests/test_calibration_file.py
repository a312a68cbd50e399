"""Saved calibrations: Calibration.to_dict/from_dict, the versioned file (save, load,
mismatch, damage, force) and the CLI's --save / --save-calibration / --calibration."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intercascade_core.cli import main
from intercascade_core.core.calibrate import (
    CALIBRATION_FIELDS,
    Calibration,
    calibrate,
    calibrate_cascade,
    cp_upper,
)
from intercascade_core.core.cascade import CalibrationRun, CascadeConfig
from intercascade_core.errors import CorruptStoreError, IncompatibleStoreError, InvalidArgumentError
from intercascade_core.storage import calibration_file as cf
from intercascade_core.storage.calibration_file import (
    calibration_data_sha256,
    calibration_mismatches,
    level_model_ids,
    load_calibration,
    load_calibration_for,
    prompt_fingerprint,
    save_calibration,
)

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "intercascade_core" / "data" / "examples"
IDS = ("sim-weak", "sim-strong")


def _data(n: int = 400, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    confs = [rng.random(n), rng.random(n)]
    ok = [rng.random(n) < confs[0] + 0.2, rng.random(n) < confs[1] + 0.4]
    return confs, ok


def _run(n: int = 400, seed: int = 0, **kw: object) -> CalibrationRun:
    confs, ok = _data(n, seed)
    cals = calibrate_cascade(confs, ok, alpha=0.2, delta=0.1, **kw)  # type: ignore[arg-type]
    return CalibrationRun(
        calibrations=cals,
        confidences=tuple(tuple(map(float, c)) for c in confs),
        correct=tuple(tuple(map(bool, y)) for y in ok),
        failures=tuple(tuple(None for _ in c) for c in confs),
        usage=(),
    )


# --------------------------------------------------------------------------- to_dict / from_dict


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    alpha=st.floats(0.01, 0.6),
    delta=st.floats(0.01, 0.5),
    min_n=st.integers(1, 60),
    on_fail=st.sampled_from(["abstain", "jung"]),
    grid=st.sampled_from([None, 7, "unique"]),
)
def test_every_calibration_survives_the_plain_dict(seed, n, alpha, delta, min_n, on_fail, grid) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    ok = rng.random(n) < conf
    cal = calibrate(conf, ok, alpha=alpha, delta=delta, min_n=min_n, on_fail=on_fail, grid=grid)
    d = cal.to_dict()
    assert list(d) == list(CALIBRATION_FIELDS)
    back = Calibration.from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert back == cal


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("threshold", 1.5, "threshold"),
        ("threshold", None, "abstained"),  # inf threshold but not abstained
        ("alpha", 0.0, "alpha"),
        ("alpha", True, "alpha"),
        ("delta", "0.1", "delta"),
        ("n_accepted", 10**6, "n_accepted"),
        ("n_errors", -1, "n_errors"),
        ("n_errors", 10**30, "n_errors"),
        ("risk_bound", 0.05, "risk_bound"),
        ("min_n", 0, "min_n"),
        ("on_fail", "retry", "on_fail"),
        ("guaranteed", 1, "guaranteed"),
        ("note", "x" * 5000, "note"),
    ],
)
def test_from_dict_refuses_a_wrong_field_by_name(field: str, value: object, named: str) -> None:
    cal = _run().calibrations[1]
    assert not cal.abstained
    d = cal.to_dict()
    d[field] = value
    with pytest.raises(InvalidArgumentError) as info:
        Calibration.from_dict(d)
    assert info.value.argument == named


def test_from_dict_refuses_missing_and_unknown_keys() -> None:
    d = _run().calibrations[0].to_dict()
    with pytest.raises(InvalidArgumentError, match="n_tested"):
        Calibration.from_dict({k: v for k, v in d.items() if k != "n_tested"})
    with pytest.raises(InvalidArgumentError, match="extra"):
        Calibration.from_dict({**d, "extra": 1})


# --------------------------------------------------------------------------- the file


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    run = _run()
    path = tmp_path / "cal.json"
    written = save_calibration(path, run, model_ids=IDS, level_names=("weak", "strong"))
    saved = load_calibration(path)
    assert saved.calibrations == run.calibrations
    assert saved.confidences == run.confidences and saved.correct == run.correct
    assert saved.model_ids == IDS and saved.level_names == ("weak", "strong")
    assert saved.prompt_fingerprint == prompt_fingerprint(2) == written.prompt_fingerprint
    assert saved.data_sha256 == calibration_data_sha256(run.confidences, run.correct)
    assert saved.created_at == written.created_at and saved.package_version
    back = saved.calibration_run()
    assert back.calibrations == run.calibrations and back.confidences == run.confidences
    doc = json.loads(path.read_text())
    level = doc["levels"][1]["calibration"]
    for key in ("threshold", "alpha", "delta", "grid_rule", "min_n", "n_calibration", "n_accepted",
                "n_errors", "risk_bound"):
        assert key in level
    assert doc["format_version"] == 1 and doc["format"] == "intercascade-calibration"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


def test_an_abstaining_level_and_plain_calibrations_with_data(tmp_path: Path) -> None:
    confs, ok = _data(200)
    cals = calibrate_cascade(confs, ok, alpha=0.01, delta=0.1)
    assert cals[0].abstained and math.isinf(cals[0].threshold)
    save_calibration(tmp_path / "c.json", cals, model_ids=IDS, data=(confs, ok))
    assert load_calibration(tmp_path / "c.json").calibrations == cals
    with pytest.raises(InvalidArgumentError, match="data"):
        save_calibration(tmp_path / "d.json", cals, model_ids=IDS)
    with pytest.raises(InvalidArgumentError, match="model_ids"):
        save_calibration(tmp_path / "d.json", cals, model_ids=("one",), data=(confs, ok))
    with pytest.raises(InvalidArgumentError, match="not what the calibrations were computed from"):
        save_calibration(tmp_path / "d.json", _run(400).calibrations, model_ids=IDS, data=_data(400, seed=1))
    with pytest.raises(InvalidArgumentError, match="fingerprint"):
        save_calibration(tmp_path / "d.json", cals, model_ids=IDS, data=(confs, ok), fingerprint="abc")
    assert not (tmp_path / "d.json").exists()


def test_a_jung_fallback_is_named_on_load(tmp_path: Path) -> None:
    confs, ok = _data(200)
    flipped = [~ok[0], ok[1]]  # confident weak answers are now the wrong ones: the first test fails
    cals = calibrate_cascade(confs, flipped, alpha=0.2, delta=0.1, on_fail="jung")
    assert not cals[0].guaranteed and cals[1].guaranteed
    save_calibration(tmp_path / "c.json", cals, model_ids=IDS, level_names=("weak", "strong"), data=(confs, flipped))
    note = load_calibration(tmp_path / "c.json").unguaranteed_note()
    assert note is not None and note.startswith("not certified (on_fail='jung'): level weak: first test failed")
    assert "strong" not in note
    save_calibration(tmp_path / "d.json", calibrate_cascade(confs, ok, alpha=0.2, delta=0.1, on_fail="jung"),
                     model_ids=IDS, data=(confs, ok))
    assert load_calibration(tmp_path / "d.json").unguaranteed_note() is None
    few = [c[:40] for c in confs], [y[:40] for y in ok]  # under min_n: accept all, then inherit
    cals = calibrate_cascade(*few, alpha=0.2, delta=0.1, min_n=100, on_fail="jung")
    save_calibration(tmp_path / "e.json", cals, model_ids=IDS, level_names=("weak", "strong"), data=few)
    note = load_calibration(tmp_path / "e.json").unguaranteed_note()
    assert note is not None and "level weak: fewer than min_n=100 items; Jung fallback accepts everything" in note
    assert "level strong: fewer than min_n=100 items left; inherits the previous level's threshold" in note


def test_model_ids_of_levels_are_what_configs_name() -> None:
    from tests._crash_worker import sim_levels

    levels, client = sim_levels()
    client.close()
    assert level_model_ids(levels) == IDS


def test_the_fingerprint_follows_the_calibration_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """It changes with the prompt text and with what the config makes a level answer:
    the last level of a single-call cascade is calibrated on the answer-and-strategy
    prompt, a Jung or two-call cascade's on the strategy-free one."""
    single = prompt_fingerprint(2, CascadeConfig(strategy_mode="single_call"))
    two_call = prompt_fingerprint(2, CascadeConfig(strategy_mode="two_call"))
    jung = prompt_fingerprint(2, CascadeConfig(policy="jung"))
    assert single != two_call == jung
    assert prompt_fingerprint(2) == prompt_fingerprint(2, CascadeConfig())
    assert prompt_fingerprint(3, CascadeConfig(policy="jung")) != jung  # one more level
    monkeypatch.setattr(cf, "calibration_prompt", lambda q, i, n, c: "Answer briefly.\n" + q.text)
    assert prompt_fingerprint(2) not in (single, two_call)


def test_the_data_digest_changes_with_any_item() -> None:
    run = _run(50)
    base = calibration_data_sha256(run.confidences, run.correct)
    flipped = [list(r) for r in run.correct]
    flipped[1][7] = not flipped[1][7]
    assert calibration_data_sha256(run.confidences, flipped) != base
    nudged = [list(r) for r in run.confidences]
    nudged[0][0] = math.nextafter(nudged[0][0], 2.0)
    assert calibration_data_sha256(nudged, run.correct) != base


def test_mismatches_are_refused_by_name_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    save_calibration(path, _run(), model_ids=IDS)
    saved, overridden = load_calibration_for(path, model_ids=IDS, alpha=0.2, delta=0.1)
    assert overridden == ()
    with pytest.raises(IncompatibleStoreError, match=r"models \['sim-weak', 'sim-strong'\].*'gpt-4o-mini'"):
        load_calibration_for(path, model_ids=("gpt-4o-mini", "sim-strong"))
    with pytest.raises(IncompatibleStoreError, match="other prompts"):
        load_calibration_for(path, model_ids=IDS, fingerprint="0" * 64)
    with pytest.raises(IncompatibleStoreError, match=r"alpha 0\.2, configured 0\.1"):
        load_calibration_for(path, model_ids=IDS, alpha=0.1)
    with pytest.raises(IncompatibleStoreError, match=r"delta 0\.05 per level, configured 0\.1 per level"):
        load_calibration_for(path, model_ids=IDS, delta=0.1, split_delta=False)
    with pytest.raises(IncompatibleStoreError, match="levels are"):
        load_calibration_for(path, model_ids=IDS[:1])
    with pytest.raises(IncompatibleStoreError, match="other prompts"):
        load_calibration_for(path, model_ids=IDS, config=CascadeConfig(policy="jung"))
    forced, why = load_calibration_for(path, model_ids=("a", "b"), fingerprint="1" * 64, force=True)
    assert forced.calibrations == saved.calibrations
    assert len(why) == 2 and "models" in why[0] and "prompts" in why[1]
    assert calibration_mismatches(saved, model_ids=IDS) == ()


def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Apply ``edit`` to the parsed document and write it back with a valid checksum,
    so that only the semantic checks can catch the change."""
    doc = json.loads(path.read_text())
    edit(doc)
    body = {k: v for k, v in doc.items() if k != "checksum"}
    doc["checksum"] = cf.hashlib.sha256(cf._canonical(body)).hexdigest()
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["levels"][1]["calibration"].update(n_errors=0), "checksum|risk_bound"),
        (lambda d: d["data"]["correct"][0].__setitem__(0, 1 - d["data"]["correct"][0][0]), "data_sha256"),
        (lambda d: d.update(format_version=0), "never written"),
        (lambda d: d.update(extra=1), "unexpected"),
        (lambda d: d["levels"][0].update(model=""), "non-empty"),
        (lambda d: d["data"]["confidences"][0].__setitem__(0, 2.0), "confidences"),
    ],
)
def test_damaged_files_are_corrupt_store_errors(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cal.json"
    save_calibration(path, _run(), model_ids=IDS)
    _rewrite(path, edit)
    with pytest.raises(CorruptStoreError, match=message):
        load_calibration(path)


def test_counts_must_agree_with_the_data(tmp_path: Path) -> None:
    """A record whose counts are internally consistent (its risk bound recomputed) but are
    not the data's at its threshold is refused."""
    path = tmp_path / "cal.json"
    save_calibration(path, _run(), model_ids=IDS)

    def shift(d):  # type: ignore[no-untyped-def]
        c = d["levels"][1]["calibration"]
        c["n_errors"] -= 1
        c["risk_bound"] = float(cp_upper(c["n_errors"], c["n_accepted"], c["delta"]))

    _rewrite(path, shift)
    with pytest.raises(CorruptStoreError, match=r"levels\[1\]: \(items, accepted, errors\)"):
        load_calibration(path)


def test_a_later_format_version_is_incompatible(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    save_calibration(path, _run(), model_ids=IDS)
    _rewrite(path, lambda d: d.update(format_version=2))
    with pytest.raises(IncompatibleStoreError, match="newer"):
        load_calibration(path)


def test_files_that_are_not_calibrations(tmp_path: Path) -> None:
    cases = {
        "empty.json": b"",
        "binary.json": bytes(range(256)),
        "deep.json": b"[" * 100_000 + b"]" * 100_000,
        "huge-int.json": b'{"format": "intercascade-calibration", "format_version": 1' + b"9" * 5000 + b"}",
        "list.json": b"[1, 2]",
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(CorruptStoreError):
            load_calibration(tmp_path / name)
    with pytest.raises(CorruptStoreError, match="no such file"):
        load_calibration(tmp_path / "missing.json")
    with pytest.raises(CorruptStoreError, match=r"regular file|directory"):
        load_calibration(tmp_path)
    os.mkfifo(tmp_path / "fifo.json")  # would block a plain open()
    with pytest.raises(CorruptStoreError, match="regular file"):
        load_calibration(tmp_path / "fifo.json")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_is_refused_or_harmless(tmp_path: Path, data: st.DataObject) -> None:
    """Truncate, overwrite or insert bytes anywhere in a valid file: loading raises a
    StoreError, or (a change of layout only, e.g. whitespace) gives the same content."""
    path = tmp_path / "cal.json"
    if not path.exists():
        save_calibration(path, _run(60), model_ids=IDS)
    raw = path.read_bytes()
    original = load_calibration(path)
    pos = data.draw(st.integers(0, len(raw) - 1))
    how = data.draw(st.sampled_from(["truncate", "overwrite", "insert"]))
    junk = data.draw(st.binary(min_size=1, max_size=4))
    damaged = {"truncate": raw[:pos], "overwrite": raw[:pos] + junk + raw[pos + len(junk):],
               "insert": raw[:pos] + junk + raw[pos:]}[how]
    bad = tmp_path / "bad.json"
    bad.write_bytes(damaged)
    try:
        got = load_calibration(bad)
    except (CorruptStoreError, IncompatibleStoreError):
        return
    assert (got.calibrations, got.confidences, got.correct, got.model_ids) == (
        original.calibrations, original.confidences, original.correct, original.model_ids)


def test_save_refuses_targets_that_are_not_regular_files(tmp_path: Path) -> None:
    run = _run(50)
    os.mkfifo(tmp_path / "fifo")
    for target in (tmp_path, tmp_path / "fifo", Path(""), Path(".")):
        with pytest.raises(InvalidArgumentError):
            save_calibration(target, run, model_ids=IDS)
    assert (tmp_path / "fifo").exists() and not (tmp_path / "fifo").is_file()


# --------------------------------------------------------------------------- the command line


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _config(tmp_path: Path) -> Path:
    text = (EXAMPLES / "config.toml").read_text()
    text = text.replace("templates = 8 ", "templates = 3 ").replace("variants = 20 ", "variants = 4 ")
    text = text.replace("calibration_variants = 40", "calibration_variants = 60")
    text = text.replace('kind = "minilm"', 'kind = "hashing"')
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_calibrate_save_writes_what_it_prints(tmp_path: Path) -> None:
    code, out, _ = _cli("calibrate", "--example", "--json", "--save", str(tmp_path / "c.json"),
                        "--model", "sim-weak", "--model", "sim-strong", "-q")
    assert code == 0
    printed = json.loads(out)
    saved = load_calibration(tmp_path / "c.json")
    assert saved.model_ids == IDS and saved.level_names == ("weak", "strong")
    for lv, cal in zip(printed["levels"], saved.calibrations, strict=True):
        assert {k: v for k, v in lv.items() if k != "level"} == cal.summary()
    code, _, err = _cli("calibrate", "--example", "--save", str(tmp_path / "d.json"), "--model", "x")
    assert code == 2 and "--model given 1 times" in _one_line(err)
    code, _, err = _cli("calibrate", "--example", "--save", str(tmp_path))
    assert code == 2 and "directory" in _one_line(err)
    code, _, err = _cli("calibrate", "--example", "--model", "x")
    assert code == 2 and "--save" in _one_line(err)


def test_run_reuses_a_saved_calibration_and_refuses_a_mismatch(tmp_path: Path, jung_fallback_copy: Any) -> None:
    cfg = _config(tmp_path)
    cal = tmp_path / "cal.json"
    code, first, _ = _cli("run", "--config", str(cfg), "--limit", "6", "--save-calibration", str(cal), "-q")
    assert code == 0 and first.startswith("retrieval: 6 queries")
    saved = load_calibration(cal)
    assert saved.model_ids == IDS and saved.level_names == ("weak", "strong")
    assert len(saved.confidences[0]) == 180  # 3 templates x 60 calibration variants
    code, again, err = _cli("run", "--config", str(cfg), "--limit", "6", "--calibration", str(cal))
    assert code == 0 and again == first  # the same thresholds, the same run
    assert "not recalibrating" in err and "calibrating on" not in err
    assert "not certified" not in err  # every level of this file is certified

    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text().replace('model = "sim-strong"', 'model = "sim-mid"'))
    code, _, err = _cli("run", "--config", str(other), "--calibration", str(cal), "--limit", "2", "-q")
    line = _one_line(err)
    assert code == 2 and "sim-strong" in line and "sim-mid" in line and "--force" in line
    code, _, err = _cli("run", "--config", str(other), "--calibration", str(cal), "--limit", "2", "--force", "-q")
    assert code == 0 and "warning:" in err and "sim-mid" in err and "(used anyway: --force)" in err

    strict = tmp_path / "strict.toml"
    strict.write_text(cfg.read_text().replace("alpha = 0.2 ", "alpha = 0.1 "))
    code, _, err = _cli("run", "--config", str(strict), "--calibration", str(cal), "--limit", "2", "-q")
    assert code == 2 and "alpha 0.2, configured 0.1" in _one_line(err)

    damaged = tmp_path / "damaged.json"
    damaged.write_bytes(cal.read_bytes()[:-40])
    for bad in (damaged, tmp_path / "missing.json", tmp_path):
        code, _, err = _cli("run", "--config", str(cfg), "--calibration", str(bad), "--limit", "2", "-q")
        assert code == 2 and str(bad) in _one_line(err)
    code, _, err = _cli("run", "--config", str(cfg), "--force", "-q")
    assert code == 2 and "--calibration" in _one_line(err)

    # a file holding Jung's fallback is used, and the run says its answers are not certified
    fallback = tmp_path / "fallback.json"
    jung_fallback_copy(cal, fallback)
    code, _, err = _cli("run", "--config", str(cfg), "--calibration", str(fallback), "--limit", "2", "-q")
    assert code == 0 and f"warning: {fallback}: not certified (on_fail='jung'): level weak: first test" in err

    # a Jung cascade calibrates its strong level on another prompt than a single-call one
    jung = tmp_path / "jung.json"
    code, _, _ = _cli("run", "--config", str(cfg), "--policy", "jung", "--limit", "2", "--save-calibration",
                      str(jung), "-q")
    assert code == 0
    code, _, err = _cli("run", "--config", str(cfg), "--calibration", str(jung), "--limit", "2", "-q")
    assert code == 2 and "other prompts" in _one_line(err)
    code, _, _ = _cli("run", "--config", str(cfg), "--policy", "jung", "--calibration", str(jung), "--limit", "2",
                      "-q")
    assert code == 0


def test_eval_with_a_saved_calibration_reports_the_same(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cal = tmp_path / "cal.json"
    code, _, _ = _cli("eval", "--config", str(cfg), "--out", str(tmp_path / "a"), "--no-plots",
                      "--limit", "8", "--save-calibration", str(cal), "-q")
    assert code == 0
    code, _, _ = _cli("eval", "--config", str(cfg), "--out", str(tmp_path / "b"), "--no-plots",
                      "--limit", "8", "--calibration", str(cal), "-q")
    assert code == 0
    a, b = (json.loads((tmp_path / x / "results.json").read_text()) for x in ("a", "b"))
    assert a["calibration"] == b["calibration"] and a["variants"] == b["variants"]
