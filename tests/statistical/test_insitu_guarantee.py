"""Static vs in-situ calibration with a weak model that copies wrong strategies.

``sim_copying.CopyingProcess`` draws a weak model's (confidence, correct) pairs with and
without strategies: a wrong strategy in the prompt is copied (wrong with probability 0.8)
with confidence ~ Beta(32, 1) (mean 0.97), the measured copying behaviour. Its selective
risk R(λ) is known in closed form, so each run's violation — R_deployed(λ̂) > α, where
deployment always has strategies — is exact, not estimated.

Per run (R = 2000, N = 600 calibration items, α = 0.15, δ = 0.1):

* static: the paper's rule, λ̂ calibrated on strategy-free pairs;
* in-situ: λ̂ calibrated on strategy-augmented pairs (what the replay records).

The single-threshold checks go through the testing kit's ``check_guarantee`` (sampler:
the process's draws; true risk: its closed form under deployment); the stream-dynamics
replay, whose thresholds feed back into the data, counts with the kit's
``binomial_allowance``. Assertions, each with false-failure probability <= 1e-6:

* in-situ violates in at most δ of the runs: V_insitu <= binom.ppf(1 − 1e-6, R, δ) = 267;
* static violates in *more* than δ of the runs: V_static > 267, i.e. a rule whose
  violation rate were <= δ would exceed that count with probability <= 1e-6;
* (sanity) static is valid where it was calibrated: strategy-free violations <= 267.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from intercascade_core.core.calibrate import calibrate
from intercascade_core.core.insitu import calibrate_replay
from intercascade_core.models.sim_copying import CopyingProcess
from intercascade_core.testing import GuaranteeCheck, binomial_allowance, check_guarantee

pytestmark = pytest.mark.statistical

R, N = 2000, 600
ALPHA, DELTA = 0.15, 0.1
GRID = np.linspace(0, 1, 201)
ALLOWED = binomial_allowance(R, DELTA)  # 267


def check(
    proc: CopyingProcess, *, calibrated_with: bool, deployed: CopyingProcess, deployed_with: bool, seed: int
) -> GuaranteeCheck:
    """Calibrate on ``proc``'s pairs (with strategies or not), judge each threshold by
    its true risk in the deployment (``deployed``, with strategies or not)."""
    def sampler(rng: np.random.Generator, n: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        return proc.draw(rng, n, strategies=calibrated_with)

    true_risk: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]] = functools.partial(
        deployed.risk, strategies=deployed_with
    )
    return check_guarantee(
        sampler, n=N, alpha=ALPHA, delta=DELTA, trials=R, seed=seed,
        calibrator=functools.partial(calibrate, grid=GRID), true_risk=true_risk,
    )


def test_static_calibration_breaks_insitu_holds() -> None:
    """Seed 2026: static violates in 1965 of 2000 runs, in-situ in 107 (abstaining in
    16% of runs, accepting 55% of queries at its median threshold); static judged on
    strategy-free deployment, where it is valid, 94."""
    proc = CopyingProcess()
    static = check(proc, calibrated_with=False, deployed=proc, deployed_with=True, seed=2026)
    insitu = check(proc, calibrated_with=True, deployed=proc, deployed_with=True, seed=2026)
    static_free = check(proc, calibrated_with=False, deployed=proc, deployed_with=False, seed=2026)

    assert insitu.allowance == ALLOWED
    assert insitu.passed, insitu.summary()
    assert not static.passed, static.summary()
    assert static_free.passed, static_free.summary()
    # in-situ is not trivially safe: it usually accepts a good share of the queries
    lam_insitu = np.asarray(insitu.thresholds)
    assert np.isfinite(lam_insitu).mean() > 0.5
    median_accept = float(np.median(proc.accept_rate(lam_insitu, strategies=True)))
    assert median_accept > 0.3


def test_copying_process_matches_its_closed_form() -> None:
    """The vectorised draws follow the closed-form risk (a guard on the oracle itself):
    at λ = 0.9 the empirical risk of 400,000 draws lies within 5 binomial sd of R(λ)."""
    proc = CopyingProcess()
    rng = np.random.default_rng(1)
    for strategies in (False, True):
        conf, ok = proc.draw(rng, 400_000, strategies=strategies)
        acc = conf >= 0.9
        emp = float((acc & ~ok).sum() / acc.sum())
        r = float(proc.risk(0.9, strategies=strategies))
        assert abs(emp - r) <= 5 * math.sqrt(r * (1 - r) / acc.sum())
        assert abs(acc.mean() - float(proc.accept_rate(0.9, strategies=strategies))) < 0.005
    # the copying shift itself: mean confidence of wrong answers rises with strategies
    conf_f, ok_f = proc.draw(rng, 200_000, strategies=False)
    conf_s, ok_s = proc.draw(rng, 200_000, strategies=True)
    assert conf_s[~ok_s].mean() > conf_f[~ok_f].mean() + 0.05


def test_a_repository_that_drifts_from_the_replay_breaks_insitu() -> None:
    """The documented assumption at work: in-situ thresholds calibrated where 15% of the
    weak prompts carry a wrong strategy, deployed where 35% do (a bigger or dirtier
    repository than the replay's), violate α in more than δ of the runs — more than
    Bin(R, δ) allows at 1 − 1e-6 (seed 7: 1659 of 2000, against 110 when deployment
    matches the replay). This is what the online audit is for."""
    calibrated, deployed = CopyingProcess(), CopyingProcess(pi_right=0.4, pi_wrong=0.35)
    matched = check(calibrated, calibrated_with=True, deployed=calibrated, deployed_with=True, seed=7)
    drifted = check(calibrated, calibrated_with=True, deployed=deployed, deployed_with=True, seed=7)
    assert matched.thresholds == drifted.thresholds  # the same calibrations, judged twice
    assert matched.passed, matched.summary()
    assert not drifted.passed, drifted.summary()


def test_replay_with_stream_dynamics() -> None:
    """The replay itself, in a model where the repository grows from the stream: each
    weak prompt carries the latest strategy of its template (10 templates), deferred
    queries teach (the strong model accepts 90%, 15% of its strategies wrong), so which
    strategies exist depends on λ_w. Per run (R = 2000, N = 600):

    * static: λ̂ from the strategy-free pilot;
    * in-situ: replay the calibration split (common random numbers: the same queries and
      model randomness every round) with the current thresholds, recalibrate with
      ``insitu.calibrate_replay`` (from round 2 on with the previous threshold as floor),
      four rounds, as ``insitu_calibrate`` does.

    Deployment risk at a threshold: the ratio of expected wrong-accepted to accepted weak
    answers over fresh streams of the same length from an empty repository (Monte Carlo,
    200 streams per threshold, standard error about 0.0015).
    Seed 11: static violates in 1940 runs, in-situ in 110 (allowance 267), abstaining in
    49% of runs; 98% of replayed prompts carry a strategy. (A single replay without the
    rounds violated in 253 — under the allowance but above δ·R: the threshold it picks
    defers more than the replay did, so deployment teaches more, and copies more, than
    the replay saw. The rounds remove that gap.)"""
    proc = CopyingProcess()
    rng = np.random.default_rng(11)
    conf_free, ok_free = proc.draw(rng, (R, N), strategies=False)
    lam_static = np.array([
        calibrate(conf_free[r], ok_free[r], alpha=ALPHA, delta=DELTA, grid=GRID).threshold for r in range(R)
    ])
    noise = proc.stream_noise(rng, R, N)
    lam = lam_static
    for rnd in range(4):
        conf, ok, seen = proc.stream(noise, lam)
        lam = np.array([
            calibrate_replay([conf[r]], [ok[r]], alpha=ALPHA, delta=DELTA, grid=GRID,
                             floor=None if rnd == 0 else (lam[r],))[0].threshold
            for r in range(R)
        ])
    assert (seen > 0).mean() > 0.5  # most replayed prompts carry a strategy
    assert (seen == 2).any()  # and some a wrong one

    needed = np.unique(np.concatenate([lam_static, lam]))
    needed = needed[np.isfinite(needed)]
    m = 200
    dep_conf, dep_ok, _ = proc.stream(proc.stream_noise(rng, needed.size * m, N), np.repeat(needed, m))
    accepted = dep_conf >= np.repeat(needed, m)[:, None]
    n_acc = accepted.reshape(needed.size, -1).sum(axis=1)
    n_err = (accepted & ~dep_ok).reshape(needed.size, -1).sum(axis=1)
    risk = dict(zip(needed.tolist(), (n_err / np.maximum(n_acc, 1)).tolist(), strict=True))

    def violations(ts: np.ndarray) -> int:
        return sum(risk[float(t)] > ALPHA for t in ts if math.isfinite(t))

    assert violations(lam) <= ALLOWED
    assert violations(lam_static) > ALLOWED
    assert np.isfinite(lam).mean() > 0.3
