"""A testing kit for your own guarantee checks (the ``testing`` extra:
``pip install 'intercascade[testing]'``).

* :func:`check_guarantee` — run R independent calibrations on data whose true risk is
  known (or estimable) and test the number of (α, δ) violations against a binomial
  allowance with a stated false-failure probability and power;
* samplers with exact risk: :class:`KnownRiskModel` (a parametric world) and
  :class:`FinitePopulation` (your own labelled pool);
* :mod:`.strategies` — Hypothesis strategies: confidence distributions, calibration
  sets with a known risk curve, unit vectors, repositories, query streams;
* :mod:`.pytest_plugin` — a ``statistical`` marker and fixtures (one seed for numpy and
  Hypothesis, simulated cascade levels without network); enable it with
  ``pytest_plugins = ["intercascade_core.testing.pytest_plugin"]`` in your conftest;
* :func:`simulated_levels` — the same simulated levels as a context manager.

Nothing in the library imports this package.
"""

from __future__ import annotations

from ..errors import DependencyMissingError

try:
    import hypothesis  # noqa: F401  (the strategies need it; fail here, once, clearly)
except ImportError as exc:
    raise DependencyMissingError(
        "intercascade_core.testing needs hypothesis (and pytest for its plugin): "
        "pip install 'intercascade[testing]'"
    ) from exc

from . import strategies
from .data import FinitePopulation, KnownRiskModel, clustered_unit, make_entries, random_unit
from .guarantee import (
    Calibrator,
    GuaranteeCheck,
    RiskFunction,
    Sampler,
    binomial_allowance,
    check_guarantee,
    detection_power,
    empirical_risk_threshold,
)
from .simulated import SimCascade, simulated_levels

__all__ = [
    "Calibrator",
    "FinitePopulation",
    "GuaranteeCheck",
    "KnownRiskModel",
    "RiskFunction",
    "Sampler",
    "SimCascade",
    "binomial_allowance",
    "check_guarantee",
    "clustered_unit",
    "detection_power",
    "empirical_risk_threshold",
    "make_entries",
    "random_unit",
    "simulated_levels",
    "strategies",
]
