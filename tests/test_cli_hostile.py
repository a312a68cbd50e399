"""Hostile command lines and files: every failure is exit 1 or 2 with exactly one line
on stderr and no traceback.

``cli.main`` runs in-process over hypothesis-drawn argument values and file contents
(huge integers, deep nesting, over-long CSV fields, byte-order marks, binary junk, NUL
and newline characters, directories and FIFOs where files are expected). The cases
found by hand are pinned as plain tests below the fuzz tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.cli import main

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "intercascade_core" / "data" / "examples"


def run_main(*args: str) -> tuple[int, str, str]:
    """``main(args)`` with stdout and stderr captured; argparse's SystemExit is a code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, err: str, *, allow_ok: bool = True) -> None:
    assert "Traceback" not in err, err
    if code == 0 and allow_ok:
        assert err == "", err  # -q: nothing on stderr when it works
        return
    assert code in (1, 2), (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("intercascade"), err


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A fresh folder, also the working directory (a drawn relative path lands here)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            yield Path(d)
        finally:
            os.chdir(old)


# --------------------------------------------------------------------------- hostile content

digits = st.integers(1, 6000).map(lambda n: "9" * n)
depth = st.integers(1, 3000)


@st.composite
def json_text(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["number", "nest", "object", "junk", "big-float"]))
    if kind == "number":
        return f'{{"confidence": {draw(digits)}, "correct": {draw(digits)}}}'
    if kind == "big-float":
        return f'{{"confidence": 1e{draw(st.integers(300, 99999))}, "correct": 1}}'
    if kind == "nest":
        n = draw(depth)
        return '{"confidence": ' + "[" * n + "]" * n + ', "correct": 1}'
    if kind == "object":
        value = draw(st.recursive(
            st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=10), kids, max_size=3),
            max_leaves=10,
        ))
        return '{"confidence": ' + repr(value).replace("'", '"') + ', "correct": 1}'
    return draw(st.text(max_size=200))


@st.composite
def csv_text(draw: st.DrawFn) -> str:
    header = draw(st.sampled_from(["confidence,correct", "weak_confidence,weak_correct", "a,b,c", ""]))
    field = draw(st.one_of(
        st.integers(1, 300_000).map(lambda n: "0." + "5" * n),  # past the csv module's field limit
        digits,
        st.text(max_size=30),
        st.just('"unterminated'),
        st.just("0.5"),
    ))
    label = draw(st.sampled_from(["1", "0", "maybe", "9" * 5000]))
    return header + "\n" + f"{field},{label}\n" * draw(st.integers(1, 40))


@st.composite
def confidence_file(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".csv", ".jsonl", ".json"]))
    if draw(st.booleans()):
        body = draw(csv_text()) if suffix == ".csv" else "\n".join(draw(st.lists(json_text(), min_size=1, max_size=3)))
        raw = body.encode("utf-8", "surrogatepass")
    else:
        raw = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw  # a UTF-8 byte-order mark
    return suffix, raw


hostile_arg = st.one_of(
    st.text(max_size=40),
    digits,
    st.sampled_from(["", "-1", "0", "nan", "inf", "1e999", "1000000000", "unique", "\x00", "a\nb", "--", "-q"]),
)


# --------------------------------------------------------------------------- the fuzz tests


@settings(max_examples=120, deadline=None)
@given(file=confidence_file(), grid=st.sampled_from(["5000", "unique", "2"]))
def test_calibrate_on_hostile_files(file: tuple[str, bytes], grid: str) -> None:
    suffix, raw = file
    with workdir() as d:
        path = d / f"conf{suffix}"
        path.write_bytes(raw)
        code, _, err = run_main("calibrate", str(path), "--grid", grid, "-q")
    assert_clean(code, err)


@settings(max_examples=120, deadline=None)
@given(option=st.sampled_from(["--grid", "--alpha", "--delta", "--min-n", "--on-fail", "--model"]),
       value=hostile_arg)
def test_calibrate_with_hostile_option_values(option: str, value: str) -> None:
    with workdir() as d:
        args = ["calibrate", "--example", option, value, "-q"]
        if option == "--model":
            args += ["--save", str(d / "c.json")]
        code, _, err = run_main(*args)
    assert_clean(code, err)


@settings(max_examples=100, deadline=None)
@given(
    layout=st.sampled_from(["manifest", "current", "levels", "empty"]),
    content=st.one_of(st.binary(max_size=200), json_text().map(str.encode), st.just(b"snap-x\n")),
    out=st.one_of(hostile_arg, st.sampled_from([".", "", "outdir", "fifo", "ok.jsonl"])),
    level=st.one_of(st.none(), hostile_arg),
)
def test_export_with_hostile_stores_and_targets(layout: str, content: bytes, out: str, level: str | None) -> None:
    with workdir() as d:
        repo = d / "store"
        repo.mkdir()
        if layout == "manifest":
            (repo / "manifest.json").write_bytes(content)
        elif layout == "current":
            (repo / "CURRENT").write_bytes(content)
            (repo / "journal.log").write_bytes(content)
        elif layout == "levels":
            (repo / "level0").mkdir()
            (repo / "level0" / "CURRENT").write_bytes(content)
        (d / "outdir").mkdir()
        os.mkfifo(d / "fifo")
        args = ["export", "--repository", str(repo), "--out", out, "-q"]
        if level is not None:
            args += ["--level", level]
        code, _, err = run_main(*args)
        assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    assert_clean(code, err, allow_ok=False)


def _config(folder: Path) -> Path:
    text = (EXAMPLES / "config.toml").read_text().replace('kind = "minilm"', 'kind = "hashing"')
    path = folder / "config.toml"
    path.write_text(text)
    return path


@settings(max_examples=100, deadline=None)
@given(raw=st.one_of(st.binary(max_size=300), json_text().map(str.encode)),
       bom=st.booleans(), command=st.sampled_from(["run", "eval"]))
def test_run_and_eval_with_hostile_calibration_files(raw: bytes, bom: bool, command: str) -> None:
    with workdir() as d:
        cal = d / "cal.json"
        cal.write_bytes((b"\xef\xbb\xbf" if bom else b"") + raw)
        args = [command, "--config", str(_config(d)), "--calibration", str(cal), "-q"]
        if command == "eval":
            args += ["--out", str(d / "rep")]
        code, _, err = run_main(*args)
    assert code == 2
    assert_clean(code, err)


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(max_size=200).map(lambda b: b + b"\xff\xfe"), kind=st.sampled_from(["file", "dir", "fifo"]))
def test_demo_readme_is_checked_before_the_run(raw: bytes, kind: str) -> None:
    with workdir() as d:
        readme = d / "README.md"
        if kind == "file":
            readme.write_bytes(raw)  # never UTF-8: ends in 0xFF 0xFE
        elif kind == "dir":
            readme.mkdir()
        else:
            os.mkfifo(readme)
        code, _, err = run_main("demo", "--embedder", "hashing", "--readme", str(readme), "--out", str(d / "o"), "-q")
        assert not (d / "o").exists()  # refused before anything ran
    assert code == 2
    assert_clean(code, err)


# --------------------------------------------------------------------------- pinned cases


@pytest.mark.parametrize(
    ("suffix", "raw", "expect"),
    [
        (".jsonl", b'{"confidence": ' + b"9" * 5000 + b', "correct": 1}\n', "number literal"),
        (".jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested"),
        (".json", b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]", "nested"),
        (".csv", b"confidence,correct\n0." + b"5" * 200_000 + b",1\n", "field larger than field limit"),
        (".jsonl", b'{"confidence": 1e999, "correct": 1}\n', "float range"),
        (".csv", bytes(range(256)), "not UTF-8"),
    ],
)
def test_hostile_confidence_files_are_one_line_errors(tmp_path: Path, suffix: str, raw: bytes, expect: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_bytes(raw)
    code, _, err = run_main("calibrate", str(path), "-q")
    assert code == 2 and expect in err
    assert_clean(code, err)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_byte_order_mark_is_skipped(tmp_path: Path, suffix: str) -> None:
    plain = (EXAMPLES / "confidences.csv").read_text()
    if suffix == ".jsonl":
        rows = [ln.split(",") for ln in plain.splitlines()]
        plain = "".join(
            "{" + ", ".join(f'"{k}": {v}' for k, v in zip(rows[0], r, strict=True)) + "}\n" for r in rows[1:]
        )
    (tmp_path / f"a{suffix}").write_text(plain, encoding="utf-8")
    (tmp_path / f"b{suffix}").write_text(plain, encoding="utf-8-sig")
    a = run_main("calibrate", str(tmp_path / f"a{suffix}"), "--json", "-q")
    b = run_main("calibrate", str(tmp_path / f"b{suffix}"), "--json", "-q")
    assert a[0] == b[0] == 0
    assert a[1].replace(f"a{suffix}", "X") == b[1].replace(f"b{suffix}", "X")


def test_a_grid_too_large_to_allocate_is_a_usage_error() -> None:
    code, _, err = run_main("calibrate", "--example", "--grid", "1000000000", "-q")
    assert code == 2 and "--grid needs 2 to 1000000 points" in err
    assert_clean(code, err)


@pytest.mark.parametrize("out", [".", "", "DIR", "FIFO"])
def test_export_out_must_be_a_regular_file(tmp_path: Path, out: str) -> None:
    from intercascade_core import Entry, empty_repository, update
    from intercascade_core.storage.store import save
    from tests.strategies import random_unit

    vec = random_unit(np.random.default_rng(0), 1, 8)
    save(tmp_path / "repo", update(empty_repository(8), [Entry("q", "a", "a strategy")], vec), model_id="m")
    (tmp_path / "DIR").mkdir()
    os.mkfifo(tmp_path / "FIFO")
    target = str(tmp_path / out) if out in ("DIR", "FIFO") else out
    code, _, err = run_main("export", "--repository", str(tmp_path / "repo"), "--out", target, "-q")
    assert code == 2
    assert_clean(code, err)
    assert stat.S_ISFIFO(os.stat(tmp_path / "FIFO").st_mode) and (tmp_path / "DIR").is_dir()


def _endpoint_config(tmp_path: Path, base_url: str, key_env: str = "") -> Path:
    text = _config(tmp_path).read_text()
    extra = f'\napi_key_env = "{key_env}"' if key_env else ""
    text = text.replace('base_url = "sim:weak"', f'base_url = "{base_url}"\nmax_retries = 0\ntimeout = 2{extra}')
    path = tmp_path / "endpoint.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:9/v1\\u0000", "http://:99999/v1",
                                 "http://127.0.0.1:70000/v1"])
def test_a_malformed_base_url_is_a_usage_error(tmp_path: Path, url: str) -> None:
    code, _, err = run_main("run", "--config", str(_endpoint_config(tmp_path, url)), "-q")
    assert code == 2 and "models[0].base_url" in err
    assert_clean(code, err)


@pytest.mark.parametrize("key", ["sk-clé-secrète", "sk-abc\x01def", "sk-abc\ndef"])
def test_a_key_that_cannot_be_a_header_is_named_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("INTERCASCADE_TEST_ODD_KEY", key)
    cfg = _endpoint_config(tmp_path, "http://127.0.0.1:9/v1", "INTERCASCADE_TEST_ODD_KEY")
    code, out, err = run_main("run", "--config", str(cfg), "-q")
    assert code == 2 and "INTERCASCADE_TEST_ODD_KEY" in err and "sk-" not in err + out
    assert_clean(code, err)


def test_argument_errors_are_one_line_even_with_newlines() -> None:
    code, _, err = run_main("calibrate", "--example", "--no-such\nflag", "-q")
    assert code == 2 and "no-such flag" in err
    assert_clean(code, err)
    code, _, err = run_main("calibrate", "a\x00b", "-q")
    assert code == 2 and "expected a path" in err
    assert_clean(code, err)
