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
    [embedder]           kind ("minilm" | "hashing"), precision ("fp32" | "int8"; default
                         fp32), model_path, tokenizer_path
    [[models]]           weakest first, at least two: name, base_url, model, api_key_env,
                         price_input, price_output (USD per 1M tokens), max_tokens,
                         temperature, timeout, max_retries, confidence_span

A model whose ``base_url`` is ``sim:weak``/``sim:strong``/... is served in-process by the
deterministic simulator (no network, no key).

Limits. A config is a small hand-written file, so everything in it has an upper bound
well above any real use and far below what would exhaust memory or run for weeks (an
unbounded ``variants`` builds that many questions before the first query). Beyond a bound
the error names the key and the bound:

- the file: at most :data:`MAX_CONFIG_BYTES` bytes, a regular file, lines of at most
  :data:`MAX_LINE_CHARS` characters, at most :data:`MAX_DOTS` dots outside strings and
  comments (a dotted key of thousands of parts costs the TOML parser quadratic time and
  memory), nesting the parser can follow;
- strings: at most :data:`MAX_NAME_CHARS` (``name``, ``model``, ``api_key_env``),
  :data:`MAX_URL_CHARS` (``base_url``) or :data:`MAX_PATH_CHARS` (paths) characters, and
  no control characters;
- numbers (:data:`LIMITS`): ``k`` <= 64, ``min_n`` and ``n_calibration`` <= 10^6,
  ``insitu_rounds`` <= 100, ``limit`` <= 10^7, ``templates`` <= 10^4 (a count, a list
  length or an id), ``variants`` and ``calibration_variants`` <= 10^4 with ``templates``
  x (``variants`` + ``calibration_variants``) <= :data:`MAX_GENERATED_QUESTIONS`, seeds
  < 2^63, prices <= 10^4 USD per 1M tokens, ``max_tokens`` <= 2^20, ``timeout`` <= 3600 s,
  ``max_retries`` <= 20, at most :data:`MAX_MODELS` ``[[models]]``; every number finite.
"""

from __future__ import annotations

import math
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import ConfigError

__all__ = [
    "BACKENDS",
    "LIMITS",
    "MAX_CONFIG_BYTES",
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
#: ``[embedder] precision``: the packaged MiniLM models (models.minilm)
PRECISIONS: Final = ("fp32", "int8")

#: the largest config file read (the shipped, commented example is under 4 KiB)
MAX_CONFIG_BYTES: Final = 256 * 1024
#: the longest line of a config file (it also keeps integer literals under Python's
#: 4,300-digit conversion limit, past which tomllib raises a bare ValueError)
MAX_LINE_CHARS: Final = 4096
MAX_NAME_CHARS: Final = 256
MAX_URL_CHARS: Final = 2048
MAX_PATH_CHARS: Final = 1024
MAX_MODELS: Final = 16
#: '.' outside strings and comments (dotted keys and decimals); tomllib spends time and
#: memory quadratic in a dotted key's length (60 keys of 2,000 parts: 10 s, 1 GB)
MAX_DOTS: Final = 512
# TOML strings and comments, each matched in one pass (possessive: an unterminated one runs
# to the end of its line or of the text instead of being retried from every quote)
_STRINGS_AND_COMMENTS = re.compile(
    r'"""(?:[^"\\]++|\\[\s\S]?|"(?!""))*+(?:"""|\Z)'
    r"|'''(?:[^']++|'(?!''))*+(?:'''|\Z)"
    r'|"(?:[^"\\\n]++|\\.?)*+(?:"|$)'
    r"|'[^'\n]*+(?:'|$)"
    r"|#[^\n]*+",
    re.MULTILINE,
)
#: questions the gsm_symbolic generator may be asked for (test and calibration together)
MAX_GENERATED_QUESTIONS: Final = 1_000_000
_MAX_SEED: Final = 2**63 - 1
#: the upper bound of every numeric key, by dotted name ("models[]" for any model)
LIMITS: Final[Mapping[str, float]] = {
    "cascade.k": 64,
    "cascade.seed": _MAX_SEED,
    "cascade.min_n": 1_000_000,
    "cascade.insitu_rounds": 100,
    "data.n_calibration": 1_000_000,
    "data.limit": 10_000_000,
    "data.templates": 10_000,
    "data.variants": 10_000,
    "data.calibration_variants": 10_000,
    "data.seed": _MAX_SEED,
    "models[].price_input": 10_000.0,
    "models[].price_output": 10_000.0,
    "models[].max_tokens": 2**20,
    "models[].temperature": 2.0,
    "models[].timeout": 3600.0,
    "models[].max_retries": 20,
}


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
    """``precision``: the packaged MiniLM model, ``"fp32"`` or ``"int8"`` (empty: the
    embedder's default, fp32; a repository written with int8 vectors needs ``"int8"``).
    ``model_path`` / ``tokenizer_path``: an ONNX MiniLM file instead, and its tokenizer.json
    (empty: the packaged model and the shipped tokenizer)."""

    kind: str = "minilm"
    model_path: str = ""
    tokenizer_path: str = ""
    precision: str = ""


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
    if "\x00" in str(p):  # no system call takes it
        raise ConfigError(_show_text(repr(str(p))), "<file>", "not a usable path")
    raw = b""
    try:
        info = p.stat()
        regular = stat.S_ISREG(info.st_mode)  # a FIFO would block, a device read forever
        if regular and info.st_size <= MAX_CONFIG_BYTES:
            with p.open("rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)  # the file may grow after the stat
    except FileNotFoundError:
        raise ConfigError(str(p), "<file>", "no such file") from None
    except OSError as exc:
        raise ConfigError(str(p), "<file>", f"cannot read: {exc.strerror or exc}") from None
    if not regular:
        raise ConfigError(str(p), "<file>", "not a regular file")
    if info.st_size > MAX_CONFIG_BYTES or len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(str(p), "<file>", f"more than the {MAX_CONFIG_BYTES} bytes allowed")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # editors may write a BOM
    except UnicodeDecodeError:
        raise ConfigError(str(p), "<file>", "not UTF-8 text") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if len(line) > MAX_LINE_CHARS:
            raise ConfigError(
                str(p), "<toml>", f"line {number} is {len(line)} characters long "
                f"(at most {MAX_LINE_CHARS})"
            )
    dots = _STRINGS_AND_COMMENTS.sub("", text).count(".")
    if dots > MAX_DOTS:
        raise ConfigError(
            str(p), "<toml>", f"{dots} dotted-key parts and decimal points (at most {MAX_DOTS})"
        )
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), "<toml>", str(exc)) from None
    except RecursionError:
        raise ConfigError(str(p), "<toml>", "arrays or tables nested too deeply") from None
    return parse_config(doc, source=str(p), base_dir=p.parent)


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short (it may be megabytes)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
    return _show_text(repr(value))


def _show_text(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


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
            raise self.error(name, f"expected {_kind_name(kinds)}, got {type(value).__name__} {_show(value)}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(name, str, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(map(repr, choices))}; got {_show(value)}")
        return value

    def string(self, name: str, default: str | None, *, max_chars: int, required: bool = False) -> Any:
        """A string of at most ``max_chars`` characters without control characters."""
        value = self.get(name, str, default, required=required)
        if value is None:
            return None
        if len(value) > max_chars:
            raise self.error(name, f"{len(value)} characters long (at most {max_chars})")
        bad = next((ch for ch in value if ch < " " or "\x7f" <= ch <= "\x9f"), None)
        if bad is not None:
            raise self.error(name, f"contains the control character U+{ord(bad):04X}")
        return value

    def _limit(self, name: str) -> float:
        prefix = self.prefix.split("[")[0] + "[]" if self.prefix.startswith("models[") else self.prefix
        return LIMITS[f"{prefix}.{name}"]

    def number(self, name: str, default: float | None, *, low: float,
               open_low: bool = False, open_high: bool = False, required: bool = False) -> Any:
        """A finite number in the range from ``low`` to the key's :data:`LIMITS` entry
        (1 for the probabilities, which are open at both ends)."""
        high = 1.0 if open_high else self._limit(name)
        value = self.get(name, float, default, required=required)
        if value is None:
            return None
        bad_low = value <= low if open_low else value < low
        bad_high = value >= high if open_high else value > high
        if not math.isfinite(value) or bad_low or bad_high:
            lo = "(" if open_low else "["
            hi = ")" if open_high else "]"
            raise self.error(name, f"must lie in {lo}{low:g}, {high:g}{hi}; got {_show(value)}")
        return value

    def integer(self, name: str, default: int, *, low: int) -> int:
        """An integer from ``low`` to the key's :data:`LIMITS` entry."""
        high = int(self._limit(name))
        value: int = self.get(name, int, default)
        if not low <= value <= high:
            raise self.error(name, f"must be an integer in [{low}, {high}]; got {_show(value)}")
        return value

    def finish(self) -> None:
        extra = sorted(set(self.table) - self.seen)
        if extra:
            raise self.error(extra[0], "unknown key (check the spelling; see the example config)")


def _templates(d: _Reader) -> int | tuple[int, ...]:
    value = d.get("templates", (int, list), 10)
    if isinstance(value, int):
        return d.integer("templates", 10, low=1)
    high = int(LIMITS["data.templates"])
    if len(value) > high:
        raise d.error("templates", f"a list of {len(value)} template ids (at most {high})")
    if not value or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= high for t in value):
        raise d.error("templates", f"expected a count or a non-empty list of template ids in [0, {high}]; "
                      f"got {_show(value)}")
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
        alpha=c.number("alpha", 0.2, low=0.0, open_low=True, open_high=True),
        delta=c.number("delta", 0.1, low=0.0, open_low=True, open_high=True),
        k=c.integer("k", 2, low=0),
        policy=c.choice("policy", POLICIES, "retrieval"),
        backend=c.choice("backend", BACKENDS, "numpy"),
        repository=_path(c.string("repository", "", max_chars=MAX_PATH_CHARS), base_dir),
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
        path=_path(d.string("path", "", max_chars=MAX_PATH_CHARS), base_dir),
        calibration_path=_path(d.string("calibration_path", "", max_chars=MAX_PATH_CHARS), base_dir),
        n_calibration=d.integer("n_calibration", 200, low=0),
        limit=d.integer("limit", 0, low=0),
        order=d.choice("order", ORDERS, "shuffled"),
        templates=_templates(d),
        variants=d.integer("variants", 20, low=1),
        calibration_variants=d.integer("calibration_variants", 20, low=1),
        seed=d.integer("seed", 0, low=0),
    )
    d.finish()
    n_templates = data.templates if isinstance(data.templates, int) else len(data.templates)
    generated = n_templates * (data.variants + data.calibration_variants)
    if data.dataset == "gsm_symbolic" and generated > MAX_GENERATED_QUESTIONS:
        raise ConfigError(
            source, "data.variants",
            f"templates x (variants + calibration_variants) = {generated} questions "
            f"(at most {MAX_GENERATED_QUESTIONS})",
        )
    if data.dataset != "gsm_symbolic" and not data.path:
        raise ConfigError(source, "data.path", f"required for dataset {data.dataset!r}")

    emb_t = top.get("embedder", dict, {})
    e = _Reader(source, "embedder", emb_t)
    embedder = EmbedderConfig(
        kind=e.choice("kind", EMBEDDERS, "minilm"),
        model_path=_path(e.string("model_path", "", max_chars=MAX_PATH_CHARS), base_dir),
        tokenizer_path=_path(e.string("tokenizer_path", "", max_chars=MAX_PATH_CHARS), base_dir),
        precision=e.choice("precision", ("", *PRECISIONS), ""),
    )
    if embedder.precision and embedder.model_path:
        raise e.error("precision", "selects a packaged model; it cannot be combined with model_path")
    e.finish()

    models_t = top.get("models", list, None, required=True)
    if len(models_t) < 2:
        raise ConfigError(source, "models", f"needs at least two [[models]] (weakest first); got {len(models_t)}")
    if len(models_t) > MAX_MODELS:
        raise ConfigError(source, "models", f"at most {MAX_MODELS} [[models]]; got {len(models_t)}")
    models = []
    names: set[str] = set()
    for i, mt in enumerate(models_t):
        if not isinstance(mt, dict):
            raise ConfigError(source, f"models[{i}]", "expected a table ([[models]])")
        m = _Reader(source, f"models[{i}]", mt)
        base_url = m.string("base_url", None, max_chars=MAX_URL_CHARS, required=True)
        if not base_url.startswith(("http://", "https://", "sim:")):
            raise m.error("base_url", f"expected an http(s) URL or sim:<level>; got {base_url!r}")
        mc = ModelConfig(
            name=m.string("name", f"level{i}", max_chars=MAX_NAME_CHARS) or f"level{i}",
            base_url=base_url,
            model=m.string("model", None, max_chars=MAX_NAME_CHARS, required=True),
            api_key_env=m.string("api_key_env", "", max_chars=MAX_NAME_CHARS),
            price_input=m.number("price_input", None, low=0.0),
            price_output=m.number("price_output", None, low=0.0),
            max_tokens=m.integer("max_tokens", 512, low=1),
            temperature=m.number("temperature", 0.0, low=0.0),
            timeout=m.number("timeout", 60.0, low=0.0, open_low=True),
            max_retries=m.integer("max_retries", 6, low=0),
            confidence_span=m.choice("confidence_span", ("all", "answer"), "all"),
            response_cache=_path(m.string("response_cache", "", max_chars=MAX_PATH_CHARS), base_dir),
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
