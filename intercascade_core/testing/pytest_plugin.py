"""Pytest fixtures and a marker for guarantee checks. Enable it in your root
``conftest.py``::

    pytest_plugins = ["intercascade_core.testing.pytest_plugin"]

It is not registered automatically (no ``pytest11`` entry point): the plugin needs the
``testing`` extra, and an entry point in the base package would load it, and fail, in
every pytest run of an environment that has intercascade without that extra.

* marker ``statistical`` — seeded repeated-experiment tests (select or skip them with
  ``-m statistical`` / ``-m "not statistical"``);
* fixture ``intercascade_seed`` — one integer that seeds numpy's global generator,
  Python's ``random`` and this test's Hypothesis run. By default it is derived from the
  test's id (stable across runs, like a derandomized Hypothesis profile);
  ``--intercascade-seed=N`` fixes it, ``--intercascade-seed=random`` draws a fresh one.
  A failing test prints it, with the option that reproduces the run. In a ``@given``
  test request it with ``@pytest.mark.usefixtures("intercascade_seed")``: Hypothesis
  rejects function-scoped fixtures among a ``@given`` test's arguments;
* fixture ``intercascade_rng`` — ``numpy.random.default_rng(intercascade_seed)``;
* fixture ``sim_cascade`` — deterministic simulated levels (weak, strong) over
  ``httpx.MockTransport`` (:func:`~intercascade_core.testing.simulated_levels`); pass
  other arguments by indirect parametrisation, e.g.
  ``@pytest.mark.parametrize("sim_cascade", [{"models": ("sim-weak", "sim-mid")}],
  indirect=True)``.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np

from ..errors import DependencyMissingError

try:
    import hypothesis
    import pytest
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise DependencyMissingError(
        "intercascade_core.testing.pytest_plugin needs hypothesis and pytest: "
        "pip install 'intercascade[testing]'"
    ) from exc

from .simulated import SimCascade, simulated_levels

__all__ = [
    "intercascade_rng",
    "intercascade_seed",
    "pytest_addoption",
    "pytest_configure",
    "pytest_runtest_makereport",
    "sim_cascade",
]

_SEED_KEY = pytest.StashKey[int]()
_SPEC_KEY = pytest.StashKey[int | str | None]()
_OPTION = "--intercascade-seed"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("intercascade").addoption(
        _OPTION,
        dest="intercascade_seed",
        default=None,
        metavar="N|random",
        help="seed of the intercascade_seed fixture: an integer for every test, or "
        "'random' for a fresh one per test (default: derived from the test id)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "statistical: seeded repeated-experiment tests of a statistical guarantee"
    )
    # getoption's default covers a plugin registered after option parsing (a test
    # module's pytest_plugins), where the option was never added
    spec = config.getoption("intercascade_seed", default=None)
    if spec is not None and spec != "random":
        try:
            value = int(spec)
        except ValueError:
            raise pytest.UsageError(f"{_OPTION} expects an integer or 'random', got {spec!r}") from None
        if not 0 <= value < 2**32:
            raise pytest.UsageError(f"{_OPTION} must lie in [0, 2**32), got {value}")
        spec = value
    config.stash[_SPEC_KEY] = spec


def _seed_for(request: pytest.FixtureRequest) -> int:
    spec = request.config.stash.get(_SPEC_KEY, None)
    if spec is None:  # stable per test, like a derandomized Hypothesis profile
        digest = hashlib.blake2b(request.node.nodeid.encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little")
    if spec == "random":
        return secrets.randbits(32)
    return int(spec)


@pytest.fixture
def intercascade_seed(request: pytest.FixtureRequest) -> Iterator[int]:
    """One seed for numpy, ``random`` and Hypothesis, printed when the test fails."""
    value = _seed_for(request)
    request.node.stash[_SEED_KEY] = value
    test = getattr(request.function, "__func__", request.function)
    if getattr(test, "is_hypothesis_test", False):
        hypothesis.seed(value)(test)
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(value)
    random.seed(value)
    try:
        yield value
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


@pytest.fixture
def intercascade_rng(intercascade_seed: int) -> np.random.Generator:
    """A numpy Generator seeded with :func:`intercascade_seed`."""
    return np.random.default_rng(intercascade_seed)


@pytest.fixture
def sim_cascade(request: pytest.FixtureRequest) -> Iterator[SimCascade]:
    """Simulated cascade levels over ``httpx.MockTransport`` (no network)."""
    kwargs: dict[str, Any] = dict(getattr(request, "param", None) or {})
    with simulated_levels(**kwargs) as sim:
        yield sim


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    value = item.stash.get(_SEED_KEY, None)
    if value is not None and report.failed:
        report.sections.append(
            ("intercascade seed", f"intercascade_seed = {value}; reproduce with {_OPTION}={value}")
        )
    return report
