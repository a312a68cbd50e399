"""Saved calibrations: a cascade's thresholds in a versioned JSON file.

Calibrating costs a model call per level and calibration item (800 calls for 400 items
and two levels), so a calibration is saved once and reused across restarts. The file
(format :data:`FORMAT`, version :data:`FORMAT_VERSION`) holds::

    format, format_version, created_at (UTC, ISO 8601), package_version,
    prompt_fingerprint    sha256 of the prompts the levels were calibrated on
    data_sha256           sha256 of the labelled confidences (see calibration_data_sha256)
    levels                per level, weakest first: name, model, calibration
                          (Calibration.to_dict: threshold, alpha, delta, grid_rule, min_n,
                          n_calibration, n_accepted, n_errors, risk_bound, ...)
    data                  the labelled confidences: {"confidences": [[...]], "correct": [[0/1]]}
    checksum              sha256 of the canonical JSON of everything above

The thresholds carry an (α, δ) guarantee only for the models and prompts that produced
their calibration data, so :func:`load_calibration_for` refuses a file whose model ids or
prompt fingerprint differ from the configured levels (:class:`IncompatibleStoreError`, the
message names the mismatch) unless ``force=True``. A file that is not a well-formed,
checksummed calibration is :class:`CorruptStoreError`; one of a later format version is
:class:`IncompatibleStoreError`. Files are read with the bounded
:func:`~intercascade_core.core.untrusted_json.loads` and written atomically
(:func:`~intercascade_core.storage.store.atomic_write_bytes`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core import untrusted_json
from ..core.calibrate import Calibration
from ..core.cascade import CalibrationRun, CascadeConfig, Level, calibration_prompt
from ..core.state import Usage
from ..core.tasks import Query
from ..errors import CorruptStoreError, IncompatibleStoreError, InvalidArgumentError
from .export import check_output_file
from .store import atomic_write_bytes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SavedCalibration",
    "calibration_data_sha256",
    "calibration_mismatches",
    "level_model_ids",
    "load_calibration",
    "load_calibration_for",
    "prompt_fingerprint",
    "save_calibration",
]

FORMAT = "intercascade-calibration"
FORMAT_VERSION = 1
#: largest calibration file read: ~25 bytes per item and level, so about a million items
MAX_FILE_BYTES = 64 << 20
_MAX_LEVELS = 64
_MAX_ID_CHARS = 1000
_TOP_KEYS = frozenset({
    "format", "format_version", "created_at", "package_version", "prompt_fingerprint",
    "data_sha256", "levels", "data", "checksum",
})

# Placeholder problems rendered through the prompt builder: the fingerprint covers the
# instructions and the layout around the problem, for both task families.
_PROBES = (
    Query(text="{problem}", family="math"),
    Query(text="{question}", family="mcq", options=("{A}", "{B}", "{C}", "{D}")),
)


def prompt_fingerprint(n_levels: int, config: CascadeConfig | None = None) -> str:
    """sha256 of the prompts each of ``n_levels`` levels is calibrated on under
    ``config`` (default ``CascadeConfig()``), as this version renders them
    (:func:`~intercascade_core.core.cascade.calibration_prompt`: strategy-free, or the
    answer-and-strategy prompt for the last level of a single-call cascade)."""
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or not 1 <= n_levels <= _MAX_LEVELS:
        raise InvalidArgumentError("n_levels", f"must be an int in [1, {_MAX_LEVELS}], got {n_levels!r}")
    cfg = CascadeConfig() if config is None else config
    h = hashlib.sha256(b"intercascade.prompts/2\n")
    for level in range(n_levels):
        for q in _PROBES:
            h.update(calibration_prompt(q, level, n_levels, cfg).encode("utf-8"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()


def calibration_data_sha256(
    confidences: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]]
) -> str:
    """sha256 of labelled confidences, per level: the item count (u64), the confidences
    (float64) and the labels (one byte each), little endian. Equal data, equal digest."""
    if len(confidences) != len(correct):
        raise InvalidArgumentError("correct", f"has {len(correct)} levels, confidences {len(confidences)}")
    h = hashlib.sha256(b"intercascade.calibration-data/1\n")
    for i, (c, y) in enumerate(zip(confidences, correct, strict=True)):
        conf = np.asarray(c, dtype="<f8")
        ok = np.asarray(y)
        if conf.ndim != 1 or ok.shape != conf.shape or ok.dtype.kind not in "bi":
            raise InvalidArgumentError(f"data[{i}]", "needs one confidence and one 0/1 label per item")
        h.update(struct.pack("<Q", conf.size))
        h.update(conf.tobytes())
        h.update(ok.astype(np.uint8).tobytes())
    return h.hexdigest()


def level_model_ids(levels: Sequence[Level]) -> tuple[str, ...]:
    """The model id of each level: its model's ``.model`` (e.g. ``"gpt-4o-mini"``), else
    the level's name."""
    return tuple(str(getattr(lv.model, "model", "") or lv.name) for lv in levels)


@dataclass(frozen=True, slots=True, eq=False)
class SavedCalibration:
    """A calibration file's content. ``path`` is where it was read or written."""

    calibrations: tuple[Calibration, ...]
    level_names: tuple[str, ...]
    model_ids: tuple[str, ...]
    prompt_fingerprint: str
    data_sha256: str
    confidences: tuple[tuple[float, ...], ...]
    correct: tuple[tuple[bool, ...], ...]
    created_at: str
    package_version: str
    path: str = ""

    def unguaranteed_note(self) -> str | None:
        """Which levels carry no (alpha, delta) guarantee, and why (each level's own note),
        or None when every level's does. ``on_fail="jung"`` keeps Jung's fallback threshold
        where a level's first test failed or it had fewer than ``min_n`` items; the file
        records that, and a deployment must not mistake it for a certified threshold."""
        why = [f"level {name}: {cal.note or 'Jung fallback, no guarantee'}"
               for name, cal in zip(self.level_names, self.calibrations, strict=True) if not cal.guaranteed]
        if not why:
            return None
        return f"not certified (on_fail='jung'): {' | '.join(why)}"

    def calibration_run(self) -> CalibrationRun:
        """The thresholds and their data as a :class:`CalibrationRun` (no failures and no
        usage are recorded: the calls were made, and paid, when the file was written)."""
        return CalibrationRun(
            calibrations=self.calibrations,
            confidences=self.confidences,
            correct=self.correct,
            failures=tuple(tuple(None for _ in c) for c in self.confidences),
            usage=tuple(Usage() for _ in self.calibrations),
        )


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _check_ids(name: str, ids: Sequence[str], n: int) -> tuple[str, ...]:
    if isinstance(ids, str) or len(ids) != n:
        raise InvalidArgumentError(name, f"needs one entry per level ({n}), got {ids!r}")
    for x in ids:
        if not isinstance(x, str) or not x or len(x) > _MAX_ID_CHARS:
            raise InvalidArgumentError(name, f"entries must be non-empty strings, got {x!r}")
    return tuple(ids)


def save_calibration(
    path: str | os.PathLike[str],
    calibration: CalibrationRun | Sequence[Calibration],
    *,
    model_ids: Sequence[str],
    level_names: Sequence[str] | None = None,
    data: tuple[Sequence[Sequence[float]], Sequence[Sequence[bool]]] | None = None,
    config: CascadeConfig | None = None,
    fingerprint: str | None = None,
) -> SavedCalibration:
    """Write a cascade calibration to ``path`` atomically and return what was written.

    ``calibration``: a :class:`CalibrationRun` (its confidences are the data) or the
    per-level :class:`Calibration` records with ``data=(confidences, correct)``, per level
    the labelled items that were calibrated on. ``model_ids`` (one per level, weakest
    first) and ``fingerprint`` (default: :func:`prompt_fingerprint` of the ``config``
    the levels were calibrated with) say what the data came from; ``level_names``
    default to the model ids.
    """
    confs: Sequence[Sequence[float]]
    corr: Sequence[Sequence[bool]]
    if isinstance(calibration, CalibrationRun):
        cals = tuple(calibration.calibrations)
        confs, corr = calibration.confidences, calibration.correct
        if data is not None:
            raise InvalidArgumentError("data", "a CalibrationRun carries its data; pass data= only with Calibrations")
    else:
        cals = tuple(calibration)
        if data is None:
            raise InvalidArgumentError("data", "the (confidences, correct) the thresholds were calibrated on")
        confs, corr = data
    if not cals or len(cals) > _MAX_LEVELS or not all(isinstance(c, Calibration) for c in cals):
        raise InvalidArgumentError("calibration", f"needs 1 to {_MAX_LEVELS} Calibration records")
    n = len(cals)
    ids = _check_ids("model_ids", model_ids, n)
    names = ids if level_names is None else _check_ids("level_names", level_names, n)
    if len(confs) != n or len(corr) != n:
        raise InvalidArgumentError("data", f"needs one row of confidences and labels per level ({n})")
    conf_rows = tuple(tuple(float(x) for x in row) for row in confs)
    ok_rows = tuple(tuple(bool(x) for x in row) for row in corr)
    if any(len(r) != len(conf_rows[0]) for r in (*conf_rows, *ok_rows)):
        raise InvalidArgumentError("data", "needs as many confidences and labels at every level")
    if not all(0.0 <= x <= 1.0 for r in conf_rows for x in r):
        raise InvalidArgumentError("data", "confidences must lie in [0, 1]")
    problem = _counts_problem(cals, conf_rows, ok_rows)
    if problem:  # the file would be refused on load: the records are not of this data
        raise InvalidArgumentError("data", f"is not what the calibrations were computed from: {problem}")
    fp = prompt_fingerprint(n, config) if fingerprint is None else fingerprint
    if len(fp) != 64 or any(ch not in "0123456789abcdef" for ch in fp):
        raise InvalidArgumentError("fingerprint", "must be a sha256 in lowercase hex (prompt_fingerprint(...))")
    digest = calibration_data_sha256(conf_rows, ok_rows)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": created,
        "package_version": __version__,
        "prompt_fingerprint": fp,
        "data_sha256": digest,
        "levels": [{"name": nm, "model": mid, "calibration": c.to_dict()}
                   for nm, mid, c in zip(names, ids, cals, strict=True)],
        "data": {"confidences": [list(r) for r in conf_rows],
                 "correct": [[int(x) for x in r] for r in ok_rows]},
    }
    try:
        doc["checksum"] = hashlib.sha256(_canonical(doc)).hexdigest()
        head = {k: v for k, v in doc.items() if k != "data"}
        # the header first and readable; the data on one line per level
        text = json.dumps(head, indent=2, ensure_ascii=True, allow_nan=False)[:-2]
        rows = ",\n".join(
            f'    "{key}": [\n' + ",\n".join("      " + json.dumps(r, allow_nan=False) for r in doc["data"][key])
            + "\n    ]" for key in ("confidences", "correct")
        )
    except ValueError as e:  # NaN or inf in the data
        raise InvalidArgumentError("data", f"must be finite numbers ({e})") from None
    target = Path(path)
    check_output_file(target, "path")
    atomic_write_bytes(target, (text + ',\n  "data": {\n' + rows + "\n  }\n}\n").encode("ascii"))
    return SavedCalibration(cals, names, ids, fp, digest, conf_rows, ok_rows, created, __version__,
                            os.fspath(target))


# ----------------------------------------------------------------------------- reading


def _read_bounded(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES (a FIFO, a device or a
    directory is refused before any read, so nothing blocks or runs unbounded)."""
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
        fd = os.open(path, flags)  # a symlink is refused, not followed
    except FileNotFoundError:
        raise CorruptStoreError(path, "no such file") from None
    except IsADirectoryError:
        raise CorruptStoreError(path, "is a directory, not a calibration file") from None
    except OSError as e:
        raise CorruptStoreError(path, f"cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptStoreError(path, "is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise CorruptStoreError(path, f"{st.st_size} bytes, more than a calibration file's {MAX_FILE_BYTES}")
        chunks = []
        left = MAX_FILE_BYTES + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        raw = b"".join(chunks)
    except OSError as e:
        raise CorruptStoreError(path, f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise CorruptStoreError(path, f"grew past {MAX_FILE_BYTES} bytes while being read")
    return raw


def _str_field(doc: dict[str, Any], key: str, path: Path, limit: int = 200) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or len(v) > limit:
        raise CorruptStoreError(path, f"{key}: expected a string of at most {limit} characters")
    return v


def _hex_field(doc: dict[str, Any], key: str, path: Path) -> str:
    v = _str_field(doc, key, path)
    if len(v) != 64 or any(ch not in "0123456789abcdef" for ch in v):
        raise CorruptStoreError(path, f"{key}: expected 64 lowercase hex digits")
    return v


def _data_rows(data: Any, n_levels: int, path: Path) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[bool, ...], ...]]:
    if not isinstance(data, dict) or set(data) != {"confidences", "correct"}:
        raise CorruptStoreError(path, 'data: expected {"confidences": [...], "correct": [...]}')
    confs, corr = data["confidences"], data["correct"]
    if not (isinstance(confs, list) and isinstance(corr, list) and len(confs) == len(corr) == n_levels):
        raise CorruptStoreError(path, f"data: expected one row per level ({n_levels})")
    conf_rows: list[tuple[float, ...]] = []
    ok_rows: list[tuple[bool, ...]] = []
    for i, (c, y) in enumerate(zip(confs, corr, strict=True)):
        if not (isinstance(c, list) and isinstance(y, list) and len(c) == len(y) == len(confs[0])):
            raise CorruptStoreError(path, f"data: level {i} needs as many confidences and labels as level 0")
        if not all(type(x) in (int, float) and 0.0 <= x <= 1.0 for x in c):
            raise CorruptStoreError(path, f"data.confidences[{i}]: expected numbers in [0, 1]")
        if not all(type(x) is int and x in (0, 1) for x in y):
            raise CorruptStoreError(path, f"data.correct[{i}]: expected 0 or 1")
        conf_rows.append(tuple(float(x) for x in c))
        ok_rows.append(tuple(bool(x) for x in y))
    return tuple(conf_rows), tuple(ok_rows)


def _counts_problem(
    cals: Sequence[Calibration], confs: Sequence[Sequence[float]], corr: Sequence[Sequence[bool]]
) -> str:
    """Where a level's counts are not the data's at its threshold, among the items no
    earlier level accepted (Jung's sequential rule); "" when records and data agree."""
    remaining = np.ones(len(confs[0]), dtype=np.bool_)
    for i, cal in enumerate(cals):
        conf = np.asarray(confs[i], dtype=np.float64)
        ok = np.asarray(corr[i], dtype=np.bool_)
        accepted = remaining & (conf >= cal.threshold)
        got = (int(remaining.sum()), int(accepted.sum()), int((accepted & ~ok).sum()))
        want = (cal.n_calibration, cal.n_accepted, cal.n_errors)
        if got != want:
            return f"levels[{i}]: (items, accepted, errors) = {want} but the data gives {got}"
        remaining &= ~accepted
    return ""


def load_calibration(path: str | os.PathLike[str]) -> SavedCalibration:
    """Read and verify a calibration file (any models and prompts; see
    :func:`load_calibration_for` for the checks against configured levels).

    Raises :class:`CorruptStoreError` for a file that is missing, not a regular file,
    too large, not bounded JSON, or whose fields, checksum or data digest do not hold;
    :class:`IncompatibleStoreError` for another format version.
    """
    p = Path(path)
    raw = _read_bounded(p)
    try:
        doc = untrusted_json.loads(raw, max_bytes=MAX_FILE_BYTES, max_depth=8)
    except ValueError as e:  # MalformedJSONError: the message never quotes the file
        raise CorruptStoreError(p, f"not a calibration file: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptStoreError(p, f"not a calibration file (no \"format\": \"{FORMAT}\")")
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CorruptStoreError(p, "format_version: expected an integer")
    if version > FORMAT_VERSION:
        raise IncompatibleStoreError(
            p, f"format version {version} is newer than this version's {FORMAT_VERSION}; upgrade intercascade"
        )
    if version != FORMAT_VERSION:
        raise CorruptStoreError(p, f"format_version {version} was never written")
    if set(doc) != _TOP_KEYS:
        odd = sorted(set(doc) ^ _TOP_KEYS)
        raise CorruptStoreError(p, f"unexpected or missing keys: {', '.join(k[:40] for k in odd[:4])}")
    checksum = _hex_field(doc, "checksum", p)
    body = {k: v for k, v in doc.items() if k != "checksum"}
    if hashlib.sha256(_canonical(body)).hexdigest() != checksum:
        raise CorruptStoreError(p, "checksum mismatch: the file was modified or damaged")
    levels = doc["levels"]
    if not isinstance(levels, list) or not 1 <= len(levels) <= _MAX_LEVELS:
        raise CorruptStoreError(p, f"levels: expected a list of 1 to {_MAX_LEVELS} levels")
    cals: list[Calibration] = []
    names: list[str] = []
    ids: list[str] = []
    for i, lv in enumerate(levels):
        if not isinstance(lv, dict) or set(lv) != {"name", "model", "calibration"}:
            raise CorruptStoreError(p, f"levels[{i}]: expected name, model and calibration")
        nm, mid = lv["name"], lv["model"]
        if not all(isinstance(x, str) and 0 < len(x) <= _MAX_ID_CHARS for x in (nm, mid)):
            raise CorruptStoreError(p, f"levels[{i}]: name and model must be non-empty strings")
        cal = lv["calibration"]
        if not isinstance(cal, dict):
            raise CorruptStoreError(p, f"levels[{i}].calibration: expected an object")
        try:
            cals.append(Calibration.from_dict(cal))
        except InvalidArgumentError as e:
            raise CorruptStoreError(p, f"levels[{i}].calibration.{e}") from None
        names.append(nm)
        ids.append(mid)
    confs, corr = _data_rows(doc["data"], len(cals), p)
    digest = _hex_field(doc, "data_sha256", p)
    if calibration_data_sha256(confs, corr) != digest:
        raise CorruptStoreError(p, "data_sha256 does not match the data")
    problem = _counts_problem(cals, confs, corr)
    if problem:
        raise CorruptStoreError(p, problem)
    return SavedCalibration(
        calibrations=tuple(cals),
        level_names=tuple(names),
        model_ids=tuple(ids),
        prompt_fingerprint=_hex_field(doc, "prompt_fingerprint", p),
        data_sha256=digest,
        confidences=confs,
        correct=corr,
        created_at=_str_field(doc, "created_at", p),
        package_version=_str_field(doc, "package_version", p),
        path=os.fspath(p),
    )


def calibration_mismatches(
    saved: SavedCalibration,
    *,
    model_ids: Sequence[str],
    config: CascadeConfig | None = None,
    fingerprint: str | None = None,
    alpha: float | None = None,
    delta: float | None = None,
    split_delta: bool = True,
) -> tuple[str, ...]:
    """Why ``saved`` does not fit levels with ``model_ids`` calibrated on the prompts of
    ``fingerprint`` (default: :func:`prompt_fingerprint` of ``config``), one phrase each;
    empty when it fits.
    ``alpha``/``delta`` (the configured targets; the per-level δ is δ/levels under
    ``split_delta``) are compared when given."""
    out: list[str] = []
    want = tuple(model_ids)
    if want != saved.model_ids:
        out.append(f"calibrated for models {list(saved.model_ids)}, the levels are {list(want)}")
    if fingerprint is not None:
        fp = fingerprint
    elif not 1 <= len(want) <= _MAX_LEVELS:
        return (*out, f"{len(want)} levels cannot use a calibration")
    else:
        fp = prompt_fingerprint(len(want), config)
    if fp != saved.prompt_fingerprint:
        out.append(
            f"calibrated with other prompts (fingerprint {saved.prompt_fingerprint[:12]}, this version's "
            f"{fp[:12]}; written by intercascade {saved.package_version})"
        )
    if alpha is not None:
        got = sorted({c.alpha for c in saved.calibrations})
        if got != [float(alpha)]:
            out.append(f"calibrated at alpha {', '.join(f'{a:g}' for a in got)}, configured {alpha:g}")
    if delta is not None:
        per = float(delta) / len(want) if split_delta and want else float(delta)
        got_d = sorted({c.delta for c in saved.calibrations})
        if len(got_d) != 1 or abs(got_d[0] - per) > 1e-12 * max(per, 1e-300):
            out.append(f"calibrated at delta {', '.join(f'{d:g}' for d in got_d)} per level, "
                       f"configured {per:g} per level")
    return tuple(out)


def load_calibration_for(
    path: str | os.PathLike[str],
    *,
    model_ids: Sequence[str],
    config: CascadeConfig | None = None,
    fingerprint: str | None = None,
    alpha: float | None = None,
    delta: float | None = None,
    split_delta: bool = True,
    force: bool = False,
) -> tuple[SavedCalibration, tuple[str, ...]]:
    """Load a calibration file for levels with ``model_ids`` (see
    :func:`calibration_mismatches`). A mismatch raises :class:`IncompatibleStoreError`
    naming it, unless ``force``; the mismatches overridden are returned with the file."""
    saved = load_calibration(path)
    problems = calibration_mismatches(saved, model_ids=model_ids, config=config, fingerprint=fingerprint,
                                      alpha=alpha, delta=delta, split_delta=split_delta)
    if problems and not force:
        raise IncompatibleStoreError(path, "; ".join(problems) + " (recalibrate, or force its use: --force, force=True)")
    return saved, problems
