"""Benchmark data: loaders for the paper's benchmarks and seeded query streams.

Every loader returns a tuple of immutable :class:`Problem` records. Two kinds of source:

* **Templated math (GSM-Symbolic)**, generated offline by the ``reasoning-gym`` package
  (Apache-2.0; the ``demo`` extra). :func:`gsm_symbolic_split` draws a *test stream*
  (``templates`` templates × ``variants`` variants each) and a *calibration split* drawn
  separately (other variants of the same templates, never a question of the stream), as
  the paper calibrates on held-out, strategy-free data.
* **Files in each benchmark's public format** (JSON Lines, a JSON array, or CSV):

  ========================  =====================================================
  ``gsm8k``                 ``question``, ``answer`` (worked solution ending ``#### n``)
  ``gsm_plus``              ``question``, ``answer``, ``perturbation_type``
                            (optional ``solution``, ``seed_question``)
  ``metamath``              ``query``, ``response`` ending ``The answer is: …``
                            (optional ``type``, ``original_question``)
  ``nasa_history``          ``question`` + either ``correct_answer`` and
                            ``incorrect_answer_1..3`` (the Hugging Face release; the
                            options are shuffled with a seed) or four options
                            (``choices`` list or ``A``–``D`` columns) and a gold
                            letter (``answer``)
  ========================  =====================================================

A missing or malformed field raises :class:`DatasetFormatError`, which names the file,
the line and the field. :func:`order_stream` puts a stream in one of the orders
``shuffled`` (seeded), ``as-is`` or ``grouped`` (by template / seed question).
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..core.tasks import Query
from ..errors import (
    DatasetFormatError,
    DependencyMissingError,
    InvalidArgumentError,
)

__all__ = [
    "DATASETS",
    "ORDERS",
    "LabelledConfidences",
    "Problem",
    "Split",
    "gsm_symbolic_split",
    "gsm_symbolic_templates",
    "load_confidences",
    "load_dataset",
    "load_gsm8k",
    "load_gsm_plus",
    "load_metamath",
    "load_nasa_history",
    "order_stream",
    "split_problems",
    "to_queries",
]

#: Stream orders accepted by :func:`order_stream`.
ORDERS: Final = ("shuffled", "as-is", "grouped")


@dataclass(frozen=True, slots=True)
class Problem:
    """One benchmark query with its gold answer.

    ``family`` selects prompts and grading (``"math"`` or ``"mcq"``); ``group`` is the
    template (GSM-Symbolic), the seed question (GSM-Plus) or another key under which
    logically similar problems share a group; ``choices`` are the MCQ options in A–D order.
    """

    uid: str
    question: str
    answer: str
    family: str = "math"
    group: str = ""
    dataset: str = ""
    solution: str = ""
    choices: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.family not in ("math", "mcq"):
            raise InvalidArgumentError("family", f"must be 'math' or 'mcq', got {self.family!r}")
        if isinstance(self.meta, Mapping):
            object.__setattr__(self, "meta", tuple(sorted(self.meta.items())))

    def meta_value(self, key: str, default: str = "") -> str:
        """The metadata value under ``key`` (e.g. GSM-Plus ``perturbation_type``)."""
        return dict(self.meta).get(key, default)

    def to_query(self) -> Query:
        """The pipeline's view of this problem (:class:`intercascade_core.core.tasks.Query`)."""
        return Query(
            text=self.question,
            gold=self.answer,
            family=self.family,  # type: ignore[arg-type]
            id=self.uid,
            template=self.group or None,
            options=self.choices,
        )


@dataclass(frozen=True, slots=True)
class Split:
    """A calibration split and a test stream with no question in common, and optionally a
    third disjoint pool (for example the problems a study teaches from)."""

    calibration: tuple[Problem, ...]
    test: tuple[Problem, ...]
    pool: tuple[Problem, ...] = ()


# --------------------------------------------------------------------------- ordering


def order_stream(problems: Sequence[Problem], order: str = "shuffled", *, seed: int = 0) -> tuple[Problem, ...]:
    """Return ``problems`` in the requested stream order (the input is not changed).

    ``shuffled``: a seeded permutation. ``as-is``: unchanged. ``grouped``: problems of a
    group are contiguous; groups appear in order of first appearance, and a group keeps
    its internal order.
    """
    items = tuple(problems)
    if order == "as-is":
        return items
    if order == "shuffled":
        perm = list(items)
        random.Random(_seed_key("order", seed)).shuffle(perm)
        return tuple(perm)
    if order == "grouped":
        groups: dict[str, list[Problem]] = {}
        for p in items:
            groups.setdefault(p.group, []).append(p)
        return tuple(p for members in groups.values() for p in members)
    raise InvalidArgumentError("order", f"must be one of {', '.join(ORDERS)}; got {order!r}")


def to_queries(problems: Sequence[Problem]) -> tuple[Query, ...]:
    """The pipeline's :class:`~intercascade_core.core.tasks.Query` records, in order."""
    return tuple(p.to_query() for p in problems)


def split_problems(
    problems: Sequence[Problem], n_calibration: int, *, seed: int = 0
) -> Split:
    """Split a loaded benchmark into a random calibration part and the remaining stream.

    The calibration part is a seeded random sample of ``n_calibration`` problems; the
    test stream keeps the others in their original order (order it with
    :func:`order_stream`).
    """
    if isinstance(n_calibration, bool) or not isinstance(n_calibration, int) or n_calibration < 0:
        raise InvalidArgumentError("n_calibration", f"must be an integer >= 0, got {n_calibration!r}")
    if n_calibration >= len(problems):
        raise InvalidArgumentError(
            "n_calibration",
            f"{n_calibration} leaves no test queries out of {len(problems)} problems",
        )
    idx = list(range(len(problems)))
    chosen = set(random.Random(_seed_key("split", seed)).sample(idx, n_calibration))
    cal = tuple(problems[i] for i in sorted(chosen))
    test = tuple(problems[i] for i in idx if i not in chosen)
    return Split(cal, test)


def _seed_key(*parts: object) -> str:
    # str seeds are hashed with SHA-512 by random.Random: stable across processes and
    # platforms, unlike hash().
    return ":".join(str(p) for p in parts)


# --------------------------------------------------------------------------- GSM-Symbolic


def _gsm_symbolic_generators() -> tuple[dict[int, Callable[[random.Random, float], dict[str, Any]]], list[int]]:
    try:
        with warnings.catch_warnings():
            # reasoning-gym imports many third-party packages; silence only import-time
            # deprecation noise from them (pytest runs with -W error).
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            from reasoning_gym.arithmetic.gsm_symbolic import gsm_symbolic as gs
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise DependencyMissingError(
            "GSM-Symbolic problems need the 'reasoning-gym' package: "
            "pip install 'intercascade[demo]'"
        ) from exc
    ds = gs.GSMSymbolicDataset(gs.GSMSymbolicDatasetConfig(size=1, seed=0))
    return ds.generators, list(gs.tasks_ok)


def gsm_symbolic_templates() -> tuple[int, ...]:
    """The GSM-Symbolic template ids reasoning-gym marks as usable."""
    return tuple(_gsm_symbolic_generators()[1])


def gsm_symbolic_split(
    *,
    templates: int | Sequence[int] = 10,
    variants: int = 20,
    calibration_variants: int = 10,
    seed: int = 0,
    order: str = "shuffled",
    pool_variants: int = 0,
) -> Split:
    """Draw a GSM-Symbolic test stream and a separately drawn calibration split.

    ``templates`` is a count (a seeded sample of the usable templates) or explicit ids.
    The test stream has ``variants`` distinct variants of each template, put in ``order``;
    the calibration split has ``calibration_variants`` further variants of each template,
    drawn from a different seed sequence and never repeating a test question, in seeded
    shuffled order. ``pool_variants`` further variants per template, drawn after both and
    repeating neither, make the ``pool`` (the test and calibration draws do not depend on
    it). Everything is a deterministic function of the arguments.
    """
    for name, value, low in (("variants", variants, 1), ("calibration_variants", calibration_variants, 0),
                             ("pool_variants", pool_variants, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(name, f"must be an integer >= {low}, got {value!r}")
    generators, usable = _gsm_symbolic_generators()
    if isinstance(templates, int) and not isinstance(templates, bool):
        if not 1 <= templates <= len(usable):
            raise InvalidArgumentError(
                "templates", f"must be between 1 and {len(usable)}, got {templates}"
            )
        chosen = random.Random(_seed_key("templates", seed)).sample(usable, templates)
    else:
        chosen = list(templates)  # type: ignore[arg-type]
        bad = [t for t in chosen if t not in usable]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise InvalidArgumentError(
                "templates",
                f"must be distinct usable template ids (see gsm_symbolic_templates()); bad: {bad or chosen}",
            )

    seen: set[str] = set()
    test: list[Problem] = []
    cal: list[Problem] = []
    for t in chosen:
        test.extend(_variants(generators[t], t, variants, "test", seed, seen))
    for t in chosen:
        cal.extend(_variants(generators[t], t, calibration_variants, "cal", seed, seen))
    pool: list[Problem] = []
    for t in chosen:
        pool.extend(_variants(generators[t], t, pool_variants, "pool", seed, seen))
    cal_stream = order_stream(cal, "shuffled", seed=seed + 1)
    return Split(cal_stream, order_stream(test, order, seed=seed), tuple(pool))


def _variants(
    gen: Callable[[random.Random, float], dict[str, Any]],
    template: int,
    n: int,
    split: str,
    seed: int,
    seen: set[str],
) -> list[Problem]:
    out: list[Problem] = []
    attempt = 0
    while len(out) < n:
        if attempt > 20 * n + 50:
            raise InvalidArgumentError(
                "variants", f"template {template} has fewer than {n} distinct variants"
            )
        item = gen(random.Random(_seed_key("gsm_symbolic", seed, split, template, attempt)), 1.0)
        attempt += 1
        question = str(item["question"]).strip()
        if question in seen:
            continue
        seen.add(question)
        out.append(
            Problem(
                uid=f"gsm_symbolic/{split}/t{template:02d}/{len(out):03d}",
                question=question,
                answer=str(item["answer"]).strip(),
                family="math",
                group=f"t{template:02d}",
                dataset="gsm_symbolic",
                solution=str(item.get("metadata", {}).get("answer_cot", "")),
                meta=(("template", str(template)),),
            )
        )
    return out


# --------------------------------------------------------------------------- file readers


def _records(path: str | Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """Yield ``(line, record)`` from a ``.jsonl``/``.json``/``.csv`` file (1-based lines)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError("path", f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError("path", f"{p}: cannot read: {exc}") from None
    suffix = p.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        for row in reader:
            yield reader.line_num, row
        return
    stripped = text.lstrip()
    if suffix == ".json" and stripped.startswith("["):
        yield from _json_array(p, text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(p, lineno, "<record>", f"invalid JSON: {exc.msg}") from None
        if not isinstance(rec, dict):
            raise DatasetFormatError(p, lineno, "<record>", "expected a JSON object")
        yield lineno, rec


def _json_array(p: Path, text: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= n:
            raise DatasetFormatError(p, text.count("\n", 0, n) + 1, "<record>", "unterminated JSON array")
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            rec, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(p, exc.lineno, "<record>", f"invalid JSON: {exc.msg}") from None
        if not isinstance(rec, dict):
            raise DatasetFormatError(p, line, "<record>", "expected a JSON object")
        yield line, rec


def _text(path: str | Path, line: int, rec: Mapping[str, Any], key: str, *, optional: bool = False) -> str:
    if key not in rec or rec[key] is None:
        if optional:
            return ""
        raise DatasetFormatError(path, line, key, "missing")
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetFormatError(path, line, key, f"expected text, got {type(value).__name__}")
    s = str(value).strip()
    if not s and not optional:
        raise DatasetFormatError(path, line, key, "empty")
    return s


def _non_empty(path: str | Path, problems: list[Problem]) -> tuple[Problem, ...]:
    if not problems:
        raise DatasetFormatError(path, 1, "<record>", "the file holds no records")
    return tuple(problems)


def _gsm8k_final(path: str | Path, line: int, field_name: str, solution: str) -> str:
    if "####" not in solution:
        raise DatasetFormatError(path, line, field_name, "does not end with '#### <answer>'")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    if not final:
        raise DatasetFormatError(path, line, field_name, "empty answer after '####'")
    return final


# --------------------------------------------------------------------------- loaders


def load_gsm8k(path: str | Path) -> tuple[Problem, ...]:
    """GSM8K: ``question`` and ``answer`` (a worked solution ending ``#### n``)."""
    out: list[Problem] = []
    for line, rec in _records(path):
        q = _text(path, line, rec, "question")
        sol = _text(path, line, rec, "answer")
        out.append(
            Problem(
                uid=f"gsm8k/{len(out):05d}",
                question=q,
                answer=_gsm8k_final(path, line, "answer", sol),
                group=f"q{len(out):05d}",
                dataset="gsm8k",
                solution=sol,
            )
        )
    return _non_empty(path, out)


def load_gsm_plus(path: str | Path) -> tuple[Problem, ...]:
    """GSM-Plus: ``question``, ``answer``, ``perturbation_type`` (+ ``solution``, ``seed_question``).

    Problems derived from the same GSM8K seed question share a group, so ``grouped``
    order puts the perturbations of one problem together. Critical-thinking items have a
    non-numeric answer (``None``) and keep it as text.
    """
    out: list[Problem] = []
    groups: dict[str, str] = {}
    for line, rec in _records(path):
        q = _text(path, line, rec, "question")
        ans = _text(path, line, rec, "answer").replace(",", "")
        ptype = _text(path, line, rec, "perturbation_type")
        seed_q = _text(path, line, rec, "seed_question", optional=True)
        key = seed_q or q
        group = groups.setdefault(key, f"s{len(groups):05d}")
        out.append(
            Problem(
                uid=f"gsm_plus/{len(out):05d}",
                question=q,
                answer=ans,
                group=group,
                dataset="gsm_plus",
                solution=_text(path, line, rec, "solution", optional=True),
                meta=(("perturbation_type", ptype),),
            )
        )
    return _non_empty(path, out)


_METAMATH_ANSWER = re.compile(r"The answer is:?\s*(.+?)\s*$", re.DOTALL)


def load_metamath(path: str | Path) -> tuple[Problem, ...]:
    """MetaMathQA: ``query`` and ``response`` ending ``The answer is: …`` (+ ``type``)."""
    out: list[Problem] = []
    groups: dict[str, str] = {}
    for line, rec in _records(path):
        q = _text(path, line, rec, "query")
        resp = _text(path, line, rec, "response")
        idx = resp.rfind("The answer is")
        if idx < 0:
            raise DatasetFormatError(path, line, "response", "does not end with 'The answer is: …'")
        m = _METAMATH_ANSWER.match(resp, idx)
        answer = m.group(1).strip().rstrip(".").strip() if m else ""
        if not answer:
            raise DatasetFormatError(path, line, "response", "empty answer after 'The answer is:'")
        kind = _text(path, line, rec, "type", optional=True)
        key = _text(path, line, rec, "original_question", optional=True) or q
        group = groups.setdefault(key, f"o{len(groups):05d}")
        out.append(
            Problem(
                uid=f"metamath/{len(out):05d}",
                question=q,
                answer=answer,
                group=group,
                dataset="metamath",
                solution=resp,
                meta=(("type", kind),) if kind else (),
            )
        )
    return _non_empty(path, out)


_LETTERS: Final = ("A", "B", "C", "D")


def load_nasa_history(path: str | Path, *, seed: int = 0) -> tuple[Problem, ...]:
    """NASA-History-MCQ: a question, four options and the gold letter.

    Accepts the Hugging Face release's columns (``correct_answer``,
    ``incorrect_answer_1..3``; the four options are put in a seeded random order per
    record) or explicit options (a ``choices`` list of four, or ``A``..``D`` columns) with
    a gold ``answer`` letter.
    """
    out: list[Problem] = []
    for line, rec in _records(path):
        q = _text(path, line, rec, "question")
        if "correct_answer" in rec:
            right = _text(path, line, rec, "correct_answer")
            wrong = [_text(path, line, rec, f"incorrect_answer_{i}") for i in (1, 2, 3)]
            uid = _text(path, line, rec, "uuid", optional=True) or str(len(out))
            options = [right, *wrong]
            random.Random(_seed_key("nasa", seed, uid)).shuffle(options)
            choices = tuple(options)
            gold = _LETTERS[options.index(right)]
        else:
            if "choices" in rec:
                raw = rec["choices"]
                if not isinstance(raw, list) or len(raw) != 4:
                    raise DatasetFormatError(path, line, "choices", "expected a list of four options")
                choices = tuple(_text(path, line, {"choices": c}, "choices") for c in raw)
            elif all(k in rec for k in _LETTERS):
                choices = tuple(_text(path, line, rec, k) for k in _LETTERS)
            else:
                raise DatasetFormatError(
                    path, line, "choices", "missing (need 'choices', columns A-D, or 'correct_answer')"
                )
            gold = _text(path, line, rec, "answer").upper().strip("() .")
            if gold not in _LETTERS:
                raise DatasetFormatError(path, line, "answer", f"expected a letter A-D, got {gold!r}")
        group = _text(path, line, rec, "source_document", optional=True) or f"q{len(out):05d}"
        out.append(
            Problem(
                uid=f"nasa_history/{len(out):05d}",
                question=q,
                answer=gold,
                family="mcq",
                group=group,
                dataset="nasa_history",
                choices=choices,
            )
        )
    return _non_empty(path, out)


#: File-based loaders by dataset name.
DATASETS: Final[Mapping[str, Callable[..., tuple[Problem, ...]]]] = MappingProxyType(
    {
        "gsm8k": load_gsm8k,
        "gsm_plus": load_gsm_plus,
        "metamath": load_metamath,
        "nasa_history": load_nasa_history,
    }
)


def load_dataset(name: str, path: str | Path, **kwargs: Any) -> tuple[Problem, ...]:
    """Load a file-based benchmark by name (see :data:`DATASETS`)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise InvalidArgumentError(
            "dataset", f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or gsm_symbolic"
        ) from None
    return loader(path, **kwargs)


# --------------------------------------------------------------------------- confidences


@dataclass(frozen=True, slots=True)
class LabelledConfidences:
    """Labelled calibration data, one row per item and one column pair per cascade level.

    ``confidences[i]`` and ``correct[i]`` belong to ``levels[i]`` (weakest first); arrays
    are read-only.
    """

    levels: tuple[str, ...]
    confidences: tuple[npt.NDArray[np.float64], ...]
    correct: tuple[npt.NDArray[np.bool_], ...]


_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


def load_confidences(path: str | Path) -> LabelledConfidences:
    """Read labelled confidences from CSV or JSON Lines.

    Columns: ``confidence`` and ``correct`` for one model, or ``<level>_confidence`` and
    ``<level>_correct`` pairs for a cascade, in column order weakest first (e.g.
    ``weak_confidence,weak_correct,strong_confidence,strong_correct``). ``correct`` is
    ``1/0`` or ``true/false``; confidences lie in [0, 1].

    The file is untrusted input: it must be a regular file of at most
    :data:`MAX_CONFIDENCE_FILE_BYTES` in UTF-8 (a byte-order mark is skipped), JSON is
    read with the bounded :func:`~intercascade_core.core.untrusted_json.loads` and CSV
    fields are limited to the ``csv`` module's 128 KiB. Every problem is a
    :class:`DatasetFormatError` or an :class:`InvalidArgumentError` naming the path.
    """
    levels: list[str] | None = None
    conf: list[list[float]] = []
    corr: list[list[bool]] = []
    for line, rec in _confidence_records(path):
        if levels is None:
            levels = _levels_of(path, line, list(rec.keys()))
            conf = [[] for _ in levels]
            corr = [[] for _ in levels]
        for i, lvl in enumerate(levels):
            ck = "confidence" if lvl == "" else f"{lvl}_confidence"
            yk = "correct" if lvl == "" else f"{lvl}_correct"
            conf[i].append(_confidence(path, line, rec, ck))
            corr[i].append(_boolean(path, line, rec, yk))
    if levels is None:
        raise DatasetFormatError(path, 1, "<record>", "the file holds no records")
    confs = []
    corrs = []
    for c, y in zip(conf, corr, strict=True):
        ca = np.asarray(c, dtype=np.float64)
        ya = np.asarray(y, dtype=np.bool_)
        ca.flags.writeable = False
        ya.flags.writeable = False
        confs.append(ca)
        corrs.append(ya)
    names = tuple(lvl or "model" for lvl in levels)
    return LabelledConfidences(names, tuple(confs), tuple(corrs))


#: the largest labelled-confidence file read (about 20 million items)
MAX_CONFIDENCE_FILE_BYTES = 1 << 30
_MAX_CONFIDENCE_DEPTH = 8


def _confidence_records(path: str | Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """:func:`_records` for untrusted labelled confidences: a bounded read of a regular
    file, UTF-8 with an optional BOM, bounded JSON, and CSV errors as typed errors."""
    import os
    import stat

    from ..core import untrusted_json

    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise InvalidArgumentError("path", f"{p}: no such file") from None
    except OSError as exc:
        raise InvalidArgumentError("path", f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgumentError("path", f"{p}: not a regular file")
        if st.st_size > MAX_CONFIDENCE_FILE_BYTES:
            raise InvalidArgumentError("path", f"{p}: {st.st_size} bytes, more than {MAX_CONFIDENCE_FILE_BYTES}")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_CONFIDENCE_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidArgumentError("path", f"{p}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIDENCE_FILE_BYTES:
        raise InvalidArgumentError("path", f"{p}: more than {MAX_CONFIDENCE_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetFormatError(p, bad_line, "<record>", f"not UTF-8 (byte {exc.start})") from None
    suffix = p.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:
            raise DatasetFormatError(p, reader.line_num, "<record>", f"malformed CSV: {exc}") from None
        return

    def parse(chunk: str, line: int) -> Any:
        try:
            return untrusted_json.loads(chunk, max_bytes=MAX_CONFIDENCE_FILE_BYTES, max_depth=_MAX_CONFIDENCE_DEPTH)
        except ValueError as exc:  # MalformedJSONError: never quotes the document
            raise DatasetFormatError(p, line, "<record>", f"invalid JSON: {exc}") from None

    if suffix == ".json" and text.lstrip().startswith("["):
        parse(text, 1)  # the bounds, checked on the whole array before it is read record by record
        yield from _json_array(p, text)
        return
    for lineno, chunk in enumerate(text.splitlines(), start=1):
        if not chunk.strip():
            continue
        rec = parse(chunk, lineno)
        if not isinstance(rec, dict):
            raise DatasetFormatError(p, lineno, "<record>", "expected a JSON object")
        yield lineno, rec


def _levels_of(path: str | Path, line: int, keys: list[str]) -> list[str]:
    if "confidence" in keys:
        if "correct" not in keys:
            raise DatasetFormatError(path, line, "correct", "missing")
        return [""]
    levels = [k[: -len("_confidence")] for k in keys if k.endswith("_confidence")]
    if not levels:
        raise DatasetFormatError(
            path, line, "confidence", "missing (need 'confidence' or '<level>_confidence' columns)"
        )
    for lvl in levels:
        if f"{lvl}_correct" not in keys:
            raise DatasetFormatError(path, line, f"{lvl}_correct", "missing")
    return levels


def _confidence(path: str | Path, line: int, rec: Mapping[str, Any], key: str) -> float:
    if key not in rec or rec[key] in (None, ""):
        raise DatasetFormatError(path, line, key, "missing")
    value = rec[key]
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        raise DatasetFormatError(path, line, key, f"not a number: {value!r}") from None
    if not 0.0 <= x <= 1.0:
        raise DatasetFormatError(path, line, key, f"must lie in [0, 1], got {value!r}")
    return x


def _boolean(path: str | Path, line: int, rec: Mapping[str, Any], key: str) -> bool:
    if key not in rec or rec[key] in (None, ""):
        raise DatasetFormatError(path, line, key, "missing")
    value = rec[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise DatasetFormatError(path, line, key, f"expected 1/0 or true/false, got {value!r}")
