"""Stateful Hypothesis test of the repository against a plain-list model (pyrsistent).

Every rule updates an *arbitrary* earlier version (newest → in-place append,
older → copy) and the invariant re-checks every version ever made against the
model's snapshot of it: no version is ever changed by a later update.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from intercascade_core import Entry, Repository, empty_repository, retrieve, update
from tests.strategies import random_unit

DIM = 5


class RepositoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.versions: list[tuple[Repository, list[Entry], np.ndarray]] = [
            (empty_repository(DIM), [], np.empty((0, DIM), np.float32))
        ]

    @rule(
        data=st.data(),
        count=st.integers(0, 6),
        seed=st.integers(0, 2**16),
        tenant=st.sampled_from(["default", "t1", "t2"]),
    )
    def update_some_version(self, data: st.DataObject, count: int, seed: int, tenant: str) -> None:
        which = data.draw(st.integers(0, len(self.versions) - 1), label="version")
        repo, model_entries, model_vectors = self.versions[which]
        before = (len(repo), repo.vectors.copy(), list(repo.entries))
        new_entries = [Entry(f"q{seed}-{i}", "a", "s", tenant=tenant) for i in range(count)]
        vectors = random_unit(np.random.default_rng(seed), count, DIM)
        vectors_in = vectors.copy()
        new = update(repo, new_entries, vectors)
        # inputs unmodified
        np.testing.assert_array_equal(vectors, vectors_in)
        assert (len(repo), list(repo.entries)) == (before[0], before[2])
        np.testing.assert_array_equal(repo.vectors, before[1])
        expect_entries = model_entries + [
            Entry(e.query, e.answer, e.strategy, tenant=e.tenant, id=len(model_entries) + i)
            for i, e in enumerate(new_entries)
        ]
        self.versions.append(
            (new, expect_entries, np.concatenate([model_vectors, new.vectors[len(repo) :]]))
        )
        np.testing.assert_allclose(new.vectors[len(repo) :], vectors, rtol=1e-6, atol=1e-7)

    @precondition(lambda self: len(self.versions) > 1)
    @rule(data=st.data(), k=st.integers(0, 8))
    def retrieve_from_some_version(self, data: st.DataObject, k: int) -> None:
        """backend="exact" (the C extension or its numpy twin, see conftest) on any
        version: only that version's rows, exactly the rows a scan of the model finds."""
        which = data.draw(st.integers(0, len(self.versions) - 1), label="version")
        repo, model_entries, model_vectors = self.versions[which]
        q = random_unit(np.random.default_rng(k), 1, DIM)
        tenant = data.draw(st.sampled_from([None, "default", "t1", "t2"]), label="tenant")
        res = retrieve(repo, q, k, tenant=tenant)
        owned = [i for i, e in enumerate(model_entries) if tenant in (None, e.tenant)]
        assert res.indices.shape == (1, min(k, len(owned)))
        assert set(res.indices.ravel().tolist()) <= set(owned)
        if owned:  # the model's own scan: cosine order, ties to the lower row
            scores = model_vectors[owned].astype(np.float64) @ q[0].astype(np.float64)
            best = sorted(range(len(owned)), key=lambda j: (-scores[j], owned[j]))[:k]
            np.testing.assert_allclose(res.scores[0], scores[best], atol=1e-6)

    @invariant()
    def every_version_matches_its_model(self) -> None:
        for repo, model_entries, model_vectors in self.versions:
            assert len(repo) == len(model_entries)
            assert list(repo.entries) == model_entries
            np.testing.assert_array_equal(repo.vectors, model_vectors)
            assert not repo.vectors.flags.writeable
            for tenant in ("default", "t1", "t2"):
                assert repo.tenant_size(tenant) == sum(e.tenant == tenant for e in model_entries)


def test_repository_machine() -> None:
    """A plain test function (not the machine's unittest TestCase) so that conftest's
    ``exact_impl`` runs it with the C extension and with its numpy twin."""
    run_state_machine_as_test(
        RepositoryMachine,
        settings=settings(max_examples=60, stateful_step_count=25, deadline=None, derandomize=True),
    )
