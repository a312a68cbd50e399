"""The TOML config: the shipped example parses; every bad value is a ConfigError naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from intercascade_core.errors import ConfigError
from intercascade_core.lab.config import load_config

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
