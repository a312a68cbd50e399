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
from intercascade_core.errors import RetriesExhausted
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
