"""The gateway's online risk audit: labels from ``POST /v1/feedback``, one audit per level.

Every level but the last accepts answers under a calibrated threshold, promising
``P(wrong | accepted) <= α``. Feedback on an answer accepted at level ``i`` is one label for
level ``i``'s audit (:func:`~intercascade_core.core.audit.observe`: a sequential test whose
false alarms over the whole stream stay below ``δ``). When it raises its alarm, that level
stops accepting (:func:`~intercascade_core.core.audit.apply_alarm`: its threshold becomes
infinite, so every query is deferred past it) until a **new calibration**: the book is
kept in ``audit.json`` in the store, keyed by a fingerprint of the calibrations, so a
restart with the same calibration keeps the alarm and a different calibration starts a
fresh audit.

The guarantee assumes labels arrive for a sample of accepted answers that does not depend
on whether they were right; feedback sent mostly for wrong answers raises the alarm sooner.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.audit import AuditConfig, AuditState, RiskAlarm, init_audit, observe
from ..core.calibrate import Calibration
from ..errors import CorruptStoreError
from ..storage.store import atomic_write_bytes

__all__ = ["AUDIT_FILE", "AuditBook", "calibration_fingerprint"]

AUDIT_FILE = "audit.json"
_MAX_FILE_BYTES = 1 << 20


def calibration_fingerprint(calibrations: Sequence[Calibration]) -> str:
    """A hash of what identifies a calibration: per level, its threshold and the data
    summary it was certified on."""
    parts = [
        [repr(c.threshold), repr(c.alpha), repr(c.delta), c.n_calibration, c.n_accepted,
         c.n_errors, c.grid_rule, c.min_n]
        for c in calibrations
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _to_state(d: dict[str, Any]) -> AuditState:
    config = AuditConfig(**d["config"])
    alarm = None if d["alarm"] is None else RiskAlarm(**d["alarm"])
    rest = {k: v for k, v in d.items() if k not in ("config", "alarm", "recent")}
    return AuditState(config=config, alarm=alarm, recent=tuple(bool(x) for x in d["recent"]), **rest)


class AuditBook:
    """One :class:`AuditState` per non-final level (thread-safe); see the module docstring.

    ``delta`` is each level's false-alarm budget, ``every`` the labels between checkpoints;
    ``alpha`` is the level's calibrated α. ``path`` (the store folder) keeps the book.
    """

    def __init__(
        self,
        calibrations: Sequence[Calibration],
        *,
        delta: float = 0.05,
        every: int = 10,
        path: str | Path | None = None,
    ) -> None:
        cals = tuple(calibrations)
        self.fingerprint = calibration_fingerprint(cals)
        self._file = None if path is None else Path(path) / AUDIT_FILE
        self._lock = threading.Lock()
        fresh = [
            init_audit(AuditConfig(alpha=c.alpha, delta=delta, every=every, action="defer_all"))
            for c in cals[:-1]
        ]
        self._states = fresh
        self.restored = False
        if self._file is not None and self._file.exists():
            saved = self._read()
            if saved is not None:
                self._states = saved
                self.restored = True

    def _read(self) -> list[AuditState] | None:
        """The saved states if they belong to this calibration (else None: a new one)."""
        assert self._file is not None
        try:
            with open(self._file, "rb") as f:
                raw = f.read(_MAX_FILE_BYTES + 1)
            if len(raw) > _MAX_FILE_BYTES:
                raise ValueError(f"larger than {_MAX_FILE_BYTES} bytes")
            doc = json.loads(raw)
            if doc.get("fingerprint") != self.fingerprint:
                return None
            states = [_to_state(d) for d in doc["levels"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptStoreError(
                self._file, f"not a readable audit book ({type(e).__name__}); move it away "
                "to start a fresh audit"
            ) from None
        if len(states) != len(self._states):
            return None
        return states

    def save(self) -> None:
        """Write the book atomically (no-op without a path)."""
        if self._file is None:
            return
        with self._lock:
            doc = {
                "fingerprint": self.fingerprint,
                "levels": [dataclasses.asdict(s) for s in self._states],
            }
        atomic_write_bytes(self._file, json.dumps(doc).encode())

    @property
    def states(self) -> tuple[AuditState, ...]:
        with self._lock:
            return tuple(self._states)

    def alarms(self) -> tuple[tuple[int, RiskAlarm], ...]:
        """The levels whose audit has raised its alarm, with the alarm."""
        return tuple((i, s.alarm) for i, s in enumerate(self.states) if s.alarm is not None)

    def observe(self, level: int, correct: bool) -> tuple[AuditState, RiskAlarm | None]:
        """Feed one label to ``level``'s audit; returns its state and a new alarm, if any."""
        with self._lock:
            state, alarm = observe(self._states[level], correct)
            self._states[level] = state
        self.save()
        return state, alarm
