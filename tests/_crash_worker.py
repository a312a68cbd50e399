"""Helpers for the service tests and the SIGKILL test's worker process.

Run as a script (``python tests/_crash_worker.py STORE_DIR``) it serves a deterministic
simulated stream through a durable :class:`~intercascade_core.service.Cascade`, one query
at a time, and prints ``done <index> <repository size>`` after each commit (flushed), so
the parent knows what was durably committed before it kills the process. At the end of
the stream it prints ``finished`` and sleeps, so it is always killed mid-run or idle.
"""

from __future__ import annotations

import sys
import time

import httpx

from intercascade_core.core.calibrate import Calibration
from intercascade_core.core.cascade import CascadeConfig, Level
from intercascade_core.models.chat import ChatModel
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import SimBackend, templated_math_stream
from intercascade_core.service import Cascade

DIM = 64
WEAK_THRESHOLD = 0.9
STRONG_THRESHOLD = 0.5


def fixed_calibration(threshold: float) -> Calibration:
    """A calibration record with a fixed threshold (the tests do not need FST here)."""
    return Calibration(
        threshold=threshold,
        alpha=0.1,
        delta=0.1,
        n_calibration=0,
        n_accepted=0,
        n_errors=0,
        risk_bound=1.0,
        grid_rule="fixed",
        min_n=0,
        abstained=False,
        guaranteed=False,
        on_fail="jung",
        n_tested=0,
        note="fixed threshold for tests",
    )


def sim_levels(seed: int = 0) -> tuple[list[Level], httpx.Client]:
    backend = SimBackend(seed=seed)
    client = httpx.Client(transport=httpx.MockTransport(backend.handler()))
    levels = [
        Level(ChatModel("http://sim.invalid/v1", "sim-weak", client=client, max_retries=0), "weak"),
        Level(
            ChatModel("http://sim.invalid/v1", "sim-strong", client=client, max_retries=0), "strong"
        ),
    ]
    return levels, client


def make_cascade(
    store: str | None = None, *, seed: int = 0, **kw: object
) -> tuple[Cascade, httpx.Client]:
    levels, client = sim_levels(seed)
    cascade = Cascade(
        levels,
        HashingEmbedder(dim=DIM, seed=seed),
        calibrations=[fixed_calibration(WEAK_THRESHOLD), fixed_calibration(STRONG_THRESHOLD)],
        config=kw.pop("config", CascadeConfig(policy="retrieval", k=2, backend="numpy")),  # type: ignore[arg-type]
        store=store,
        **kw,  # type: ignore[arg-type]
    )
    return cascade, client


def stream(n: int, seed: int = 7) -> tuple:
    return templated_math_stream(n, n_templates=12, seed=seed)


def main(argv: list[str]) -> int:
    store = argv[1]
    n = int(argv[2]) if len(argv) > 2 else 400
    checkpoint_every = int(argv[3]) if len(argv) > 3 else 7
    cascade, _client = make_cascade(store, checkpoint_every=checkpoint_every)
    for q in stream(n):
        out = cascade.ask(q)
        print(f"done {out.index} {len(cascade.state.repositories[0])}", flush=True)
    print("finished", flush=True)
    while True:  # stay alive until killed: the kill always lands mid-run or idle
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
