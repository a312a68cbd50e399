"""Strategy hygiene: show the weak model less that it can copy, and retract bad strategies.

Measured with the local pair (local-models.md §5), a wrong *worked solution* in the prompt
is copied with high confidence (mean confidence on wrong answers 0.90 → 0.97), which is
what breaks a threshold calibrated without strategies. Two options reduce the damage:

1. **Reduced strategies** — give the weak model the general strategy and the example's
   final answer, not the worked solution. :func:`general_strategy` strips a teacher reply
   (or a stored strategy) down to its method: the ``Solution:`` section is dropped and so
   is every sentence that carries the instance's arithmetic (``12 + 5 = 17``, ``3 × 4``,
   ``= 17``). :func:`reduced_strategy_text` is the prompt-ready text "general strategy +
   the example's final answer". :func:`reduce_entry` / :func:`reduce_repository` apply it to
   stored entries, and :class:`HygienicTeacher` wraps the strong model so the cascade
   stores reduced strategies from the start (no change to the cascade needed).

2. **Dropping refuted strategies** — when a strategy's source answer later proves wrong
   (user feedback, the audit's labels, a gold answer arriving late), build a *new
   repository version* without it: :func:`drop_strategies` is pure (the old version stays
   valid and unchanged, as every repository value does), keeps the surviving entries'
   ids, order, tenants and embeddings, and costs O(n·d) (a fresh arena). Which entries
   are refuted is :func:`refuted_ids`; :func:`drop_refuted` applies it to every
   repository of a :class:`~intercascade_core.core.cascade.CascadeState`.

Either change alters the weak model's confidence distribution with strategies, so a
threshold from in-situ calibration is valid only for the hygiene it was calibrated with:
calibrate (``insitu.insitu_calibrate``) with the same teacher wrapper and drop policy you
deploy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, MalformedStrategy
from .cascade import CascadeState
from .prompts import STRATEGY_REQUEST_MARK, parse_strategy
from .protocols import Generation, TextModel
from .repository import Entry, Repository, append_exact, empty_repository
from .tasks import Family, answers_match, extract_answer

__all__ = [
    "HygienicTeacher",
    "drop_refuted",
    "drop_strategies",
    "general_strategy",
    "reduce_entry",
    "reduce_repository",
    "reduced_strategy_text",
    "refuted_ids",
]

# an instance computation: a number, an operator, a number (3 + 4, 12*5, 6 × 7, 10/2)
_ARITH = re.compile(r"\d[\d,.]*\s*[-+*/×x÷^]\s*\(?\s*\$?\d")
# a result: "= 17", "=17.5", "equals 12"
_RESULT = re.compile(r"(=|\bequals\b)\s*\$?-?\d")
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n+")


def _is_worked(sentence: str) -> bool:
    return bool(_ARITH.search(sentence) or _RESULT.search(sentence))


def general_strategy(text: str, *, problem: str | None = None) -> str:
    """The method only: no worked solution, no instance arithmetic.

    ``text`` is a teacher reply with ``Solution: / Answer: / Strategy:`` sections (only the
    strategy is kept) or a bare strategy. Sentences with a computation on numbers
    (``a op b``) or a numeric result (``= n``) are removed. Raises
    :class:`~intercascade_core.errors.InvalidArgumentError` when nothing general is left.
    ``problem`` is passed to the strategy parser (it rejects strategies that quote the
    instance's numbers).
    """
    if not isinstance(text, str):
        raise InvalidArgumentError("text", f"expected str, got {type(text).__name__}")
    try:
        body = parse_strategy(text, problem=problem).strategy
    except MalformedStrategy:
        body = text  # a bare strategy, not a labelled reply
    kept = [s.strip() for s in _SENTENCE.split(body) if s.strip() and not _is_worked(s)]
    out = " ".join(kept).strip()
    if not out:
        raise InvalidArgumentError("text", "nothing general is left once the worked solution is removed")
    return out


def reduced_strategy_text(text: str, answer: str, *, problem: str | None = None) -> str:
    """The reduced form shown to the weak model: the general strategy, then the example's
    final answer on its own line, and no worked solution."""
    if not isinstance(answer, str):
        raise InvalidArgumentError("answer", f"expected str, got {type(answer).__name__}")
    return f"{general_strategy(text, problem=problem)}\nFinal answer of the example: {answer.strip()}"


def reduce_entry(entry: Entry) -> Entry:
    """The entry with its strategy reduced to the general method (``answer`` is kept: the
    weak prompt already shows it as the example's final answer)."""
    if not isinstance(entry, Entry):
        raise InvalidArgumentError("entry", f"expected an Entry, got {type(entry).__name__}")
    return replace(entry, strategy=general_strategy(entry.strategy))


def _rebuild(repo: Repository, keep: np.ndarray, transform: Callable[[Entry], Entry] | None) -> Repository:
    entries = [repo.entries[int(i)] for i in keep]
    if transform is not None:
        entries = [transform(e) for e in entries]
    rows = np.array(repo.vectors[keep], dtype=np.float32, copy=True).reshape(len(entries), repo.dim)
    # rows that already come from a repository are stored bit-exactly
    return append_exact(empty_repository(repo.dim), entries, rows)


def reduce_repository(repo: Repository) -> Repository:
    """A new version whose every strategy is reduced (:func:`reduce_entry`); pure."""
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    return _rebuild(repo, np.arange(len(repo)), reduce_entry)


def drop_strategies(repo: Repository, drop: Callable[[Entry], bool] | Iterable[int]) -> Repository:
    """A new repository version without the entries to drop; ``repo`` is unchanged.

    ``drop`` is a predicate on entries or a collection of entry ids. Survivors keep their
    ids, order, tenants and (bit-identical) embeddings. Returns ``repo`` itself when
    nothing is dropped.
    """
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    if callable(drop):
        pred = drop
    else:
        if isinstance(drop, (str, bytes)):
            raise InvalidArgumentError("drop", "must be a predicate or a collection of entry ids")
        ids = set()
        for i in drop:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise InvalidArgumentError("drop", f"entry ids must be ints, got {i!r}")
            ids.add(int(i))

        def pred(e: Entry) -> bool:
            return e.id in ids

    keep = np.asarray([i for i, e in enumerate(repo.entries) if not pred(e)], dtype=np.int64)
    if keep.size == len(repo):
        return repo
    return _rebuild(repo, keep, None)


def refuted_ids(
    repo: Repository,
    gold: Mapping[str, str] | Callable[[Entry], bool | None],
    *,
    family: Family = "math",
) -> tuple[int, ...]:
    """Ids of the entries whose source answer is now known to be wrong.

    ``gold`` maps a source query's text to its (late) gold answer, or is a callable that
    says whether an entry's answer is wrong (``True``), right (``False``) or unknown
    (``None``). Entries without a verdict stay.
    """
    if not isinstance(repo, Repository):
        raise InvalidArgumentError("repo", f"must be a Repository, got {type(repo).__name__}")
    out = []
    for e in repo.entries:
        if callable(gold):
            wrong = gold(e)
        elif isinstance(gold, Mapping):
            g = gold.get(e.query)
            if g is None:
                wrong = None
            else:
                ans = extract_answer(f"Answer: {e.answer}", family) if e.answer else None
                wrong = ans is None or not answers_match(ans, g, family)
        else:
            raise InvalidArgumentError("gold", f"must be a mapping or a callable, got {type(gold).__name__}")
        if wrong:
            out.append(e.id)
    return tuple(out)


def drop_refuted(
    state: CascadeState,
    gold: Mapping[str, str] | Callable[[Entry], bool | None],
    *,
    family: Family = "math",
) -> CascadeState:
    """The cascade state with every repository rebuilt without its refuted strategies
    (identified per repository, since ids are per repository); ``state`` is unchanged."""
    if not isinstance(state, CascadeState):
        raise InvalidArgumentError("state", f"expected a CascadeState, got {type(state).__name__}")
    repos = tuple(drop_strategies(r, refuted_ids(r, gold, family=family)) for r in state.repositories)
    return replace(state, repositories=repos)


@dataclass(frozen=True, slots=True)
class HygienicTeacher:
    """Wraps the strong model so the strategies it teaches are reduced.

    Teacher calls (prompts carrying ``prompts.STRATEGY_REQUEST_MARK`` with the answer
    already given, i.e. the cascade's default two-call mode) get a reply of just
    ``Answer:`` and the general ``Strategy:``; every other call (the strong model's
    answers, whose confidence the cascade uses) passes through untouched. A reply left
    with no general strategy is passed on unchanged, for the cascade's parser to judge.
    """
    inner: TextModel

    @property
    def model(self) -> str:
        return str(self.inner.model)

    def generate(self, messages: Sequence[Mapping[str, str]], **params: Any) -> Generation:
        gen = self.inner.generate(messages, **params)
        prompt = "\n".join(str(m.get("content", "")) for m in messages)
        if STRATEGY_REQUEST_MARK not in prompt or "your final answer was:" not in prompt:
            return gen
        try:
            parsed = parse_strategy(gen.text)
            strategy = general_strategy(parsed.strategy)
        except (MalformedStrategy, InvalidArgumentError):
            return gen
        text = f"Answer: {parsed.answer}\nStrategy: {strategy}"
        return replace(gen, text=text)
