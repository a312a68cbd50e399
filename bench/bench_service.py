"""Benchmark: committing one taught strategy in the thread-safe service at 200k x 384.

    python -m pytest bench/bench_service.py -p no:cacheprovider --benchmark-disable-gc \
        --benchmark-columns=median,min,max,rounds --benchmark-group-by=group
    BENCH_SERVICE_N=20000 python -m pytest bench/bench_service.py   # smaller, faster

What is timed, on one repository of ``N`` rows (default 200,000) of 384-d unit vectors:

* ``commit``: :class:`~intercascade_core.service.Cascade` committing one pending teaching
  (a :class:`~intercascade_core.core.machine.Done` from a real query) — reserve under the
  lock (sanitise, append in place to the newest version, counters ``current + delta``) and
  publish. No store, no dedupe: the commit itself. It calls the private ``_commit``, the
  step :meth:`Cascade.ask` takes after the query's model calls; target: <= 1 ms median;
* ``commit_lock_held``: the part of it under the lock (reserve and publish; the
  entry's sanitising runs before the lock is taken);
* ``ask``: the whole :meth:`Cascade.ask` with instant in-process models and ``k=0`` (no
  retrieval): the query machine, the embedding, three model calls and the commit;
* ``update_in_place``: :func:`~intercascade_core.core.repository.update` of one row onto the
  newest version (what the commit's append costs by itself);
* baseline ``branch_copy``: the same ``update`` onto a version that another request has
  already extended — what the service did before whenever two requests taught
  concurrently: every row is copied into a fresh arena.

The repository grows by one row per timed commit; the row capacity (a power of two,
262,144 at N = 200,000) is not reached, so no round includes a capacity doubling.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from intercascade_core.core.cascade import CascadeConfig, Level, drive, init_state
from intercascade_core.core.machine import Done, QueryMachine
from intercascade_core.core.protocols import Generation
from intercascade_core.core.repository import Entry, Repository, empty_repository, update
from intercascade_core.models.hashing import HashingEmbedder
from intercascade_core.models.sim import templated_math_stream
from intercascade_core.service import Cascade
from tests._crash_worker import fixed_calibration

N = int(os.environ.get("BENCH_SERVICE_N", "200000"))
DIM = 384
COMMIT_ROUNDS = 2000
STRATEGY = (
    "Track one running total: start from the initial amount, add what is received and "
    "subtract what is given away, in the order the events happen; check the units."
)


class _Instant:
    """A model that answers at once: level 0 never clears its threshold, the last level
    answers and writes a strategy when asked to."""

    def __init__(self, name: str) -> None:
        self.model = name

    def generate(self, messages: Sequence[Mapping[str, str]], **params: Any) -> Generation:
        teach = "reusable strategy" in messages[-1]["content"]
        text = f"Answer: 3\nStrategy: {STRATEGY}" if teach else "Answer: 3"
        return Generation(
            text=text,
            tokens=(),
            logprobs=(),
            confidence=0.99,
            prompt_tokens=1,
            completion_tokens=1,
            model=self.model,
            cost=None,
        )




def _repository(n: int) -> Repository:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, DIM), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    entries = [Entry(f"Problem {i}", str(i % 97), STRATEGY, source_level=1) for i in range(n)]
    return update(empty_repository(DIM), entries, v)


CONFIG = CascadeConfig(policy="retrieval", k=0)
LEVELS = [Level(_Instant("weak"), "weak"), Level(_Instant("strong"), "strong")]
EMBEDDER = HashingEmbedder(dim=DIM)


class _Newest:
    """The newest version of the benchmark's one arena, handed from test to test (a test
    that started from an older one would pay one branch copy in its first round)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo


@pytest.fixture(scope="module")
def newest() -> Iterator[_Newest]:
    t0 = time.perf_counter()
    repo = _repository(N)
    print(f"\n[bench_service] n={N} dim={DIM} built in {time.perf_counter() - t0:.1f} s")
    yield _Newest(repo)


def _cascade(repo: Repository) -> Cascade:
    state = init_state([fixed_calibration(1.01), fixed_calibration(0.0)], DIM)
    return Cascade(
        LEVELS, EMBEDDER, state=dataclasses.replace(state, repositories=(repo,)), config=CONFIG
    )


def _done(cascade: Cascade) -> Done:
    """One real query's pending result: strong-accepted, one teaching for repository 0."""
    query = templated_math_stream(1, seed=5)[0]
    machine = QueryMachine(cascade.state, query, ["weak", "strong"], CONFIG, index=0)
    done = drive(machine, LEVELS, EMBEDDER)
    assert len(done.teachings) == 1 and done.teachings[0].targets == (0,)
    return done


@pytest.mark.benchmark(group="commit one teaching")
def test_commit(benchmark: Any, newest: _Newest) -> None:
    start = newest.repo
    cascade = _cascade(start)
    base, done = cascade.state, _done(cascade)
    benchmark.pedantic(
        lambda: cascade._commit(base, 0, done), rounds=COMMIT_ROUNDS, warmup_rounds=0
    )
    newest.repo = after = cascade.state.repositories[0]
    assert len(after) == len(start) + COMMIT_ROUNDS
    assert np.shares_memory(after.vectors, start.vectors)  # appended in place, never copied


@pytest.mark.benchmark(group="commit one teaching")
def test_commit_lock_held(benchmark: Any, newest: _Newest) -> None:
    """The part of the commit that holds the lock: reserve and publish."""
    start = newest.repo
    cascade = _cascade(start)
    base, done = cascade.state, _done(cascade)

    def locked() -> None:
        with cascade._cond:
            res, _ = cascade._reserve(base, 0, done)
            cascade._publish(res)

    benchmark.pedantic(locked, rounds=COMMIT_ROUNDS, warmup_rounds=0)
    newest.repo = after = cascade.state.repositories[0]
    assert len(after) == len(start) + COMMIT_ROUNDS
    assert np.shares_memory(after.vectors, start.vectors)


@pytest.mark.benchmark(group="commit one teaching")
def test_ask(benchmark: Any, newest: _Newest) -> None:
    start = newest.repo
    cascade = _cascade(start)
    query = templated_math_stream(1, seed=6)[0]
    out = benchmark.pedantic(lambda: cascade.ask(query), rounds=500, warmup_rounds=5)
    newest.repo = after = cascade.state.repositories[0]
    assert out.stored_in == (0,) and np.shares_memory(after.vectors, start.vectors)


@pytest.mark.benchmark(group="commit one teaching")
def test_update_in_place(benchmark: Any, newest: _Newest) -> None:
    row = newest.repo.vectors[:1].copy()
    entry = Entry("in place", "0", STRATEGY)

    def append() -> None:
        newest.repo = update(newest.repo, [entry], row)

    benchmark.pedantic(append, rounds=COMMIT_ROUNDS, warmup_rounds=0)


@pytest.mark.benchmark(group="commit one teaching")
def test_baseline_branch_copy(benchmark: Any, newest: _Newest) -> None:
    older = newest.repo
    row = older.vectors[:1].copy()
    entry = Entry("branch", "0", STRATEGY)
    # another request extends it first: ``older`` is no longer the newest version
    newest.repo = update(older, [Entry("someone else's", "0", STRATEGY)], row)
    copy = benchmark.pedantic(lambda: update(older, [entry], row), rounds=15, warmup_rounds=1)
    assert not np.shares_memory(copy.vectors, older.vectors)  # a full copy, every round
