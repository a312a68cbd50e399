"""Simulator outcomes are pinned: a refactor of the cascade must leave every one identical.

``fixtures/outcome_pin.json`` holds, per scenario, every field of every
:class:`Outcome` (latency excluded) and the final state's counters, as first computed
by the cascade before it became a sans-I/O machine. Regenerate only for an intended
change of behaviour: ``python tests/test_outcome_pin.py --regen``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from intercascade_core.core.cascade import CascadeConfig, Level, calibrate_levels, run_stream
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import Faults, SimBackend, templated_math_stream

PIN = Path(__file__).parent / "fixtures" / "outcome_pin.json"

# name -> (levels, config, faults). Every config names its strategy mode and store rule (the
# ones the pin was computed with), so a change of the defaults does not change the pin.
_PINNED = {"strategy_mode": "two_call", "store_rule": "strict"}
_PINNED_SINGLE = {"strategy_mode": "single_call", "store_rule": "strict"}
SCENARIOS: dict[str, tuple[tuple[str, ...], dict[str, Any], dict[str, Any]]] = {
    "jung": (("sim-weak", "sim-strong"), {"policy": "jung", **_PINNED}, {}),
    "random": (("sim-weak", "sim-strong"), {"policy": "random", "seed": 3, **_PINNED}, {}),
    "retrieval": (("sim-weak", "sim-strong"), {"policy": "retrieval", "k": 2, **_PINNED}, {}),
    "retrieval-numpy-k3": (
        ("sim-weak", "sim-strong"), {"k": 3, "backend": "numpy", **_PINNED}, {},
    ),
    "single-call": (("sim-weak", "sim-strong"), dict(_PINNED_SINGLE), {}),
    "three-levels-previous": (
        ("sim-weak", "sim-mid", "sim-strong"), {"teach": "previous", "k": 2, **_PINNED}, {},
    ),
    "three-levels-all": (("sim-weak", "sim-mid", "sim-strong"), {"k": 1, **_PINNED}, {}),
    "tenant": (("sim-weak", "sim-strong"), {"tenant": "acme", **_PINNED}, {}),
    "faults": (
        ("sim-weak", "sim-strong"),
        {"policy": "retrieval", **_PINNED},
        {"rate_500": 0.05, "rate_malformed": 0.05, "rate_missing_logprobs": 0.03},
    ),
}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != "latency_s"
        }
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def compute(name: str) -> dict[str, Any]:
    names, config, faults = SCENARIOS[name]
    backend = SimBackend(seed=7, faults=Faults(**faults)) if faults else SimBackend(seed=7)
    with httpx.Client(transport=backend.transport()) as client:
        levels = [
            Level(ChatModel("http://sim/v1", n, client=client, sleep=lambda s: None, max_retries=1))
            for n in names
        ]
        # the pin was computed with strategy-free calibration prompts for every level
        cal = calibrate_levels(
            templated_math_stream(240, n_templates=8, seed=11), levels, alpha=0.25, delta=0.1,
            config=CascadeConfig(policy="jung"),
        )
        result = run_stream(
            templated_math_stream(120, n_templates=8, seed=12),
            levels,
            HashingEmbedder(dim=32),
            calibrations=cal.calibrations,
            config=CascadeConfig(**config),
            progress=False,
        )
    st = result.state
    return {
        "thresholds": [c.threshold for c in cal.calibrations],
        "outcomes": [_jsonable(o) for o in result.outcomes],
        "state": {
            "rng_counter": st.rng_counter,
            "n_queries": st.n_queries,
            "calls": list(st.calls),
            "accepted": list(st.accepted),
            "n_discarded": st.n_discarded,
            "n_failed_calls": st.n_failed_calls,
            "n_stored": st.n_stored,
            "n_rejected_strategies": st.n_rejected_strategies,
            "repository_sizes": [len(r) for r in st.repositories],
            "stored_queries": [[e.query for e in r.entries] for r in st.repositories],
        },
    }


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_outcomes_equal_the_pin(name: str) -> None:
    pinned = json.loads(PIN.read_text())[name]
    now = json.loads(json.dumps(compute(name)))  # same float/tuple normalisation as the pin
    assert now["thresholds"] == pinned["thresholds"]
    assert now["state"] == pinned["state"]
    assert len(now["outcomes"]) == len(pinned["outcomes"])
    for got, want in zip(now["outcomes"], pinned["outcomes"], strict=True):
        assert got == want, f"outcome {want['index']} ({want['query_id']}) changed"


def test_the_pin_covers_every_path() -> None:
    # the scenarios exercise acceptance at each level, deferral, discards, teaching and failures
    pin = json.loads(PIN.read_text())
    kinds = {o["status"] + str(o["level"]) for s in pin.values() for o in s["outcomes"]}
    assert {"accepted0", "accepted1", "accepted2", "discardedNone"} <= kinds
    assert any(o["failures"] != [None] * len(o["failures"]) for o in pin["faults"]["outcomes"])
    assert all(pin[s]["state"]["n_stored"] > 0 for s in pin if s != "jung")
    assert any(o["strategies"][0] for o in pin["retrieval"]["outcomes"])


if __name__ == "__main__" and sys.argv[1:] == ["--regen"]:
    PIN.write_text(json.dumps({n: compute(n) for n in sorted(SCENARIOS)}, indent=None) + "\n")
    print(f"wrote {PIN}")
