"""A simulated weak model that *copies* wrong strategies, at two levels of detail.

Measured with the local pair (local-models.md §5): a wrong worked example in the prompt
is copied with high confidence — the weak model's mean confidence on wrong answers rose
from 0.90 to 0.97 with strategies. The paper's Theorem 2.2 assumes strategies only help;
this module provides the counter-example for tests.

* :class:`CopyingSimBackend` — the HTTP-level simulator (``sim.SimBackend``) with one
  change: when a weak prompt shows a same-template example whose answer is *wrong*
  (checked against the simulator's own answer key), the copying model answers wrong with
  probability ``copy_rate`` and with confidence drawn from ``copy_conf`` (default
  U(0.94, 1.0), mean 0.97), instead of its usual low-confidence wrong answers. Everything
  else (prompt reading, strategies that help, determinism) is the plain simulator's.
* :class:`CopyingProcess` — the same mechanism at the level of (confidence, correct)
  pairs, vectorised with numpy, with the selective risk R(λ) in closed form. Each weak
  query sees no same-template strategy, a right one or a wrong one (probabilities
  ``1 − π_right − π_wrong``, ``π_right``, ``π_wrong``: the stationary regime of a
  repository that already covers the stream's templates). The statistical tests draw
  thousands of calibration sets from it; the full cascade would be far too slow for that.
  :meth:`CopyingProcess.stream` adds the stream dynamics: a per-template repository that
  grows from the stream's own deferred queries (the strong model accepts and teaches with
  fixed probabilities, some of its strategies wrong), so the weak model's pairs depend on
  λ_w through which queries taught — what in-situ calibration's replay captures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from ..core.prompts import EXAMPLE_CLOSE, EXAMPLE_OPEN
from ..core.tasks import answers_match, extract_answer
from ..errors import InvalidArgumentError
from .sim import SimBackend, same_template

__all__ = ["CopyingProcess", "CopyingSimBackend", "StreamNoise"]

_OPEN = re.escape(EXAMPLE_OPEN.split("{")[0])
_CLOSE = re.escape(EXAMPLE_CLOSE.split("{")[0])
_BLOCK = re.compile(rf"{_OPEN}\d+>>>\n(.*?)\n{_CLOSE}", re.DOTALL)


@dataclass
class CopyingSimBackend(SimBackend):
    """:class:`~intercascade_core.models.sim.SimBackend` whose ``copiers`` copy wrong examples.

    copy_rate: probability that a copier answers wrong when a same-template example in its
    prompt carries a wrong answer. copy_conf: ``(lo, hi, power)`` of the confidence of
    such a copied wrong answer (``lo + (hi − lo)·v**power``, v ~ U(0, 1)).
    """

    copiers: frozenset[str] = field(default_factory=lambda: frozenset({"sim-weak"}))
    copy_rate: float = 0.9
    copy_conf: tuple[float, float, float] = (0.94, 1.0, 1.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.copy_rate <= 1.0:
            raise InvalidArgumentError("copy_rate", f"must lie in [0, 1], got {self.copy_rate!r}")
        lo, hi, power = self.copy_conf
        if not (0.0 < lo <= hi <= 1.0 and power > 0):
            raise InvalidArgumentError("copy_conf", f"needs 0 < lo <= hi <= 1 and power > 0, got {self.copy_conf!r}")

    def shows_wrong_example(self, prompt: str) -> bool:
        """Whether the prompt shows a same-template example with a wrong answer."""
        question, _ = self._question(prompt)
        for block in _BLOCK.findall(prompt):
            problem = re.search(r"^Problem: (.*)$", block, re.MULTILINE)
            answer = re.search(r"^Answer: (.*)$", block, re.MULTILINE)
            if problem is None or answer is None:
                continue
            ex_q = problem.group(1).strip()
            if not same_template(ex_q, question):
                continue
            gold = self._gold(ex_q)
            if gold is None:
                continue
            ans = extract_answer(f"Answer: {answer.group(1)}", "math")
            if ans is None or not answers_match(ans, gold, "math"):
                return True
        return False

    def _complete(self, model: str, prompt: str, req: Any) -> dict[str, Any]:
        if model in self.copiers and self.shows_wrong_example(prompt):
            prof = replace(self.profiles[model], taught_accuracy=1.0 - self.copy_rate, wrong_conf=self.copy_conf)
            copier = SimBackend(seed=self.seed, profiles={model: prof}, answer_key=self.answer_key,
                                knobs=self.knobs)
            return copier._complete(model, prompt, req)
        return super()._complete(model, prompt, req)


# ----------------------------------------------------------------------------- vectorised
Beta = tuple[float, float]


@dataclass(frozen=True, slots=True, eq=False)
class StreamNoise:
    """The randomness of ``m`` streams of ``n`` queries, drawn once so that replaying the
    same calibration split with other thresholds reuses it (a deterministic model on the
    same queries), while a fresh draw is a fresh stream. All arrays are ``(m, n)``."""

    template: npt.NDArray[np.int64]
    u_correct: npt.NDArray[np.float64]
    v_conf: npt.NDArray[np.float64]
    u_accept: npt.NDArray[np.float64]
    u_wrong: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class CopyingProcess:
    """(confidence, correct) of a weak model with and without strategies.

    Without strategies: correct with probability ``p_correct``; confidence ~
    Beta(``conf_correct``) if correct, Beta(``conf_wrong``) if wrong.
    With strategies, per query:

    * no same-template strategy (prob ``1 − pi_right − pi_wrong``): as without;
    * a right strategy (``pi_right``): correct w.p. ``p_correct_taught``, confidence
      Beta(``conf_taught``); wrong ones keep Beta(``conf_wrong``);
    * a wrong strategy (``pi_wrong``): copied — wrong w.p. ``copy_rate`` with confidence
      Beta(``conf_copy``); otherwise correct with Beta(``conf_taught``).

    Defaults: a copied wrong answer has mean confidence 0.97 and a taught right one 0.99
    (the measured levels); without strategies right answers average 0.92 and wrong ones
    0.67 — more informative than the local pair's 0.89/0.90, with which any calibration
    would simply abstain. Then R(λ) without strategies falls from 0.5 to 0 as λ → 1, but
    with strategies it stays near 0.18 at λ = 0.9: a threshold that is safe without
    strategies is not safe with them.
    """

    p_correct: float = 0.5
    conf_correct: Beta = (12.0, 1.0)
    conf_wrong: Beta = (4.0, 2.0)
    pi_right: float = 0.5
    pi_wrong: float = 0.15
    p_correct_taught: float = 0.9
    copy_rate: float = 0.8
    conf_taught: Beta = (99.0, 1.0)
    conf_copy: Beta = (32.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("p_correct", "pi_right", "pi_wrong", "p_correct_taught", "copy_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InvalidArgumentError(name, f"must lie in [0, 1], got {v!r}")
        if self.pi_right + self.pi_wrong > 1.0:
            raise InvalidArgumentError("pi_wrong", "pi_right + pi_wrong must not exceed 1")

    def _components(self, strategies: bool) -> list[tuple[float, bool, Beta]]:
        """(weight, correct, confidence law) of each mixture component."""
        free = [(self.p_correct, True, self.conf_correct), (1 - self.p_correct, False, self.conf_wrong)]
        if not strategies:
            return free
        none = 1.0 - self.pi_right - self.pi_wrong
        return [(none * w, c, b) for w, c, b in free] + [
            (self.pi_right * self.p_correct_taught, True, self.conf_taught),
            (self.pi_right * (1 - self.p_correct_taught), False, self.conf_wrong),
            (self.pi_wrong * self.copy_rate, False, self.conf_copy),
            (self.pi_wrong * (1 - self.copy_rate), True, self.conf_taught),
        ]

    def draw(
        self, rng: np.random.Generator, shape: int | tuple[int, ...], *, strategies: bool
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """Independent (confidence, correct) draws of the given shape."""
        comps = self._components(strategies)
        weights = np.array([w for w, _, _ in comps])
        which = rng.choice(len(comps), size=shape, p=weights / weights.sum())
        conf = np.empty(which.shape)
        correct = np.empty(which.shape, dtype=np.bool_)
        for i, (_, ok, (a, b)) in enumerate(comps):
            sel = which == i
            conf[sel] = rng.beta(a, b, size=int(sel.sum()))
            correct[sel] = ok
        return conf, correct

    def accept_rate(self, lam: npt.ArrayLike, *, strategies: bool) -> np.ndarray:
        """P(conf >= λ)."""
        lam_a = np.asarray(lam, dtype=np.float64)
        total = np.zeros(lam_a.shape)
        for w, _, (a, b) in self._components(strategies):
            total = total + w * np.asarray(stats.beta.sf(lam_a, a, b), dtype=np.float64)
        return total

    def risk(self, lam: npt.ArrayLike, *, strategies: bool) -> np.ndarray:
        """The selective risk R(λ) = P(wrong | conf >= λ) in closed form (0 where nothing
        is accepted, e.g. λ = inf)."""
        lam_a = np.asarray(lam, dtype=np.float64)
        finite = np.where(np.isfinite(lam_a), lam_a, 2.0)
        comps = self._components(strategies)
        acc = sum(w * stats.beta.sf(finite, a, b) for w, _, (a, b) in comps)
        err = sum(w * stats.beta.sf(finite, a, b) for w, ok, (a, b) in comps if not ok)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(acc > 0, err / np.where(acc > 0, acc, 1.0), 0.0)

    # ------------------------------------------------------------------ stream dynamics
    @staticmethod
    def stream_noise(rng: np.random.Generator, m: int, n: int, *, n_templates: int = 10) -> StreamNoise:
        """Fresh randomness for ``m`` streams of ``n`` queries over ``n_templates`` templates."""
        return StreamNoise(
            template=rng.integers(0, n_templates, size=(m, n)),
            u_correct=rng.uniform(size=(m, n)),
            v_conf=rng.uniform(size=(m, n)),
            u_accept=rng.uniform(size=(m, n)),
            u_wrong=rng.uniform(size=(m, n)),
        )

    def stream(
        self,
        noise: StreamNoise,
        thresholds: npt.ArrayLike,
        *,
        strong_accept: float = 0.9,
        strong_wrong: float = 0.15,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.int8]]:
        """Run ``m`` streams from empty repositories, stream i with weak threshold
        ``thresholds[i]``; return the weak model's (confidence, correct) per query and the
        strategy it saw (0 none, 1 right, 2 wrong).

        Each query's weak prompt carries the most recent strategy stored for its template.
        A query the weak model defers (confidence < λ_w) goes to the strong model, which
        accepts with probability ``strong_accept`` and then stores a strategy for the
        template, wrong with probability ``strong_wrong``.
        """
        lam = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), noise.template.shape[:1])
        m, n = noise.template.shape
        n_templates = int(noise.template.max()) + 1 if noise.template.size else 1
        latest = np.zeros((m, n_templates), dtype=np.int8)
        conf = np.empty((m, n))
        correct = np.empty((m, n), dtype=np.bool_)
        seen = np.empty((m, n), dtype=np.int8)
        rows = np.arange(m)
        (a_c, b_c), (a_w, b_w) = self.conf_correct, self.conf_wrong
        (a_t, b_t), (a_k, b_k) = self.conf_taught, self.conf_copy
        for t in range(n):
            tau = noise.template[:, t]
            s = latest[rows, tau]
            p_ok = np.where(s == 0, self.p_correct, np.where(s == 1, self.p_correct_taught, 1 - self.copy_rate))
            ok = noise.u_correct[:, t] < p_ok
            a = np.where(ok, np.where(s == 0, a_c, a_t), np.where(s == 2, a_k, a_w))
            b = np.where(ok, np.where(s == 0, b_c, b_t), np.where(s == 2, b_k, b_w))
            c = stats.beta.ppf(noise.v_conf[:, t], a, b)
            conf[:, t], correct[:, t], seen[:, t] = c, ok, s
            teach = (c < lam) & (noise.u_accept[:, t] < strong_accept)
            latest[rows[teach], tau[teach]] = np.where(noise.u_wrong[teach, t] < strong_wrong, 2, 1)
        return conf, correct, seen
