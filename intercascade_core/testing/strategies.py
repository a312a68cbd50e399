"""Hypothesis strategies for property tests of calibration and of the repository.

Every strategy composes with your own (``st.tuples``, ``.map``, ``.filter``,
``@st.composite``). Array strategies draw a few parameters and a seed and let numpy
build the arrays, which keeps large examples fast; Hypothesis then shrinks the
parameters (size, mixture, tie grid, error curve), not individual items.

* :func:`confidence_arrays` — Beta mixtures, ties at grid points, point masses;
* :func:`labelled_confidences` — ``(confidences, correct)``, including all-correct and
  all-wrong sets;
* :func:`risk_models` / :func:`calibration_sets` — data whose true risk curve is known;
* :func:`unit_vectors`, :func:`unit_matrices`, :func:`entries`, :func:`repositories`;
* :func:`queries` (any :class:`Query` with a gold answer) and :func:`query_streams`
  (templated problems the simulated models can answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st

from ..core.repository import Entry, Repository, empty_repository, update
from ..core.tasks import Query
from ..errors import InvalidArgumentError
from .data import KnownRiskModel, random_unit

__all__ = [
    "CalibrationSet",
    "calibration_sets",
    "confidence_arrays",
    "entries",
    "labelled_confidences",
    "queries",
    "query_streams",
    "repositories",
    "risk_models",
    "unit_matrices",
    "unit_vectors",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
_SEEDS = st.integers(0, 2**32 - 1)
_SHAPES = st.floats(0.2, 20.0)  # Beta parameters: U-shaped through sharply peaked


def _check_sizes(min_size: int, max_size: int, floor: int = 0) -> None:
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < floor:
        raise InvalidArgumentError("min_size", f"must be an int >= {floor}, got {min_size!r}")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < min_size:
        raise InvalidArgumentError("max_size", f"must be an int >= min_size={min_size}, got {max_size!r}")


def _check_dim(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(name, f"must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- confidences


@st.composite
def risk_models(
    draw: st.DrawFn, *, max_components: int = 3, ties: bool = True
) -> KnownRiskModel:
    """A :class:`KnownRiskModel`: a Beta mixture of 1..``max_components`` components,
    an error probability linear in the confidence (increasing, decreasing, constant,
    zero or one) and, when ``ties``, sometimes a grid of 2..101 reported levels."""
    _check_dim("max_components", max_components)
    k = draw(st.integers(1, max_components))
    comps = tuple(
        (draw(st.floats(0.05, 1.0)), draw(_SHAPES), draw(_SHAPES)) for _ in range(k)
    )
    shape = draw(st.sampled_from(["linear", "constant", "all_correct", "all_wrong", "inverted"]))
    if shape == "all_correct":
        base, slope = 0.0, 0.0
    elif shape == "all_wrong":
        base, slope = 1.0, 0.0
    elif shape == "constant":
        base, slope = draw(st.floats(0.0, 1.0)), 0.0
    elif shape == "linear":  # errors concentrate at low confidence (an informative score)
        base = draw(st.floats(0.0, 0.5))
        slope = draw(st.floats(0.0, 1.0 - base))
    else:  # errors concentrate at high confidence (an overconfident score)
        top = draw(st.floats(0.0, 1.0))
        slope = -draw(st.floats(0.0, top))
        base = top
    levels = draw(st.one_of(st.none(), st.integers(2, 101))) if ties else None
    return KnownRiskModel(components=comps, wrong_base=base, wrong_slope=slope, levels=levels)


@st.composite
def confidence_arrays(draw: st.DrawFn, min_size: int = 1, max_size: int = 300) -> FloatArray:
    """1-D float64 confidences in [0, 1]: a Beta mixture, the same rounded to a grid of
    2..101 points (ties), or a point mass (all equal, 0 and 1 included)."""
    _check_sizes(min_size, max_size)
    n = draw(st.integers(min_size, max_size))
    kind = draw(st.sampled_from(["mixture", "ties", "point_mass"]))
    if kind == "point_mass":
        value = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)))
        return np.full(n, value, dtype=np.float64)
    model = draw(risk_models(ties=False))
    rng = np.random.default_rng(draw(_SEEDS))
    conf, _ = model.draw(rng, n)
    if kind == "ties":
        levels = draw(st.integers(2, 101))
        conf = np.round(conf * (levels - 1)) / (levels - 1)
    return conf


@st.composite
def labelled_confidences(
    draw: st.DrawFn, min_size: int = 1, max_size: int = 300
) -> tuple[FloatArray, BoolArray]:
    """``(confidences, correct)`` of equal length: labels all correct, all wrong, or
    wrong with probability ``base + slope·(1 − c)`` (any sign of slope)."""
    conf = draw(confidence_arrays(min_size, max_size))
    labels = draw(st.sampled_from(["curve", "all_correct", "all_wrong"]))
    if labels == "all_correct":
        return conf, np.ones(conf.size, dtype=np.bool_)
    if labels == "all_wrong":
        return conf, np.zeros(conf.size, dtype=np.bool_)
    base, slope = draw(st.floats(0.0, 1.0)), draw(st.floats(-1.0, 1.0))
    rng = np.random.default_rng(draw(_SEEDS))
    p_wrong = np.clip(base + slope * (1.0 - conf), 0.0, 1.0)
    return conf, rng.uniform(size=conf.size) >= p_wrong


@dataclass(frozen=True, slots=True, eq=False)
class CalibrationSet:
    """A calibration set drawn from ``model``; ``model.risk(λ)`` is its true risk curve."""

    confidences: FloatArray
    correct: BoolArray
    model: KnownRiskModel

    def true_risk(self, thresholds: npt.ArrayLike) -> FloatArray:
        """The exact selective risk of the world this set was drawn from."""
        return self.model.risk(thresholds)


@st.composite
def calibration_sets(
    draw: st.DrawFn,
    min_size: int = 30,
    max_size: int = 500,
    models: st.SearchStrategy[KnownRiskModel] | None = None,
) -> CalibrationSet:
    """A :class:`CalibrationSet` of ``min_size..max_size`` items from a model drawn from
    ``models`` (default :func:`risk_models`), with its known true risk curve."""
    _check_sizes(min_size, max_size)
    model = draw(models if models is not None else risk_models())
    n = draw(st.integers(min_size, max_size))
    conf, ok = model.draw(np.random.default_rng(draw(_SEEDS)), n)
    return CalibrationSet(conf, ok, model)


# --------------------------------------------------------------------------- vectors, repositories


@st.composite
def unit_vectors(draw: st.DrawFn, dim: int) -> npt.NDArray[np.float32]:
    """One float32 unit vector of ``dim`` components, drawn component by component (so
    it shrinks towards axis-aligned vectors; near-zero draws become a basis vector)."""
    _check_dim("dim", dim)
    xs = draw(
        st.lists(
            st.floats(-1.0, 1.0, width=32, allow_nan=False, allow_infinity=False),
            min_size=dim,
            max_size=dim,
        )
    )
    v = np.asarray(xs, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if norm < 1e-3:
        v = np.zeros(dim)
        v[draw(st.integers(0, dim - 1))] = 1.0
        norm = 1.0
    return (v / norm).astype(np.float32)


@st.composite
def unit_matrices(draw: st.DrawFn, rows: int, dim: int) -> npt.NDArray[np.float32]:
    """``(rows, dim)`` float32 unit rows from a drawn seed (fast for large sizes)."""
    _check_dim("dim", dim)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise InvalidArgumentError("rows", f"must be an int >= 0, got {rows!r}")
    return random_unit(np.random.default_rng(draw(_SEEDS)), rows, dim)


_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40
).filter(lambda s: bool(s.strip()))


def entries(tenants: Sequence[str] = ("default",)) -> st.SearchStrategy[Entry]:
    """One :class:`Entry` with non-empty texts and a tenant from ``tenants``."""
    if isinstance(tenants, str) or not tenants:
        raise InvalidArgumentError("tenants", f"must be a non-empty sequence of names, got {tenants!r}")
    return st.builds(
        Entry, query=_TEXT, answer=_TEXT, strategy=_TEXT, tenant=st.sampled_from(list(tenants))
    )


@st.composite
def repositories(
    draw: st.DrawFn,
    dim: int,
    min_size: int = 0,
    max_size: int = 40,
    tenants: Sequence[str] = ("default",),
) -> Repository:
    """A :class:`Repository` of dimension ``dim`` built the way callers build one: by
    :func:`update` in one or more batches, sometimes appending to an older version (a
    branch), so both arena paths are exercised."""
    _check_dim("dim", dim)
    _check_sizes(min_size, max_size)
    n = draw(st.integers(min_size, max_size))
    items = draw(st.lists(entries(tenants), min_size=n, max_size=n))
    vectors = random_unit(np.random.default_rng(draw(_SEEDS)), n, dim)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    versions = [empty_repository(dim)]
    for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
        versions.append(update(versions[-1], items[lo:hi], vectors[lo:hi]))
    if n and draw(st.booleans()):  # rebuild the tail on an older version: a branch
        back = draw(st.integers(0, len(versions) - 1))
        base = versions[back]
        m = len(base)
        versions.append(update(base, items[m:], vectors[m:]))
    return versions[-1]


# --------------------------------------------------------------------------- queries

_MATH_GOLD = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.integers(1000, 10**7).map(lambda v: f"{v:,}"),
    st.integers(0, 10**4).map(lambda v: f"${v}"),
    st.decimals(0, 1000, places=2, allow_nan=False, allow_infinity=False).map(str),
    st.integers(0, 100).map(lambda v: f"{v}%"),
    st.tuples(st.integers(1, 50), st.integers(2, 50)).map(lambda t: f"{t[0]}/{t[1]}"),
)


@st.composite
def queries(draw: st.DrawFn, families: Sequence[str] = ("math", "mcq")) -> Query:
    """One :class:`Query` with a gold answer: a math item (integer, thousands,
    currency, decimal, percent or fraction gold) or a four-option MCQ item (gold A-D)."""
    if isinstance(families, str) or not families or not set(families) <= {"math", "mcq"}:
        raise InvalidArgumentError("families", f'must be a non-empty subset of ("math", "mcq"), got {families!r}')
    family = draw(st.sampled_from(list(families)))
    text = draw(_TEXT)
    qid = f"q{draw(st.integers(0, 10**6))}"
    if family == "math":
        return Query(text=text, gold=draw(_MATH_GOLD), family="math", id=qid)
    options = tuple(draw(st.lists(_TEXT, min_size=4, max_size=4)))
    return Query(text=text, gold=draw(st.sampled_from("ABCD")), family="mcq", id=qid, options=options)


@st.composite
def query_streams(
    draw: st.DrawFn, min_size: int = 1, max_size: int = 50, n_templates: int | None = None
) -> tuple[Query, ...]:
    """A stream of templated math problems with gold answers
    (:func:`~intercascade_core.models.sim.templated_math_stream`) that the simulated models
    answer like real ones: same-template problems share a wording with other numbers,
    so strategies can help. ``n_templates`` is drawn (1..10) when not given."""
    from ..models.sim import templated_math_stream

    _check_sizes(min_size, max_size)
    n = draw(st.integers(min_size, max_size))
    k = n_templates if n_templates is not None else draw(st.integers(1, 10))
    return templated_math_stream(n, n_templates=k, seed=draw(_SEEDS))
