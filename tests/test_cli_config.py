"""The TOML config: the shipped example parses; every bad value is a ConfigError naming its key;
every number, string, list and the file itself has an upper bound. No test here is statistical."""

from __future__ import annotations

import math
import os
import time
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.errors import ConfigError
from intercascade_core.lab.config import LIMITS, MAX_CONFIG_BYTES, load_config, parse_config

EXAMPLE = Path(__file__).parents[1] / "intercascade_core" / "data" / "examples" / "config.toml"

_MODELS = """
[[models]]
name = "weak"
base_url = "http://localhost:8080/v1"
model = "small"

[[models]]
name = "strong"
base_url = "https://api.openai.com/v1"
model = "gpt-4o"
api_key_env = "OPENAI_API_KEY"
price_input = 2.5
price_output = 10
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_example_config_parses() -> None:
    cfg = load_config(EXAMPLE)
    assert [m.name for m in cfg.models] == ["weak", "strong"]
    assert all(m.simulated for m in cfg.models)
    assert cfg.cascade.k == 2 and cfg.cascade.policy == "retrieval"
    assert cfg.data.dataset == "gsm_symbolic"
    assert cfg.cascade.insitu is False  # `eval --insitu` turns it on


def test_embedder_precision(tmp_path: Path) -> None:
    """Unset (or ""): MiniLM's own default, fp32; "int8" opens stores written with int8."""
    assert load_config(_write(tmp_path, _MODELS)).embedder.precision == ""
    assert load_config(EXAMPLE).embedder.precision == ""
    for value in ("fp32", "int8"):
        text = f'[embedder]\nkind = "minilm"\nprecision = "{value}"\n' + _MODELS
        assert load_config(_write(tmp_path, text)).embedder.precision == value


def test_embedder_precisions_are_the_embedders() -> None:
    """The config's choices (kept free of the embedder's imports) are MiniLMEmbedder's."""
    from intercascade_core.lab.config import PRECISIONS
    from intercascade_core.models import minilm

    assert PRECISIONS == minilm._PRECISIONS


def test_insitu_key(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "[cascade]\ninsitu = true\n" + _MODELS)).cascade.insitu is True
    assert load_config(_write(tmp_path, _MODELS)).cascade.insitu is False


def test_minimal_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, '[cascade]\nrepository = "repo"\n[data]\ndataset = "gsm8k"\npath = "d.jsonl"\n' + _MODELS))
    assert cfg.cascade.alpha == 0.2 and cfg.cascade.delta == 0.1
    assert cfg.cascade.repository == str(tmp_path / "repo")
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert cfg.models[1].price_input == 2.5 and cfg.models[1].price_output == 10.0
    assert cfg.models[1].api_key_env == "OPENAI_API_KEY"
    assert not cfg.models[0].simulated


def test_template_ids_rounds_and_response_cache(tmp_path: Path) -> None:
    text = ("[cascade]\ninsitu_rounds = 2\n[data]\ntemplates = [26, 58]\n"
            + _MODELS.replace('model = "small"', 'model = "small"\nresponse_cache = "cache/weak.jsonl"'))
    cfg = load_config(_write(tmp_path, text))
    assert cfg.data.templates == (26, 58)
    assert cfg.cascade.insitu_rounds == 2
    assert cfg.models[0].response_cache == str(tmp_path / "cache" / "weak.jsonl")
    assert cfg.models[1].response_cache == ""
    assert load_config(_write(tmp_path, _MODELS)).data.templates == 10


def test_the_local_llm_experiment_config_parses() -> None:
    cfg = load_config(Path(__file__).parents[1] / "bench" / "local_llm" / "config.toml")
    assert cfg.cascade.insitu and [m.name for m in cfg.models] == ["weak", "strong"]
    assert all(m.response_cache and not m.simulated for m in cfg.models)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[cascade]\nalpha = 1.5\n" + _MODELS, "cascade.alpha"),
        ("[cascade]\ndelta = 0\n" + _MODELS, "cascade.delta"),
        ('[cascade]\nalpha = "0.1"\n' + _MODELS, "cascade.alpha"),
        ("[cascade]\nk = -1\n" + _MODELS, "cascade.k"),
        ('[cascade]\npolicy = "smart"\n' + _MODELS, "cascade.policy"),
        ('[cascade]\nbackend = "faiss"\n' + _MODELS, "cascade.backend"),
        ('[cascade]\ninsitu = "yes"\n' + _MODELS, "cascade.insitu"),
        ("[cascade]\nalhpa = 0.1\n" + _MODELS, "cascade.alhpa"),
        ('[data]\ndataset = "gsm8k"\n' + _MODELS, "data.path"),
        ('[data]\norder = "random"\n' + _MODELS, "data.order"),
        ("[data]\nvariants = true\n" + _MODELS, "data.variants"),
        ("[data]\ntemplates = []\n" + _MODELS, "data.templates"),
        ('[data]\ntemplates = [1, "2"]\n' + _MODELS, "data.templates"),
        ("[data]\ntemplates = 0\n" + _MODELS, "data.templates"),
        ("[cascade]\ninsitu_rounds = 0\n" + _MODELS, "cascade.insitu_rounds"),
        (_MODELS + "response_cache = 3\n", "models[1].response_cache"),
        ('[embedder]\nkind = "bert"\n' + _MODELS, "embedder.kind"),
        ('[embedder]\nprecision = "fp16"\n' + _MODELS, "embedder.precision"),
        ('[embedder]\nprecision = 8\n' + _MODELS, "embedder.precision"),
        ('[embedder]\nprecision = "int8"\nmodel_path = "m.onnx"\n' + _MODELS, "embedder.precision"),
        ("", "models"),
        ('[[models]]\nbase_url = "http://x/v1"\nmodel = "m"\n', "models"),
        (_MODELS.replace('base_url = "http://localhost:8080/v1"', 'base_url = "localhost:8080"'), "models[0].base_url"),
        (_MODELS.replace('model = "small"', ""), "models[0].model"),
        (_MODELS.replace("price_output = 10", ""), "models[1].price_output"),
        (_MODELS.replace('name = "strong"', 'name = "weak"'), "models[1].name"),
        (_MODELS + "temperature = -1\n", "models[1].temperature"),
        (_MODELS + 'colour = "blue"\n', "models[1].colour"),
        ("seed = 1\n" + _MODELS, "seed"),
        ("[cascade\n", "<toml>"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: ") and "\n" not in msg.strip()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


# ----------------------------------------------------------------------------- limits
# Every numeric key has an upper bound (LIMITS), every string a length bound, the file a
# size bound; beyond one the error names the key and the bound, at once.

_TABLE_OF = {"cascade": "[cascade]\n", "data": "[data]\n"}


def _with(key: str, value: str) -> str:
    """A config with ``key`` (dotted, ``models[]`` = the second model) set to ``value``."""
    table, name = key.split(".")
    if table == "models[]":
        base = _MODELS.replace("price_input = 2.5\nprice_output = 10\n", "")
        partner = {"price_input": "price_output = 1\n", "price_output": "price_input = 1\n"}
        return base + f"{name} = {value}\n" + partner.get(name, "")
    return _TABLE_OF[table] + f"{name} = {value}\n" + _MODELS


def _error_key(key: str) -> str:
    return key.replace("models[]", "models[1]")


@pytest.mark.parametrize("key", sorted(LIMITS))
def test_one_past_every_upper_bound_is_refused_naming_key_and_bound(tmp_path: Path, key: str) -> None:
    bound = LIMITS[key]
    over = str(int(bound) + 1) if isinstance(bound, int) else repr(bound * 1.0001 + 1e-9)
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _with(key, over)))
    assert info.value.key == _error_key(key)
    assert f"{bound:g}" in str(info.value) or str(bound) in str(info.value)
    at_bound = str(int(bound)) if isinstance(bound, int) else repr(float(bound))
    if key not in ("data.templates", "data.variants", "data.calibration_variants"):
        load_config(_write(tmp_path, _with(key, at_bound)))  # the bound itself is allowed


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[data]\nvariants = 100000000000\n" + _MODELS, "data.variants", "[1, 10000]"),
        ("[data]\nvariants = " + "9" * 400 + "\n" + _MODELS, "data.variants", "400 digits"),
        ("[data]\ntemplates = 200\nvariants = 5000\n" + _MODELS, "data.variants", "1000000"),
        ("[data]\ntemplates = [" + ", ".join(["1"] * 10_001) + "]\n" + _MODELS, "<toml>", "line 2"),
        ("[data]\ntemplates = [\n" + "1,\n" * 10_001 + "]\n" + _MODELS, "data.templates", "at most 10000"),
        ("[data]\ntemplates = [1, 10001]\n" + _MODELS, "data.templates", "[0, 10000]"),
        (_MODELS + "timeout = inf\n", "models[1].timeout", "3600"),
        (_MODELS + "temperature = nan\n", "models[1].temperature", "nan"),
        (_MODELS.replace('name = "strong"', 'name = "' + "n" * 257 + '"'), "models[1].name", "at most 256"),
        (_MODELS.replace('"OPENAI_API_KEY"', '"KEY\\u0000"'), "models[1].api_key_env", "U+0000"),
        (_MODELS + 'response_cache = "' + "p" * 1025 + '"\n', "models[1].response_cache", "at most 1024"),
        (_MODELS.replace("http://localhost:8080/v1", "http://h/" + "u" * 2048), "models[0].base_url", "at most 2048"),
        ('[cascade]\nrepository = "a\\nb"\n' + _MODELS, "cascade.repository", "U+000A"),
        (_MODELS * 9, "models", "at most 16"),
        ("x = " + "[\n" * 5000 + "]\n" * 5000 + _MODELS, "<toml>", "nested too deeply"),
        ("a" + ".a" * 600 + " = 1\n" + _MODELS, "<toml>", "at most 512"),
        ("x = 1" + " " * 5000 + "\n" + _MODELS, "<toml>", "at most 4096"),
    ],
)
def test_hostile_sizes_are_one_line_errors(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = _write(tmp_path, text)
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.monotonic() - start < 5  # refused, not run until memory is gone
    assert info.value.key == key and words in str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < len(str(path)) + 200


def test_the_file_itself_is_bounded(tmp_path: Path) -> None:
    big = _write(tmp_path, _MODELS + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="bytes"):
        load_config(big)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):  # would block on open
        load_config(fifo)
    if Path("/dev/zero").exists():
        with pytest.raises(ConfigError, match="not a regular file"):  # would read forever
            load_config("/dev/zero")
    with pytest.raises(ConfigError, match="not a usable path"):
        load_config("c\x00.toml")
    bom = _write(tmp_path, "\ufeff" + _MODELS)
    assert len(load_config(bom).models) == 2


_numbers = (
    st.integers(min_value=-(2**70), max_value=2**70).map(str)
    | st.floats(allow_nan=True, allow_infinity=True).map(repr)
    | st.sampled_from(["1e11", "-0", "0x7fffffffffffffff", "9" * 300, "true", '"1"', "[]", "{}"])
)


@settings(max_examples=300)
@given(key=st.sampled_from(sorted(LIMITS)), value=_numbers)
def test_any_number_in_any_key_is_in_bounds_or_a_config_error(key: str, value: str) -> None:
    """Hostile numbers (huge, negative, non-finite, wrong type) in every numeric key: the
    value is accepted only within its documented bound; otherwise a ConfigError names
    the key. No other exception escapes."""
    text = _with(key, value)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # not TOML at all (e.g. Python's "nan" spelling): the parser's error, tested above
    try:
        cfg = parse_config(doc, source="c.toml")
    except ConfigError as e:
        assert e.key in (_error_key(key), "data.variants"), e
        return
    table, name = key.split(".")
    section = cfg.models[1] if table == "models[]" else getattr(cfg, table)
    got = getattr(section, name)
    count = got if isinstance(got, int | float) else len(got)
    assert math.isfinite(count) and count <= LIMITS[key]


@settings(max_examples=200)
@given(
    key=st.sampled_from(["name", "model", "api_key_env", "base_url", "response_cache"]),
    value=st.text(max_size=3000),
)
def test_any_string_is_bounded_and_printable_or_a_config_error(key: str, value: str) -> None:
    table = [{"base_url": "sim:weak", "model": "sim-weak"}, {"base_url": "sim:strong", "model": "sim-strong"}]
    table[1][key] = value if key != "base_url" else "http://h/" + value
    try:
        cfg = parse_config({"models": table}, source="c.toml")
    except ConfigError as e:
        assert e.key == f"models[1].{key}" and len(str(e)) < 300
        return
    got = getattr(cfg.models[1], key)
    assert len(got) <= 2048 and not any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in value)
