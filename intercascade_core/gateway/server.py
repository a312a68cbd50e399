"""``intercascade serve``: build the gateway and run it on uvicorn until SIGTERM/SIGINT.

Two ways to start:

* ``--demo``: the simulated cascade (:mod:`.demo`), calibrated at start-up, with MiniLM
  and a durable repository in ``--store DIR`` (default: a temporary folder removed at exit);
* ``--config F --calibration FILE --store DIR``: the configured endpoints (as ``intercascade
  run`` reads them), with the thresholds saved by ``calibrate --save`` or
  ``run --save-calibration`` (refused if they were made for other models or prompts).

Stopping: on SIGTERM or SIGINT the server stops accepting connections, lets the requests
in flight finish (each is bounded by the deadline), drains and checkpoints the repository,
saves the audit and exits with status 0. Starting again on the same ``--store`` serves the
same strategies.

Exposure: without ``--keys`` the server has no authentication, so it binds only to a
loopback address and refuses any other ``--host``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

from ..core.calibrate import Calibration
from ..core.cascade import CascadeConfig, Level
from ..core.protocols import Embedder
from ..errors import UsageError
from ..lab.evaluate import make_embedder
from ..service import Cascade
from ..storage.journal import Fsync
from .audit import AuditBook
from .batching import EmbedBatcher
from .engine import AsyncLevel, Gateway
from .keys import KeyRing, load_keys

__all__ = ["ServeOptions", "build_gateway", "check_host", "run"]

log = logging.getLogger("intercascade.gateway")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What ``intercascade serve`` was asked for (see ``intercascade serve --help``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    keys: Path | None = None
    demo: bool = False
    config: Path | None = None
    calibration: Path | None = None
    store: Path | None = None
    embedder: Literal["minilm", "hashing"] | None = None  # None: minilm, or the config's
    batching: bool = True
    batch_max: int = 32
    batch_wait_ms: float = 2.0
    deadline_s: float = 60.0
    fsync: Fsync = "always"
    audit_delta: float = 0.05
    audit_every: int = 10
    seed: int = 0
    access_log: bool = False


def check_host(host: str, keys: KeyRing | None) -> None:
    """Refuse a non-loopback address when there are no keys (module docstring)."""
    if keys is not None:
        return
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(
            f"refusing to listen on {host!r} without --keys: with no API keys anyone who "
            "can reach the port could use the cascade and read its answers. Pass --keys FILE "
            "(lines 'SHA256(key) tenant') or bind a loopback address (127.0.0.1, ::1)"
        )


@dataclass(frozen=True, slots=True)
class _Parts:
    """What a gateway is built from (by :func:`_demo_parts` or :func:`_config_parts`)."""

    levels: Sequence[Level]
    async_levels: Sequence[AsyncLevel]
    calibrations: Sequence[Calibration]
    config: CascadeConfig
    embedder: Embedder
    what: str


def _demo_parts(options: ServeOptions) -> _Parts:
    from ..models.sim import SimBackend
    from .demo import demo_async_levels, demo_calibration, demo_config, demo_levels

    backend = SimBackend(seed=options.seed)
    levels = demo_levels(backend)
    config = demo_config()
    cals = demo_calibration(levels, config=config)
    return _Parts(levels, demo_async_levels(backend), cals, config,
                  make_embedder(options.embedder or "minilm"),
                  "the simulated demo cascade (calibrated at start-up)")


def _config_parts(options: ServeOptions) -> _Parts:
    """The configured endpoints (``intercascade run``'s config) as sync and async levels,
    with the saved calibration, refused (exit 2) if made for other models, prompts or
    (alpha, delta)."""
    import httpx

    from ..errors import StoreError
    from ..lab.config import load_config
    from ..lab.evaluate import make_levels
    from ..models.async_chat import AsyncChatModel
    from ..models.chat import Price
    from ..models.sim import SimBackend
    from ..storage.calibration_file import load_calibration_for

    if options.config is None or options.calibration is None:
        raise UsageError("serve needs --demo, or --config FILE with --calibration FILE")
    cfg = load_config(options.config)
    config = CascadeConfig(policy=cfg.cascade.policy, k=cfg.cascade.k,  # type: ignore[arg-type]
                           backend=cfg.cascade.backend, seed=cfg.cascade.seed)
    try:
        saved, _ = load_calibration_for(
            options.calibration, model_ids=[m.model for m in cfg.models], config=config,
            alpha=cfg.cascade.alpha, delta=cfg.cascade.delta,
            split_delta=cfg.cascade.split_delta,
        )
    except StoreError as e:  # the file named on the command line does not fit: exit 2
        raise UsageError(str(e)) from None
    if (note := saved.unguaranteed_note()) is not None:
        log.warning("%s: %s", options.calibration, note)
    backend = SimBackend(seed=cfg.cascade.seed)  # for levels whose base_url is sim:<level>
    levels = make_levels(cfg.models, sim_client=httpx.Client(transport=backend.transport()))
    sim_async = httpx.AsyncClient(transport=httpx.MockTransport(backend.handler()))
    async_levels = []
    for m, lv in zip(cfg.models, levels, strict=True):
        price = (Price(m.price_input, m.price_output)
                 if m.price_input is not None and m.price_output is not None else None)
        span: Literal["all", "answer"] = "answer" if m.confidence_span == "answer" else "all"
        if m.simulated:
            model = AsyncChatModel("http://sim.invalid/v1", m.model, client=sim_async,
                                   price=price, confidence_span=span)
        else:  # make_levels has checked the URL and that the key's variable is set
            key = os.environ.get(m.api_key_env) if m.api_key_env else None
            model = AsyncChatModel(m.base_url, m.model, api_key=key, timeout=m.timeout,
                                   max_retries=m.max_retries, price=price, confidence_span=span)
        async_levels.append(AsyncLevel(model, name=lv.name, params=lv.params))
    ec = cfg.embedder
    embedder = make_embedder(options.embedder or ec.kind, ec.model_path, ec.tokenizer_path, ec.precision)
    return _Parts(levels, async_levels, saved.calibration_run().calibrations, config, embedder,
                  f"{cfg.source} with the calibration {options.calibration}")


def build_gateway(options: ServeOptions, store: Path) -> tuple[Gateway, str]:
    """The gateway of ``options`` over the durable store ``store``, and what it serves."""
    parts = _demo_parts(options) if options.demo else _config_parts(options)
    embedder, calibrations = parts.embedder, list(parts.calibrations)
    cascade = Cascade(parts.levels, embedder, calibrations=calibrations, config=parts.config,
                      store=store, fsync=options.fsync)
    try:
        batcher = EmbedBatcher(embedder, max_batch=options.batch_max,
                               max_wait_s=options.batch_wait_ms / 1000.0, enabled=options.batching)
        audit = AuditBook(calibrations, delta=options.audit_delta, every=options.audit_every,
                          path=store)
        gateway = Gateway(cascade, parts.async_levels, batcher, audit,
                          deadline_s=options.deadline_s)
    except BaseException:
        cascade.close(checkpoint=False)
        raise
    thresholds = ", ".join(
        f"{lv.name} {c.threshold:.4f}" for lv, c in zip(parts.levels, calibrations, strict=True)
    )
    return gateway, f"{parts.what}; thresholds {thresholds}; embedder {embedder.model_id}"


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until the app is ready
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(options: ServeOptions, *, ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (module docstring); ``ready`` gets one line naming the
    base URL once requests are served."""
    import uvicorn

    from .app import create_app

    keys = load_keys(options.keys) if options.keys is not None else None
    check_host(options.host, keys)
    if not options.demo and options.store is None:
        raise UsageError("--store DIR is required with --config (the durable repository)")
    temporary = options.store is None
    store = Path(tempfile.mkdtemp(prefix="intercascade-serve-")) if temporary else options.store
    assert store is not None
    try:
        sock = _listen(options.host, options.port)
        try:
            gateway, what = build_gateway(options, store)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in str(host) else host
            line = (f"intercascade serve: listening on http://{shown}:{port}/v1 ({what}; "
                    f"store {store}{' (temporary)' if temporary else ''}; "
                    f"{'keys ' + str(options.keys) if keys else 'no keys: loopback only'})")

            def on_ready() -> None:
                for level, alarm in gateway.audit.alarms():
                    log.warning("level %d (%s) is under a risk alarm from an earlier run "
                                "(since label %d): it defers until a new calibration",
                                level, gateway.names[level], alarm.n_labels)
                if ready is not None:
                    ready(line)

            app = create_app(gateway, keys=keys, on_ready=on_ready)
            config = uvicorn.Config(
                app, log_config=None, access_log=options.access_log, lifespan="on",
                timeout_graceful_shutdown=int(options.deadline_s) + 5, server_header=False,
            )
            server = uvicorn.Server(config)

            def stop(sig: int, frame: FrameType | None) -> None:
                # also what uvicorn re-raises after its graceful shutdown: exit 0, not -15
                server.should_exit = True

            previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                server.run(sockets=[sock])
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)
            if not server.started:
                raise UsageError("the server did not start (see the log above)")
        finally:
            sock.close()
    finally:
        if temporary:
            shutil.rmtree(store, ignore_errors=True)


def setup_logging(*, access: bool = False, quiet: bool = False) -> None:
    """One line per event on stderr: start-up, alarms, shutdown, unexpected errors (with
    their incident id); with ``access``, one line per request; ``quiet``: warnings only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    names = ["intercascade", "uvicorn.error"] + (["uvicorn.access"] if access else [])
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
        logger.propagate = False
