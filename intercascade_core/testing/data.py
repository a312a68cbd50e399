"""Seeded data with known ground truth: samplers whose selective risk is exact, unit
vectors and entries.

A *sampler* is any callable ``sampler(rng, n) -> (confidences, correct)`` that draws
``n`` independent labelled items; :func:`~intercascade_core.testing.check_guarantee`
calls it once per trial. The two here also know their true selective risk
``R(λ) = P(wrong | confidence >= λ)`` exactly (``.risk``), so a check needs no Monte
Carlo estimate:

* :class:`KnownRiskModel` — a parametric world (a Beta mixture of confidences, an error
  probability linear in the confidence, optional ties at grid points) with R(λ) in
  closed form;
* :class:`FinitePopulation` — your own labelled pool (e.g. logged model outputs with
  gold answers) treated as the population: calibration sets are drawn from it with
  replacement, so they are i.i.d. from it, and R(λ) is the pool's own error rate above λ.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy.special import betainc

from ..core.calibrate import _check_confidences, _check_correct
from ..core.repository import Entry
from ..errors import InvalidArgumentError

__all__ = [
    "FinitePopulation",
    "KnownRiskModel",
    "clustered_unit",
    "make_entries",
    "random_unit",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgumentError(name, f"must be a finite real number, got {value!r}")
    return float(value)


def _shape(n: object) -> int | tuple[int, ...]:
    if isinstance(n, tuple) and all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 0 for s in n
    ):
        return tuple(int(s) for s in n)
    if isinstance(n, numbers.Integral) and not isinstance(n, bool) and int(n) >= 0:
        return int(n)
    raise InvalidArgumentError("n", f"must be an int >= 0 or a tuple of them, got {n!r}")


@dataclass(frozen=True, slots=True)
class KnownRiskModel:
    """Labelled confidences whose selective risk R(λ) is known in closed form.

    * confidence ``c`` ~ ``Σ w·Beta(a, b)`` over ``components`` (``(w, a, b)`` triples;
      weights are normalised);
    * ``P(wrong | c) = wrong_base + wrong_slope·(1 − c)``, which must stay in [0, 1];
    * ``levels``: when given, the reported confidence is ``c`` rounded to the nearest of
      ``levels`` evenly spaced points in [0, 1], so calibration sets are full of ties
      (the error probability still follows the unrounded ``c``).

    ``wrong_base=0, wrong_slope=0`` gives all-correct sets, ``wrong_base=1,
    wrong_slope=0`` all-wrong ones, and a constant error rate ``>= alpha`` a world in
    which every threshold violates the guarantee. The defaults give
    ``R(λ) = 0.1 + 0.25·(1 − λ)`` on uniform confidences.

    Exactness: with ``I`` the regularised incomplete beta function,
    ``P(c >= t) = Σ w·(1 − I_t(a, b))`` and ``E[(1 − c)·1{c >= t}] =
    Σ w·b/(a + b)·(1 − I_t(a, b + 1))``, so R is a ratio of finite sums.
    """

    components: tuple[tuple[float, float, float], ...] = ((1.0, 1.0, 1.0),)
    wrong_base: float = 0.1
    wrong_slope: float = 0.5
    levels: int | None = None
    _w: FloatArray = field(init=False, repr=False, compare=False)
    _a: FloatArray = field(init=False, repr=False, compare=False)
    _b: FloatArray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        comps = self.components
        if not isinstance(comps, Sequence) or isinstance(comps, str) or len(comps) == 0:
            raise InvalidArgumentError("components", f"must be a non-empty sequence of (w, a, b), got {comps!r}")
        rows = []
        for i, comp in enumerate(comps):
            if not isinstance(comp, Sequence) or len(comp) != 3:
                raise InvalidArgumentError("components", f"item {i} must be a (w, a, b) triple, got {comp!r}")
            w, a, b = (_real(f"components[{i}]", x) for x in comp)
            if w < 0 or a <= 0 or b <= 0:
                raise InvalidArgumentError(
                    "components", f"item {i} needs w >= 0, a > 0 and b > 0, got {comp!r}"
                )
            rows.append((w, a, b))
        arr = np.array(rows, dtype=np.float64)
        if arr[:, 0].sum() <= 0:
            raise InvalidArgumentError("components", "the weights must not all be zero")
        base = _real("wrong_base", self.wrong_base)
        slope = _real("wrong_slope", self.wrong_slope)
        if not (0.0 <= base <= 1.0 and 0.0 <= base + slope <= 1.0):
            raise InvalidArgumentError(
                "wrong_slope",
                f"P(wrong | c) = {base} + {slope}·(1 − c) must lie in [0, 1] for every c in [0, 1]",
            )
        if self.levels is not None and (
            isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2
        ):
            raise InvalidArgumentError("levels", f"must be None or an int >= 2, got {self.levels!r}")
        object.__setattr__(self, "components", tuple(rows))
        object.__setattr__(self, "_w", arr[:, 0] / arr[:, 0].sum())
        object.__setattr__(self, "_a", arr[:, 1])
        object.__setattr__(self, "_b", arr[:, 2])

    # ------------------------------------------------------------------ sampling
    def draw(self, rng: np.random.Generator, shape: int | tuple[int, ...]) -> tuple[FloatArray, BoolArray]:
        """Independent ``(confidences, correct)`` arrays of the given shape."""
        size = _shape(shape)
        if self._w.size == 1:  # scalar parameters: several times faster than per-item ones
            c = rng.beta(self._a[0], self._b[0], size=size)
        else:
            which = np.searchsorted(np.cumsum(self._w)[:-1], rng.uniform(size=size), side="right")
            c = rng.beta(self._a[which], self._b[which])
        wrong = rng.uniform(size=size) < self.wrong_base + self.wrong_slope * (1.0 - c)
        if self.levels is not None:
            c = np.round(c * (self.levels - 1)) / (self.levels - 1)
        return np.asarray(c, dtype=np.float64), ~wrong

    def __call__(self, rng: np.random.Generator, n: int) -> tuple[FloatArray, BoolArray]:
        """The sampler protocol: ``n`` labelled items."""
        return self.draw(rng, n)

    # ------------------------------------------------------------------ ground truth
    def _cutoff(self, thresholds: FloatArray) -> FloatArray:
        """The unrounded confidence above which a reported confidence is >= λ."""
        if self.levels is None:
            return np.clip(thresholds, 0.0, math.inf)
        m = self.levels - 1
        # the reported values exactly as draw() computes them, so float ties agree
        grid = np.round(np.linspace(0.0, 1.0, self.levels) * m) / m
        first = np.searchsorted(grid, thresholds, side="left")  # lowest accepted grid index
        cut = (first - 0.5) / m
        return np.where(first == 0, 0.0, np.where(first >= self.levels, math.inf, cut))

    def _masses(self, thresholds: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        lam = np.asarray(thresholds, dtype=np.float64)
        if np.isnan(lam).any():
            raise InvalidArgumentError("thresholds", "must not contain NaN")
        t = self._cutoff(lam)[..., None]
        inside = t <= 1.0
        tc = np.where(inside, np.clip(t, 0.0, 1.0), 1.0)
        a, b, w = self._a, self._b, self._w
        # 1 − I_t(a, b) = I_{1−t}(b, a): no cancellation near t = 1
        above = np.where(inside, betainc(b, a, 1.0 - tc), 0.0)
        upper_slope = np.where(inside, betainc(b + 1.0, a, 1.0 - tc), 0.0)
        covered = (w * above).sum(axis=-1)
        errors = self.wrong_base * covered + self.wrong_slope * (w * b / (a + b) * upper_slope).sum(axis=-1)
        return covered, errors

    def coverage(self, thresholds: npt.ArrayLike) -> FloatArray:
        """``P(confidence >= λ)`` for each threshold (0 for λ = inf)."""
        return self._masses(thresholds)[0]

    def risk(self, thresholds: npt.ArrayLike) -> FloatArray:
        """The true selective risk ``P(wrong | confidence >= λ)``; 0 where nothing is
        accepted (λ = inf, or above every possible confidence)."""
        covered, errors = self._masses(thresholds)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(covered > 0, np.clip(errors / np.where(covered > 0, covered, 1.0), 0.0, 1.0), 0.0)


@dataclass(frozen=True, slots=True, eq=False)
class FinitePopulation:
    """A labelled pool used as the population: :meth:`__call__` draws calibration sets
    from it with replacement (so they are i.i.d. from the pool) and :meth:`risk` is the
    pool's exact selective risk. Checking a calibrator against your own logged model
    outputs needs nothing else."""

    confidences: FloatArray
    correct: BoolArray
    _sorted: FloatArray = field(init=False, repr=False)
    _sorted_wrong: FloatArray = field(init=False, repr=False)

    def __init__(self, confidences: npt.ArrayLike, correct: npt.ArrayLike) -> None:
        conf = _check_confidences("confidences", confidences).copy()
        if conf.size == 0:
            raise InvalidArgumentError("confidences", "the pool must not be empty")
        ok = _check_correct("correct", correct, conf.size).copy()
        conf.setflags(write=False)
        ok.setflags(write=False)
        object.__setattr__(self, "confidences", conf)
        object.__setattr__(self, "correct", ok)
        object.__setattr__(self, "_sorted", np.sort(conf))
        object.__setattr__(self, "_sorted_wrong", np.sort(conf[~ok]))

    def __len__(self) -> int:
        return int(self.confidences.size)

    def __repr__(self) -> str:
        wrong = 1.0 - float(self.correct.mean())
        return f"FinitePopulation(n={len(self)}, error_rate={wrong:.4g})"

    def __call__(self, rng: np.random.Generator, n: int) -> tuple[FloatArray, BoolArray]:
        """``n`` items drawn uniformly with replacement."""
        idx = rng.integers(0, self.confidences.size, size=_shape(n))
        return self.confidences[idx], self.correct[idx]

    def coverage(self, thresholds: npt.ArrayLike) -> FloatArray:
        """Share of the pool with confidence >= λ."""
        lam = np.asarray(thresholds, dtype=np.float64)
        n = self._sorted.size - np.searchsorted(self._sorted, lam, side="left")
        return np.asarray(n / self._sorted.size, dtype=np.float64)

    def risk(self, thresholds: npt.ArrayLike) -> FloatArray:
        """Error rate of the pool items with confidence >= λ (0 where none is)."""
        lam = np.asarray(thresholds, dtype=np.float64)
        if np.isnan(lam).any():
            raise InvalidArgumentError("thresholds", "must not contain NaN")
        n = self._sorted.size - np.searchsorted(self._sorted, lam, side="left")
        k = self._sorted_wrong.size - np.searchsorted(self._sorted_wrong, lam, side="left")
        return np.asarray(np.where(n > 0, k / np.maximum(n, 1), 0.0), dtype=np.float64)


# --------------------------------------------------------------------------- vectors, entries


def random_unit(rng: np.random.Generator, rows: int, dim: int) -> npt.NDArray[np.float32]:
    """Uniform random float32 unit vectors (Gaussian, normalised)."""
    x = rng.standard_normal((rows, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def clustered_unit(
    rng: np.random.Generator, rows: int, dim: int, *, clusters: int = 50, spread: float = 0.35
) -> npt.NDArray[np.float32]:
    """Unit vectors around ``clusters`` random centres (like real embedding traffic)."""
    centres = random_unit(rng, clusters, dim).astype(np.float64)
    which = rng.integers(0, clusters, rows)
    x: npt.NDArray[np.float64] = centres[which] + spread * rng.standard_normal((rows, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def make_entries(count: int, prefix: str = "q", tenant: str = "default") -> list[Entry]:
    """``count`` simple entries ``Entry(f"{prefix}{i}", f"a{i}", f"s{i}")``."""
    return [Entry(f"{prefix}{i}", f"a{i}", f"s{i}", tenant=tenant) for i in range(count)]
