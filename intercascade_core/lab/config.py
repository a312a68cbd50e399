"""The TOML configuration of ``intercascade run`` and ``intercascade eval``.

Parsed with the standard library's :mod:`tomllib` into frozen records. Every problem —
a missing required key, a wrong type, a value out of range, an unknown (misspelt) key —
raises :class:`ConfigError`, a one-line message that names the file and the dotted key
(``models[1].base_url``). Nothing is silently defaulted except the documented defaults
below. An annotated example ships as ``intercascade_core/data/examples/config.toml``.

Layout::

    [cascade]            alpha, delta, k, policy, backend, repository, seed, min_n, split_delta,
                         insitu
    [data]               dataset, path, calibration_path, n_calibration, limit, order,
                         templates, variants, calibration_variants, seed
    [embedder]           kind ("minilm" | "hashing"), model_path, tokenizer_path
    [[models]]           weakest first, at least two: name, base_url, model, api_key_env,
                         price_input, price_output (USD per 1M tokens), max_tokens,
                         temperature, timeout, max_retries, confidence_span

A model whose ``base_url`` is ``sim:weak``/``sim:strong``/... is served in-process by the
deterministic simulator (no network, no key).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import ConfigError

__all__ = [
    "BACKENDS",
    "POLICIES",
    "CascadeConfig",
    "Config",
    "DataConfig",
    "EmbedderConfig",
    "ModelConfig",
    "load_config",
    "parse_config",
]

POLICIES: Final = ("jung", "random", "retrieval")
BACKENDS: Final = ("exact", "numpy", "hnsw")
DATASET_NAMES: Final = ("gsm_symbolic", "gsm8k", "gsm_plus", "metamath", "nasa_history")
ORDERS: Final = ("shuffled", "as-is", "grouped")
EMBEDDERS: Final = ("minilm", "hashing")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One endpoint of the cascade. ``api_key_env`` names the environment variable that
    holds the key (empty: no key); prices are USD per 1M tokens (None: built-in table)."""

    name: str
    base_url: str
    model: str
    api_key_env: str = ""
    price_input: float | None = None
    price_output: float | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    timeout: float = 60.0
    max_retries: int = 6
    confidence_span: str = "all"
    #: JSON-lines file memoising this model's temperature-0 replies ("" = none); see
    #: :mod:`intercascade_core.models.response_cache`.
    response_cache: str = ""

    @property
    def simulated(self) -> bool:
        """Whether the model is the in-process simulator (``base_url = "sim:<level>"``)."""
        return self.base_url.startswith("sim:")


@dataclass(frozen=True, slots=True)
class CascadeConfig:
    alpha: float = 0.2
    delta: float = 0.1
    k: int = 2
    policy: str = "retrieval"
    backend: str = "numpy"
    repository: str = ""
    seed: int = 0
    min_n: int = 30
    split_delta: bool = True
    #: ``eval``: also run Retrieval with in-situ calibrated thresholds (``eval --insitu``).
    insitu: bool = False
    #: ``eval``: at most this many replays of the calibration split for in-situ calibration
    insitu_rounds: int = 4


@dataclass(frozen=True, slots=True)
class DataConfig:
    dataset: str = "gsm_symbolic"
    path: str = ""
    calibration_path: str = ""
    n_calibration: int = 200
    limit: int = 0
    order: str = "shuffled"
    #: a count (a seeded sample of the usable templates) or explicit template ids
    templates: int | tuple[int, ...] = 10
    variants: int = 20
    calibration_variants: int = 20
    seed: int = 0


@dataclass(frozen=True, slots=True)
class EmbedderConfig:
    """``model_path`` / ``tokenizer_path``: an ONNX MiniLM file and its tokenizer.json
    (empty: the bundled defaults)."""

    kind: str = "minilm"
    model_path: str = ""
    tokenizer_path: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    models: tuple[ModelConfig, ...]
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    source: str = "<config>"


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file. Relative paths inside it resolve against
    the file's folder."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(p), "<file>", "no such file") from None
    except OSError as exc:
        raise ConfigError(str(p), "<file>", f"cannot read: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(p), "<file>", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), "<toml>", str(exc)) from None
    return parse_config(doc, source=str(p), base_dir=p.parent)


class _Reader:
    """Typed access to one table, recording which keys were read."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any]) -> None:
        self.source, self.prefix, self.table = source, prefix, table
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), message)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any, *, required: bool = False) -> Any:
        self.seen.add(name)
        if name not in self.table:
            if required:
                raise self.error(name, "missing (required)")
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {_kind_name(kinds)}, got {type(value).__name__} {value!r}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(name, str, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value

    def number(self, name: str, default: float | None, *, low: float, high: float = math.inf,
               open_low: bool = False, open_high: bool = False, required: bool = False) -> Any:
        value = self.get(name, float, default, required=required)
        if value is None:
            return None
        bad_low = value <= low if open_low else value < low
        bad_high = value >= high if open_high else value > high
        if math.isnan(value) or bad_low or bad_high:
            lo = "(" if open_low else "["
            hi = ")" if open_high else "]"
            raise self.error(name, f"must lie in {lo}{low:g}, {high:g}{hi}; got {value!r}")
        return value

    def integer(self, name: str, default: int, *, low: int) -> int:
        value: int = self.get(name, int, default)
        if value < low:
            raise self.error(name, f"must be an integer >= {low}; got {value!r}")
        return value

    def finish(self) -> None:
        extra = sorted(set(self.table) - self.seen)
        if extra:
            raise self.error(extra[0], "unknown key (check the spelling; see the example config)")


def _templates(d: _Reader) -> int | tuple[int, ...]:
    value = d.get("templates", (int, list), 10)
    if isinstance(value, int):
        return d.integer("templates", 10, low=1)
    if not value or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise d.error("templates", f"expected a count or a non-empty list of template ids; got {value!r}")
    return tuple(value)


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             dict: "a table", list: "an array"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _path(value: str, base_dir: Path | None) -> str:
    if not value or base_dir is None:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base_dir / p)


def parse_config(doc: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate an already-parsed TOML document (see the module docstring for keys)."""
    top = _Reader(source, "", doc)

    cas_t = top.get("cascade", dict, {})
    c = _Reader(source, "cascade", cas_t)
    cascade = CascadeConfig(
        alpha=c.number("alpha", 0.2, low=0.0, high=1.0, open_low=True, open_high=True),
        delta=c.number("delta", 0.1, low=0.0, high=1.0, open_low=True, open_high=True),
        k=c.integer("k", 2, low=0),
        policy=c.choice("policy", POLICIES, "retrieval"),
        backend=c.choice("backend", BACKENDS, "numpy"),
        repository=_path(c.get("repository", str, ""), base_dir),
        seed=c.integer("seed", 0, low=0),
        min_n=c.integer("min_n", 30, low=1),
        split_delta=c.get("split_delta", bool, True),
        insitu=c.get("insitu", bool, False),
        insitu_rounds=c.integer("insitu_rounds", 4, low=1),
    )
    c.finish()

    data_t = top.get("data", dict, {})
    d = _Reader(source, "data", data_t)
    data = DataConfig(
        dataset=d.choice("dataset", DATASET_NAMES, "gsm_symbolic"),
        path=_path(d.get("path", str, ""), base_dir),
        calibration_path=_path(d.get("calibration_path", str, ""), base_dir),
        n_calibration=d.integer("n_calibration", 200, low=0),
        limit=d.integer("limit", 0, low=0),
        order=d.choice("order", ORDERS, "shuffled"),
        templates=_templates(d),
        variants=d.integer("variants", 20, low=1),
        calibration_variants=d.integer("calibration_variants", 20, low=1),
        seed=d.integer("seed", 0, low=0),
    )
    d.finish()
    if data.dataset != "gsm_symbolic" and not data.path:
        raise ConfigError(source, "data.path", f"required for dataset {data.dataset!r}")

    emb_t = top.get("embedder", dict, {})
    e = _Reader(source, "embedder", emb_t)
    embedder = EmbedderConfig(
        kind=e.choice("kind", EMBEDDERS, "minilm"),
        model_path=_path(e.get("model_path", str, ""), base_dir),
        tokenizer_path=_path(e.get("tokenizer_path", str, ""), base_dir),
    )
    e.finish()

    models_t = top.get("models", list, None, required=True)
    if len(models_t) < 2:
        raise ConfigError(source, "models", f"needs at least two [[models]] (weakest first); got {len(models_t)}")
    models = []
    names: set[str] = set()
    for i, mt in enumerate(models_t):
        if not isinstance(mt, dict):
            raise ConfigError(source, f"models[{i}]", "expected a table ([[models]])")
        m = _Reader(source, f"models[{i}]", mt)
        base_url = m.get("base_url", str, None, required=True)
        if not base_url.startswith(("http://", "https://", "sim:")):
            raise m.error("base_url", f"expected an http(s) URL or sim:<level>; got {base_url!r}")
        mc = ModelConfig(
            name=m.get("name", str, f"level{i}") or f"level{i}",
            base_url=base_url,
            model=m.get("model", str, None, required=True),
            api_key_env=m.get("api_key_env", str, ""),
            price_input=m.number("price_input", None, low=0.0),
            price_output=m.number("price_output", None, low=0.0),
            max_tokens=m.integer("max_tokens", 512, low=1),
            temperature=m.number("temperature", 0.0, low=0.0, high=2.0),
            timeout=m.number("timeout", 60.0, low=0.0, open_low=True),
            max_retries=m.integer("max_retries", 6, low=0),
            confidence_span=m.choice("confidence_span", ("all", "answer"), "all"),
            response_cache=_path(m.get("response_cache", str, ""), base_dir),
        )
        if not mc.model:
            raise m.error("model", "must not be empty")
        if (mc.price_input is None) != (mc.price_output is None):
            raise m.error("price_output" if mc.price_output is None else "price_input",
                          "set both price_input and price_output, or neither")
        if mc.name in names:
            raise m.error("name", f"duplicate model name {mc.name!r}")
        names.add(mc.name)
        m.finish()
        models.append(mc)
    top.finish()
    return Config(models=tuple(models), cascade=cascade, data=data, embedder=embedder, source=source)
