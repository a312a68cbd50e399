"""prune: cap with least-used / oldest eviction, near-duplicate suppression, usage counters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intercascade_core.core.prune import (
    add_unique,
    compact,
    dedupe,
    evict,
    find_near_duplicate,
    record_uses,
)
from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.errors import InvalidArgumentError
from tests.strategies import random_unit

DIM = 16


def _repo(n: int, seed: int = 0, tenants=("default",), created=None):
    rng = np.random.default_rng(seed)
    vec = random_unit(rng, n, DIM)
    es = [
        Entry(
            f"q{i}",
            "a",
            "s",
            created_at=float(created[i] if created is not None else i),
            tenant=tenants[i % len(tenants)],
        )
        for i in range(n)
    ]
    return update(empty_repository(DIM), es, vec)


def test_record_uses_is_pure() -> None:
    u0 = np.array([1, 0, 2], dtype=np.int64)
    u1 = record_uses(u0, [0, 2, 2], 5)
    assert u0.tolist() == [1, 0, 2]
    assert u1.tolist() == [2, 0, 4, 0, 0] and not u1.flags.writeable
    with pytest.raises(InvalidArgumentError, match="rows"):
        record_uses(u0, [5], 5)


def test_evict_least_used_keeps_most_used_in_order() -> None:
    repo = _repo(6)
    uses = np.array([5, 0, 3, 0, 9, 1])
    pr = evict(repo, 3, policy="least_used", uses=uses)
    assert pr.kept.tolist() == [0, 2, 4]
    assert [e.query for e in pr.repository.entries] == ["q0", "q2", "q4"]
    assert [e.id for e in pr.repository.entries] == [0, 1, 2]  # ids renumbered to rows
    assert pr.uses.tolist() == [5, 3, 9]
    np.testing.assert_array_equal(pr.repository.vectors, repo.vectors[[0, 2, 4]])
    assert len(repo) == 6  # input unchanged


def test_evict_ties_go_to_the_oldest_then_lower_row() -> None:
    repo = _repo(4, created=[3, 1, 1, 2])
    pr = evict(repo, 2, policy="least_used", uses=np.zeros(4, np.int64))
    assert pr.kept.tolist() == [0, 3]  # rows 1 and 2 are the oldest (created 1)
    pr = evict(repo, 3, policy="oldest")
    assert pr.kept.tolist() == [0, 2, 3]  # row 1: oldest, lower row of the tie


def test_evict_noop_returns_same_repository() -> None:
    repo = _repo(3)
    assert evict(repo, 3).repository is repo
    assert len(evict(repo, 0).repository) == 0


@settings(max_examples=40)
@given(
    n=st.integers(0, 40),
    cap=st.integers(0, 45),
    seed=st.integers(0, 1000),
    policy=st.sampled_from(["least_used", "oldest"]),
)
def test_evict_property(n, cap, seed, policy) -> None:
    rng = np.random.default_rng(seed)
    created = rng.integers(0, 5, size=n)
    repo = _repo(n, seed, tenants=("a", "b", "c"), created=created)
    uses = rng.integers(0, 4, size=n)
    pr = evict(repo, cap, policy=policy, uses=uses)
    assert len(pr.repository) == min(n, cap)
    kept = pr.kept.tolist()
    assert kept == sorted(set(kept))
    evicted = sorted(set(range(n)) - set(kept))
    key = (
        (lambda r: (uses[r], created[r], r))
        if policy == "least_used"
        else (lambda r: (created[r], r))
    )
    if kept and evicted:
        assert max(key(r) for r in evicted) < min(key(r) for r in kept)
    for new_row, old_row in enumerate(kept):
        e_new, e_old = pr.repository.entries[new_row], repo.entries[old_row]
        assert (e_new.query, e_new.tenant, e_new.id) == (e_old.query, e_old.tenant, new_row)
        assert pr.repository.tenant_code(e_new.tenant) >= 0


def test_dedupe_within_tenant_only() -> None:
    rng = np.random.default_rng(3)
    base = random_unit(rng, 3, DIM)
    noise = random_unit(rng, 3, DIM) * 0.01
    near = base + noise
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    vec = np.vstack([base, near]).astype(np.float32)
    es = [Entry(f"q{i}", "a", "s", tenant=t) for i, t in enumerate(["a", "a", "b", "a", "b", "a"])]
    # row 3 ~ row 0 (same tenant a): dropped; row 4 ~ row 1 (a vs b): kept; row 5 ~ row 2 (b vs a): kept
    repo = update(empty_repository(DIM), es, vec)
    pr = dedupe(repo, 0.01, uses=np.array([1, 0, 0, 5, 0, 0]))
    assert pr.kept.tolist() == [0, 1, 2, 4, 5]
    assert pr.uses.tolist() == [6, 0, 0, 0, 0]  # the duplicate's uses go to the kept row
    assert dedupe(repo, 0.0).repository is repo  # distance 0: no exact duplicates here


def test_find_near_duplicate_and_add_unique() -> None:
    repo = _repo(10, tenants=("a", "b"))
    v = np.asarray(repo.vectors[4])  # row 4 is tenant a
    assert find_near_duplicate(repo, v, "a", 1e-4) == 4
    assert find_near_duplicate(repo, v, "b", 1e-4) is None
    assert find_near_duplicate(repo, v, "nobody", 1e-4) is None
    batch = [
        Entry("x", "a", "s", tenant="a"),
        Entry("y", "a", "s", tenant="b"),
        Entry("z", "a", "s", tenant="b"),
    ]
    vecs = np.vstack([v, v, v]).astype(np.float32)
    new, stored = add_unique(repo, batch, vecs, 1e-4)
    assert stored.tolist() == [False, True, False]  # dup of row 4 / new / dup of "y"
    assert len(new) == 11 and new.entries[10].query == "y" and len(repo) == 10


def test_compact_and_bad_arguments() -> None:
    repo = _repo(5)
    pr = compact(repo, [4, 1, 1])
    assert pr.kept.tolist() == [1, 4] and len(pr.repository) == 2
    with pytest.raises(InvalidArgumentError, match="rows"):
        compact(repo, [5])
    with pytest.raises(InvalidArgumentError, match="max_entries"):
        evict(repo, -1)
    with pytest.raises(InvalidArgumentError, match="policy"):
        evict(repo, 1, policy="random")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="max_distance"):
        dedupe(repo, 3.0)
    with pytest.raises(InvalidArgumentError, match="repo"):
        evict([], 1)  # type: ignore[arg-type]
