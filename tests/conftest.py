"""Shared test configuration.

Hypothesis runs derandomized (a fixed seed per test), so every run of the suite
explores the same examples and a failure reproduces.
"""

import importlib
import inspect
import os
from types import CodeType, ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# llama.cpp / onnxruntime worker threads must not spin-wait on this 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ----------------------------------------------------------------------------- exact implementations
# backend="exact" has two implementations: the C extension and, when it is missing,
# its numpy twin. Every test that calls ``retrieve`` (itself, or through a function or
# class of its module) runs once with each (the twin by setting the module's
# extension handle to None), so the fallback is tested as thoroughly as the
# extension. Tests about the extension itself (marked ``needs_ext``, or using the
# ``simd`` fixture, the extension module) run once, with it.
EXACT_IMPLS = ("c", "numpy")


def _retrieve_module() -> ModuleType:
    # the module, by name: ``intercascade_core.retrieve`` is the function of the same name
    return importlib.import_module("intercascade_core.core.retrieve")


def _names(code: CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _names(const)
    return names


def _calls_retrieve(obj: Any, module: ModuleType, seen: set[int]) -> bool:
    """Whether ``obj`` (a test function, or a function or class of the test's module)
    names ``retrieve``, directly or through other functions and classes of the module."""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    obj = inspect.unwrap(obj)
    obj = getattr(getattr(obj, "hypothesis", None), "inner_test", obj)  # a @given test
    if inspect.isclass(obj):
        return any(
            _calls_retrieve(v, module, seen) for v in vars(obj).values() if inspect.isfunction(v)
        )
    if not inspect.isfunction(obj):
        return False
    names = _names(obj.__code__)
    if "retrieve" in names:
        return True
    local = vars(module)
    return any(
        _calls_retrieve(local[n], module, seen)
        for n in names
        if getattr(local.get(n), "__module__", None) == module.__name__
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (
        "exact_impl" in metafunc.fixturenames
        and "simd" not in metafunc.fixturenames
        and metafunc.definition.get_closest_marker("needs_ext") is None
        and _calls_retrieve(metafunc.function, metafunc.module, set())
    ):
        metafunc.parametrize("exact_impl", EXACT_IMPLS, indirect=True)


@pytest.fixture(autouse=True)
def exact_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Which implementation backs backend="exact" in this test ("c", "numpy"), or None
    for tests that are not parametrized over it (they get whatever is loaded)."""
    which: str | None = getattr(request, "param", None)
    mod = _retrieve_module()
    if which == "c" and mod._ext is None:
        pytest.skip("C extension not built or disabled (INTERCASCADE_NO_EXT=1)")
    if which == "numpy":
        monkeypatch.setattr(mod, "_ext", None)
    return which


# ----------------------------------------------------------------------------- shared helpers
@pytest.fixture(scope="session")
def misleading_teacher() -> Any:
    """The factory below, for tests (a fixture, since ``conftest`` is no importable module
    once a second test folder, ``examples/``, has one too)."""
    return _misleading_teacher


def _misleading_teacher(seed: int = 3) -> Any:
    """A simulator whose strong model is confidently wrong 15 % of the time and whose weak
    model copies a shown strategy's answer 60 % of the time with raised confidence: the
    world where strategies break a strategy-free calibration (in-situ and audit tests)."""
    from intercascade_core.models.sim import DEFAULT_PROFILES, SimProfile
    from intercascade_core.models.sim_copying import CopyingSimBackend

    profiles = dict(DEFAULT_PROFILES)
    profiles["sim-strong"] = SimProfile(0.85, 0.2, 0.9, wrong_conf=(0.5, 0.95, 1.0))
    return CopyingSimBackend(seed=seed, profiles=profiles, copy_rate=0.6, copy_conf=(0.8, 0.97, 1.0))


@pytest.fixture(scope="session")
def jung_fallback_copy() -> Any:
    """``copy(src, dst)``: a calibration file like ``src`` (same models, levels, prompts and
    settings) whose weak level is Jung's fallback: its labels are flipped, so the first test
    fails, and it is calibrated with ``on_fail="jung"`` as ``calibrate --on-fail jung`` does."""
    return _jung_fallback_copy


def _jung_fallback_copy(src: Any, dst: Any) -> None:
    from intercascade_core.core.calibrate import calibrate_cascade
    from intercascade_core.storage.calibration_file import load_calibration, save_calibration

    saved = load_calibration(src)
    first = saved.calibrations[0]
    correct = [[not ok for ok in saved.correct[0]], *saved.correct[1:]]
    cals = calibrate_cascade(saved.confidences, correct, alpha=first.alpha, delta=first.delta * len(saved.calibrations),
                             split_delta=True, min_n=first.min_n, on_fail="jung")
    assert not cals[0].guaranteed and cals[0].note.startswith("first test failed"), cals[0]
    save_calibration(dst, cals, model_ids=saved.model_ids, level_names=saved.level_names,
                     data=(saved.confidences, correct), fingerprint=saved.prompt_fingerprint)
