"""Bad input at the edges of retrieval and the cascade config gets typed errors."""

from __future__ import annotations

import numpy as np
import pytest

from intercascade_core import (
    CascadeConfig,
    Entry,
    InvalidArgumentError,
    empty_repository,
    retrieve,
    update,
)


@pytest.mark.parametrize("backend", ["exact", "numpy", "hnsw"])
def test_a_huge_k_returns_everything_on_every_backend(backend):
    v = np.eye(4, dtype=np.float32)
    repo = update(empty_repository(4), [Entry("q", "a", "s")] * 4, v)
    top = retrieve(repo, v[2], 2**63, backend=backend)
    assert top.indices.shape == (1, 4) and top.indices[0, 0] == 2


@pytest.mark.parametrize(("field", "value"), [("seed", -1), ("seed", 1.5), ("seed", True), ("tenant", 3)])
def test_cascade_config_validates_seed_and_tenant(field, value):
    with pytest.raises(InvalidArgumentError, match=field):
        CascadeConfig(**{field: value})
