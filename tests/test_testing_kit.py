"""The public testing kit (intercascade_core.testing): samplers with exact risk, the
guarantee check, the Hypothesis strategies and the pytest plugin.

The repeated-experiment tests here are seeded; each states the probability that it
fails by chance (for a random seed) and, where it must catch a broken calibrator, the
power of the check against that calibrator.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from scipy import stats

from intercascade_core import Calibration, calibrate, calibrate_levels, run_stream
from intercascade_core.core.repository import NORM_TOLERANCE
from intercascade_core.errors import DependencyMissingError, InvalidArgumentError
from intercascade_core.testing import (
    FinitePopulation,
    GuaranteeCheck,
    KnownRiskModel,
    binomial_allowance,
    check_guarantee,
    detection_power,
    empirical_risk_threshold,
    simulated_levels,
)
from intercascade_core.testing import strategies as ks

pytest_plugins = ["pytester"]

GRID = np.linspace(0, 1, 201)
ALPHA, DELTA = 0.1, 0.05
# R(λ) = 0.02 + 0.2 (1 − λ) on uniform confidences: α = 0.1 is met from λ = 0.6 up
WORLD = KnownRiskModel(wrong_base=0.02, wrong_slope=0.4)


def _calibrate(conf: np.ndarray, ok: np.ndarray, *, alpha: float, delta: float) -> Calibration:
    return calibrate(conf, ok, alpha=alpha, delta=delta, grid=GRID)


def _four_times_delta(conf: np.ndarray, ok: np.ndarray, *, alpha: float, delta: float) -> Calibration:
    """A realistic bug: the level spends 4δ (as if δ were not split over 4 levels)."""
    return calibrate(conf, ok, alpha=alpha, delta=4 * delta, grid=GRID)


# ------------------------------------------------------------------ samplers with exact risk


def test_known_risk_model_closed_form_on_uniform_confidences() -> None:
    lam = np.linspace(0, 0.999, 50)
    np.testing.assert_allclose(KnownRiskModel().risk(lam), 0.1 + 0.25 * (1 - lam), atol=1e-12)
    np.testing.assert_allclose(KnownRiskModel().coverage(lam), 1 - lam, atol=1e-12)
    assert KnownRiskModel().risk([math.inf, 1.5]).tolist() == [0.0, 0.0]  # nothing accepted


@settings(max_examples=25)
@given(model=ks.risk_models(), lam=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9]))
def test_known_risk_model_agrees_with_its_own_draws(model: KnownRiskModel, lam: float) -> None:
    """Empirical risk and coverage of 200,000 draws lie within 5 standard errors of the
    closed form (ties, mixtures and inverted error curves included). Each comparison
    fails by chance with probability about 6e-7; 25 examples x 2 comparisons keep the
    test's false-failure probability below 3e-5."""
    conf, ok = model.draw(np.random.default_rng(0), 200_000)
    accepted = conf >= lam
    p = float(model.coverage(lam))
    assert abs(accepted.mean() - p) <= 5 * math.sqrt(p * (1 - p) / conf.size) + 1e-12
    if accepted.sum() >= 1000:
        r = float(model.risk(lam))
        emp = float((~ok[accepted]).mean())
        assert abs(emp - r) <= 5 * math.sqrt(r * (1 - r) / accepted.sum()) + 1e-12


@given(data=ks.labelled_confidences(), lam=st.floats(-0.5, 1.5))
def test_finite_population_risk_is_the_pools_error_rate(data: tuple[np.ndarray, np.ndarray], lam: float) -> None:
    conf, ok = data
    pool = FinitePopulation(conf, ok)
    accepted = conf >= lam
    expected = float((~ok[accepted]).mean()) if accepted.any() else 0.0
    assert float(pool.risk(lam)) == pytest.approx(expected, abs=1e-12)
    assert float(pool.coverage(lam)) == pytest.approx(accepted.mean())
    drawn_conf, drawn_ok = pool(np.random.default_rng(1), 50)
    pairs = set(zip(conf.tolist(), ok.tolist(), strict=True))
    assert set(zip(drawn_conf.tolist(), drawn_ok.tolist(), strict=True)) <= pairs
    assert not pool.confidences.flags.writeable


def test_known_risk_model_rejects_impossible_worlds() -> None:
    with pytest.raises(InvalidArgumentError) as e:
        KnownRiskModel(wrong_base=0.9, wrong_slope=0.5)  # P(wrong | c=0) = 1.4
    assert e.value.argument == "wrong_slope"
    for comps in [(), ((1.0, 0.0, 1.0),), ((0.0, 1.0, 1.0),), ((1.0, 1.0),)]:
        with pytest.raises(InvalidArgumentError) as e:
            KnownRiskModel(components=comps)  # type: ignore[arg-type]
        assert e.value.argument == "components"
    with pytest.raises(InvalidArgumentError) as e:
        KnownRiskModel(levels=1)
    assert e.value.argument == "levels"
    with pytest.raises(InvalidArgumentError) as e:
        FinitePopulation([0.5, 1.2], [True, False])
    assert e.value.argument == "confidences"


# ------------------------------------------------------------------ the guarantee check


@pytest.mark.statistical
def test_check_passes_calibrate() -> None:
    """``calibrate`` meets (α, δ), so this check fails for at most a 1e-6 share of seeds
    (allowance 149 of 2000 at δ = 0.05). Seed 3: 26 violations."""
    check = check_guarantee(WORLD, n=1000, alpha=ALPHA, delta=DELTA, trials=2000, seed=3, calibrator=_calibrate)
    assert check.passed, check.summary()
    assert check.allowance == int(stats.binom.ppf(1 - 1e-6, 2000, DELTA)) == 149
    assert check.risk_source == "exact" and check.estimate_size == 0
    assert len(check.thresholds) == len(check.true_risks) == 2000
    chosen = np.isfinite(check.thresholds)
    assert check.abstentions == int((~chosen).sum())
    assert check.violations == int((np.asarray(check.true_risks)[chosen] > ALPHA).sum())


@pytest.mark.statistical
def test_check_catches_a_calibrator_that_spends_too_much_delta() -> None:
    """A calibrator that tests at 4δ violates in about 11.4% of runs (measured over
    20,000 runs with other seeds; seed 3: 216 of 2000). Against a violation rate of 10%
    the check fails with probability 0.99995 (its stated power), so this test fails by
    chance with probability below 5e-5. The naive empirical-risk rule (seed 3: 1079
    violations) fails it with power above 1 − 1e-300 against a rate of 50%."""
    check = check_guarantee(
        WORLD, n=1000, alpha=ALPHA, delta=DELTA, trials=2000, seed=3,
        calibrator=_four_times_delta, alternative=0.10,
    )
    assert check.power == pytest.approx(float(stats.binom.sf(149, 2000, 0.10)))
    assert check.power > 0.9999
    assert not check.passed, check.summary()
    naive = check_guarantee(
        WORLD, n=1000, alpha=ALPHA, delta=DELTA, trials=2000, seed=3,
        calibrator=functools.partial(empirical_risk_threshold, grid=GRID), alternative=0.5,
    )
    assert not naive.passed and naive.violation_rate > 0.4
    assert "FAILED" in naive.summary()


def test_estimated_risks_agree_with_exact_ones() -> None:
    """Without a ``risk`` the check estimates the true risk on 10^6 fresh items: every
    estimate lies within 5 standard errors of the exact risk (false-failure probability
    below 6e-7 per distinct threshold, about 60 of them)."""
    kwargs = dict(n=400, alpha=ALPHA, delta=DELTA, trials=300, seed=8, calibrator=_calibrate)
    exact = check_guarantee(WORLD, **kwargs)  # type: ignore[arg-type]
    estimated = check_guarantee(lambda rng, n: WORLD(rng, n), **kwargs)  # type: ignore[arg-type]
    assert estimated.risk_source == "estimated" and estimated.estimate_size == 1_000_000
    assert estimated.thresholds == exact.thresholds  # the same calibration sets
    lam = np.unique(np.asarray(exact.thresholds)[np.isfinite(exact.thresholds)])
    risks = dict(zip(estimated.thresholds, estimated.true_risks, strict=True))
    for value in lam:
        r, cover = float(WORLD.risk(value)), float(WORLD.coverage(value))
        se = math.sqrt(r * (1 - r) / (1_000_000 * cover))
        assert abs(risks[float(value)] - r) <= 5 * se


def test_abstaining_is_never_a_violation() -> None:
    everything_wrong = KnownRiskModel(wrong_base=1.0, wrong_slope=0.0)
    for abstain in (lambda c, o, **kw: None, lambda c, o, **kw: math.inf, calibrate):
        check = check_guarantee(everything_wrong, n=100, alpha=0.2, delta=0.1, trials=50, seed=0, calibrator=abstain)
        assert check.violations == 0 and check.abstentions == 50 and check.passed
        assert all(math.isnan(r) for r in check.true_risks)
    # -inf accepts everything: a violation in every run
    accept_all = check_guarantee(
        everything_wrong, n=100, alpha=0.2, delta=0.1, trials=50, seed=0, calibrator=lambda c, o, **kw: -math.inf
    )
    assert accept_all.violations == 50 and accept_all.abstentions == 0 and not accept_all.passed


def test_the_record_is_frozen_and_reproducible() -> None:
    a = check_guarantee(WORLD, n=200, alpha=ALPHA, delta=DELTA, trials=40, seed=5)
    b = check_guarantee(WORLD, n=200, alpha=ALPHA, delta=DELTA, trials=40, seed=5)
    c = check_guarantee(WORLD, n=200, alpha=ALPHA, delta=DELTA, trials=40, seed=6)
    assert a == b and a.thresholds != c.thresholds
    assert isinstance(a, GuaranteeCheck) and "thresholds" not in repr(a)
    with pytest.raises(AttributeError):
        a.violations = 0  # type: ignore[misc]


def test_allowance_and_power_arithmetic() -> None:
    assert binomial_allowance(2000, 0.1) == 267  # the statistical suite's allowance
    assert binomial_allowance(2000, 0.1, false_failure=1e-3) == int(stats.binom.ppf(1 - 1e-3, 2000, 0.1))
    assert stats.binom.sf(binomial_allowance(500, 0.05), 500, 0.05) <= 1e-6
    assert detection_power(2000, 267, 0.2) == pytest.approx(float(stats.binom.sf(267, 2000, 0.2)))
    assert detection_power(10, 3, 1.0) == 1.0


def _bad_sampler_nan(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, np.nan), np.ones(n, dtype=bool)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"delta": 1.5}, "delta"),
        ({"delta": "0.1"}, "delta"),
        ({"trials": 0}, "trials"),
        ({"trials": 2.5}, "trials"),
        ({"n": 0}, "n"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"false_failure": 0.0}, "false_failure"),
        ({"alternative": 0.01}, "alternative"),  # not above delta
        ({"alternative": 1.5}, "alternative"),
        ({"estimate_size": 0}, "estimate_size"),
        ({"calibrator": "calibrate"}, "calibrator"),
        ({"true_risk": 0.1}, "true_risk"),
        ({"sampler": None}, "sampler"),
        ({"sampler": _bad_sampler_nan}, "sampler"),
        ({"sampler": lambda rng, n: WORLD(rng, n + 1)}, "sampler"),
        ({"sampler": lambda rng, n: WORLD(rng, n)[0]}, "sampler"),
        ({"calibrator": lambda c, o, **kw: math.nan}, "calibrator"),
        ({"calibrator": lambda c, o, **kw: "0.5"}, "calibrator"),
        ({"true_risk": lambda lam: np.zeros(1), "calibrator": lambda c, o, **kw: 0.5}, "true_risk"),
        ({"true_risk": lambda lam: np.full(lam.shape, np.nan), "calibrator": lambda c, o, **kw: 0.5}, "true_risk"),
    ],
)
def test_bad_input_is_typed(kwargs: dict[str, object], argument: str) -> None:
    call: dict[str, object] = dict(sampler=WORLD, n=100, alpha=ALPHA, delta=DELTA, trials=3, seed=0)
    call.update(kwargs)
    sampler = call.pop("sampler")
    with pytest.raises(InvalidArgumentError) as e:
        check_guarantee(sampler, **call)  # type: ignore[arg-type]
    assert e.value.argument == argument


def test_helpers_reject_bad_input() -> None:
    for call, argument in [
        (lambda: binomial_allowance(0, 0.1), "trials"),
        (lambda: binomial_allowance(10, 0.0), "rate"),
        (lambda: detection_power(10, -1, 0.5), "allowance"),
        (lambda: detection_power(10, 2, 0.0), "alternative"),
        (lambda: empirical_risk_threshold([0.5], [True, False], alpha=0.1), "correct"),
        (lambda: empirical_risk_threshold([0.5], [True], alpha=0.1, min_n=0), "min_n"),
    ]:
        with pytest.raises(InvalidArgumentError) as e:
            call()
        assert e.value.argument == argument


@given(data=ks.labelled_confidences(min_size=1, max_size=200), alpha=st.floats(0.05, 0.5))
def test_empirical_risk_threshold_is_the_lowest_qualifying_grid_point(
    data: tuple[np.ndarray, np.ndarray], alpha: float
) -> None:
    conf, ok = data
    lam = empirical_risk_threshold(conf, ok, alpha=alpha, grid=GRID, min_n=5)
    qualifies = [(conf >= g).sum() >= 5 and (~ok[conf >= g]).sum() <= alpha * (conf >= g).sum() for g in GRID]
    expected = float(GRID[qualifies.index(True)]) if any(qualifies) else math.inf
    assert lam == expected


# ------------------------------------------------------------------ strategies


@given(conf=ks.confidence_arrays(max_size=100))
def test_confidence_arrays_are_valid_calibration_input(conf: np.ndarray) -> None:
    assert conf.ndim == 1 and 1 <= conf.size <= 100
    assert np.isfinite(conf).all() and ((conf >= 0) & (conf <= 1)).all()
    calibrate(conf, np.ones(conf.size, dtype=bool), alpha=0.2, delta=0.1)


def test_strategies_reach_the_edge_cases() -> None:
    """The corners the docs promise exist in the search space (found by search)."""
    opts = settings(database=None, max_examples=2000)
    labelled, arrays = ks.labelled_confidences(min_size=5), ks.confidence_arrays(min_size=20)
    assert find(labelled, lambda d: bool(d[1].all()), settings=opts)[1].all()
    assert not find(labelled, lambda d: not d[1].any(), settings=opts)[1].any()
    ties = find(arrays, lambda c: 1 < np.unique(c).size < c.size, settings=opts)
    assert np.unique(ties).size < ties.size
    point = find(arrays, lambda c: np.unique(c).size == 1 and c[0] == 1.0, settings=opts)
    assert (point == 1.0).all()


@given(cal=ks.calibration_sets(min_size=30, max_size=300))
def test_calibration_sets_carry_their_risk_curve(cal: ks.CalibrationSet) -> None:
    result = calibrate(cal.confidences, cal.correct, alpha=0.2, delta=0.1)
    risk = float(cal.true_risk(result.threshold))
    assert 0.0 <= risk <= 1.0
    assert cal.confidences.shape == cal.correct.shape and 30 <= cal.confidences.size <= 300


@given(repo=ks.repositories(dim=8, max_size=30, tenants=("a", "b")))
def test_repositories_strategy_builds_valid_versions(repo: object) -> None:
    from intercascade_core import Repository

    assert isinstance(repo, Repository) and repo.dim == 8 and len(repo) <= 30
    norms = np.linalg.norm(repo.vectors.astype(np.float64), axis=1)
    assert (np.abs(norms - 1) <= NORM_TOLERANCE).all()
    assert [e.id for e in repo.entries] == list(range(len(repo)))
    assert {e.tenant for e in repo.entries} <= {"a", "b"}


@given(v=ks.unit_vectors(5), m=ks.unit_matrices(7, 3))
def test_unit_vector_strategies(v: np.ndarray, m: np.ndarray) -> None:
    assert v.dtype == m.dtype == np.float32 and v.shape == (5,) and m.shape == (7, 3)
    assert abs(float(np.linalg.norm(v)) - 1) < 1e-6
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1, atol=1e-6)


@given(q=ks.queries(), stream=ks.query_streams(max_size=20))
def test_query_strategies_carry_gold_answers(q: object, stream: tuple[object, ...]) -> None:
    from intercascade_core import Query

    assert isinstance(q, Query) and q.gold and q.text.strip()
    assert q.family == "math" or (q.gold in "ABCD" and len(q.options) == 4)
    assert 1 <= len(stream) <= 20
    assert all(isinstance(s, Query) and s.gold is not None for s in stream)


def test_strategy_arguments_are_typed() -> None:
    def draw(strategy: st.SearchStrategy[object]) -> object:
        return find(strategy, lambda _: True, settings=settings(database=None))

    for make, argument in [
        (lambda: draw(ks.confidence_arrays(min_size=5, max_size=2)), "max_size"),
        (lambda: draw(ks.unit_vectors(0)), "dim"),
        (lambda: draw(ks.repositories(dim=-1)), "dim"),
        (lambda: draw(ks.queries(families=("code",))), "families"),
        (lambda: draw(ks.entries(tenants=())), "tenants"),
    ]:
        with pytest.raises(InvalidArgumentError) as e:
            make()
        assert e.value.argument == argument


# ------------------------------------------------------------------ simulated levels, packaging


def test_simulated_levels_run_a_cascade_without_network() -> None:
    with simulated_levels(seed=4) as sim:
        assert [lv.name for lv in sim.levels] == ["sim-weak", "sim-strong"]
        cal = calibrate_levels(sim.queries(200, seed=1), sim.levels, alpha=0.25, delta=0.1)
        result = run_stream(
            sim.queries(60, seed=2), sim.levels, sim.embedder, calibrations=cal.calibrations, progress=False
        )
        assert len(result.outcomes) == 60
        again = run_stream(
            sim.queries(60, seed=2), sim.levels, sim.embedder, calibrations=cal.calibrations, progress=False
        )
        assert [o.answer for o in again.outcomes] == [o.answer for o in result.outcomes]
    assert sim.client.is_closed
    with pytest.raises(InvalidArgumentError) as e:
        with simulated_levels(("sim-weak", "gpt-4o")):
            pass
    assert e.value.argument == "models"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_missing_hypothesis_names_the_extra() -> None:
    proc = _python(
        """
        import sys
        sys.modules["hypothesis"] = None  # as if the package were not installed
        from intercascade_core.errors import DependencyMissingError
        try:
            import intercascade_core.testing
        except DependencyMissingError as exc:
            assert isinstance(exc, ImportError)
            print(exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'intercascade[testing]'" in proc.stdout
    assert issubclass(DependencyMissingError, ImportError)


def test_the_library_never_imports_the_kit() -> None:
    proc = _python(
        """
        import importlib, pkgutil, sys
        import intercascade_core, intercascade_core.core, intercascade_core.models
        for pkg in (intercascade_core.core, intercascade_core.models):
            for info in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{pkg.__name__}.{info.name}")
        import intercascade_core.service, intercascade_core.cli
        bad = sorted(m for m in sys.modules if m.startswith(("intercascade_core.testing", "hypothesis", "pytest")))
        print(bad)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------ the pytest plugin

USER_CONFTEST = 'pytest_plugins = ["intercascade_core.testing.pytest_plugin"]\n'

USER_TESTS = '''
import json, os, random
import numpy as np
import pytest
from hypothesis import given, strategies as st

from intercascade_core import calibrate_levels

LOG = os.environ["SEED_LOG"]


def log(name, value):
    with open(LOG, "a") as f:
        f.write(json.dumps([name, value]) + "\\n")


@pytest.mark.statistical
def test_fails_and_shows_its_seed(intercascade_seed, intercascade_rng):
    log("seed", intercascade_seed)
    log("draws", [float(np.random.uniform()), random.random(), float(intercascade_rng.uniform())])
    assert False


@pytest.mark.usefixtures("intercascade_seed")
@given(x=st.integers(0, 10**9))
def test_hypothesis_is_seeded(x):
    log("hypothesis", x)


def test_sim_cascade(sim_cascade):
    run = calibrate_levels(sim_cascade.queries(60, seed=1), sim_cascade.levels, alpha=0.3, delta=0.1)
    log("thresholds", [c.threshold for c in run.calibrations])


@pytest.mark.parametrize("sim_cascade", [{"models": ("sim-weak", "sim-mid", "sim-strong")}], indirect=True)
def test_sim_cascade_indirect(sim_cascade):
    log("levels", [lv.name for lv in sim_cascade.levels])
'''


def _run_user_suite(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[pytest.RunResult, list[list[object]]]:
    import json

    log = pytester.path / f"log{len(list(pytester.path.glob('log*')))}.jsonl"
    log.touch()
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    monkeypatch.setenv("SEED_LOG", str(log))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers", *args)
    return result, [json.loads(line) for line in log.read_text().splitlines()]


def _first(records: list[list[object]], name: str) -> object:
    return next(value for key, value in records if key == name)


def _all(records: list[list[object]], name: str) -> list[object]:
    return [value for key, value in records if key == name]


@pytest.mark.slow  # five pytest subprocesses, about 15 s
def test_plugin_fixtures_marker_and_seed_report(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """One user suite, enabled the way a user's conftest does: the failing test prints
    its seed; the printed option reproduces its numpy and ``random`` draws; a fixed seed
    fixes Hypothesis's examples and another seed changes them; the marker selects; the
    simulated cascade needs no network."""
    first, log1 = _run_user_suite(pytester, monkeypatch)
    first.assert_outcomes(passed=3, failed=1)
    seed = _first(log1, "seed")
    first.stdout.fnmatch_lines([f"*intercascade_seed = {seed}; reproduce with --intercascade-seed={seed}*"])
    assert len(_first(log1, "thresholds")) == 2  # type: ignore[arg-type]
    assert _first(log1, "levels") == ["sim-weak", "sim-mid", "sim-strong"]

    same, log2 = _run_user_suite(pytester, monkeypatch, f"--intercascade-seed={seed}")
    same.assert_outcomes(passed=3, failed=1)
    assert _first(log2, "seed") == seed and _first(log2, "draws") == _first(log1, "draws")
    assert _first(log2, "thresholds") == _first(log1, "thresholds")

    selected, log3 = _run_user_suite(pytester, monkeypatch, f"--intercascade-seed={seed}", "-m", "not statistical")
    selected.assert_outcomes(passed=3, deselected=1)
    assert _all(log3, "hypothesis") == _all(log2, "hypothesis")  # Hypothesis follows the seed

    other, log4 = _run_user_suite(pytester, monkeypatch, f"--intercascade-seed={int(seed) + 1}", "-k", "hypothesis")  # type: ignore[call-overload]
    other.assert_outcomes(passed=1)
    assert _all(log4, "hypothesis") != _all(log2, "hypothesis")

    bad, _ = _run_user_suite(pytester, monkeypatch, "--intercascade-seed=soon")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "expects an integer or 'random'" in bad.stderr.str()


def test_the_seed_fixture_restores_the_global_generators(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(
        test_state="""
        import random
        import numpy as np

        np.random.seed(99)
        random.seed(99)
        BEFORE = (np.random.get_state()[1].copy(), np.random.get_state()[2], random.getstate())

        def same_as_before():
            keys, pos = np.random.get_state()[1:3]
            return (keys == BEFORE[0]).all() and pos == BEFORE[1] and random.getstate() == BEFORE[2]

        def test_a_seed_user(intercascade_seed):
            assert not same_as_before()  # seeded with its own value

        def test_after():
            assert same_as_before()
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_examples_are_collected_by_the_suite() -> None:
    """The user-facing example runs in CI: it is in the configured testpaths."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    assert "examples" in config["tool"]["pytest"]["ini_options"]["testpaths"]
    assert (root / "examples" / "test_my_calibration.py").is_file()
