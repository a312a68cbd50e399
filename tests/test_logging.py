"""Retries, checkpoints and audit alarms are logged under ``intercascade_core``, and no
log record carries an API key, even when a server echoes it back."""

from __future__ import annotations

import json
import logging

import httpx
import numpy as np
import pytest

from intercascade_core.core.audit import AuditConfig, init_audit, observe
from intercascade_core.core.repository import Entry, empty_repository, update
from intercascade_core.errors import InvalidArgumentError, RetriesExhausted
from intercascade_core.models.chat import ChatModel
from intercascade_core.storage.journal import DurableStore

KEY = "sk-test-0123456789abcdefABCDEF"


def _echoing_server(request: httpx.Request) -> httpx.Response:
    # a proxy that fails and quotes the request's headers back, key included
    return httpx.Response(503, text=json.dumps({"error": dict(request.headers)}))


def test_each_retry_is_one_warning_that_never_holds_the_key(caplog: pytest.LogCaptureFixture) -> None:
    client = httpx.Client(transport=httpx.MockTransport(_echoing_server))
    model = ChatModel("http://llm.test/v1", "m", api_key=KEY, client=client, max_retries=2,
                      sleep=lambda s: None)
    with caplog.at_level(logging.DEBUG, logger="intercascade_core"), pytest.raises(RetriesExhausted):
        model.generate([{"role": "user", "content": "hi"}])
    retries = [r for r in caplog.records if r.name == "intercascade_core.models.chat"]
    assert [r.levelno for r in retries] == [logging.WARNING, logging.WARNING]
    assert "attempt 1 of 3" in retries[0].getMessage() and "HTTP 503" in retries[0].getMessage()
    assert all(KEY not in r.getMessage() for r in caplog.records)
    assert KEY[8:] not in caplog.text


def test_an_audit_alarm_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    state = init_audit(AuditConfig(alpha=0.1, delta=0.05, every=10))
    with caplog.at_level(logging.WARNING, logger="intercascade_core"):
        for _ in range(40):
            state, event = observe(state, False)
            if event is not None:
                break
    assert event is not None
    (record,) = [r for r in caplog.records if r.name == "intercascade_core.core.audit"]
    assert "risk alarm" in record.getMessage()


def test_a_checkpoint_is_logged(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    row = np.zeros((1, 4), np.float32)
    row[0, 0] = 1.0
    repo = update(empty_repository(4), [Entry("q", "a", "s")], row)
    with DurableStore.open(tmp_path / "s", dim=4, model_id="m") as store:
        store.log(list(repo.entries), row)
        with caplog.at_level(logging.INFO, logger="intercascade_core"):
            store.checkpoint(repo)
    assert any("checkpoint" in r.getMessage() and "1 rows" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- the cascade
def _sim_levels(client: httpx.Client) -> list:  # type: ignore[type-arg]
    from intercascade_core import Level

    return [Level(ChatModel("http://sim/v1", n, client=client, sleep=lambda s: None))
            for n in ("sim-weak", "sim-strong")]


def test_on_outcome_sees_every_outcome_in_order_and_deferrals_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from intercascade_core import Cascade, calibrate_levels, run_stream
    from intercascade_core.models.hashing import HashingEmbedder
    from intercascade_core.models.sim import SimBackend, templated_math_stream

    with httpx.Client(transport=SimBackend(seed=1).transport()) as client:
        levels = _sim_levels(client)
        cal = calibrate_levels(templated_math_stream(120, seed=3), levels, alpha=0.25, delta=0.1)
        seen: list = []  # type: ignore[type-arg]
        with caplog.at_level(logging.DEBUG, logger="intercascade_core.core.cascade"):
            result = run_stream(templated_math_stream(30, seed=4), levels, HashingEmbedder(64),
                                calibrations=cal.calibrations, progress=False, on_outcome=seen.append)
        assert seen == list(result.outcomes)
        deferred = [o for o in result.outcomes if o.level != 0 and o.confidences[0] is not None]
        assert deferred, "the stream has no deferral to log"
        assert sum("deferred at level 0" in r.getMessage() for r in caplog.records) == len(deferred)

        got: list = []  # type: ignore[type-arg]
        with Cascade(levels, HashingEmbedder(64), calibrations=cal.calibrations,
                     on_outcome=got.append) as cascade:
            outs = cascade.ask_many(templated_math_stream(12, seed=5), threads=4)
        assert sorted(o.index for o in got) == sorted(o.index for o in outs) == list(range(12))

    with pytest.raises(InvalidArgumentError, match="on_outcome"):
        run_stream([], levels, HashingEmbedder(64), calibrations=cal.calibrations, on_outcome=5)
    with pytest.raises(InvalidArgumentError, match="config"):
        run_stream([], levels, HashingEmbedder(64), calibrations=cal.calibrations, config=None)


def test_an_embedder_that_returns_no_row_is_a_typed_error() -> None:
    from intercascade_core.core.cascade import perform
    from intercascade_core.core.machine import Embed

    class Empty:
        dim, model_id = 4, "empty"

        def embed(self, texts: object) -> np.ndarray:
            return np.zeros((0, 4), np.float32)

    with pytest.raises(InvalidArgumentError, match="embedder"):
        perform(Embed("q"), [], Empty())  # type: ignore[arg-type]
