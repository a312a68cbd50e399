"""`intercascade sim-serve` as a real process: it serves the same responses as the
in-process MockTransport simulator and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import pytest

from intercascade_core.models.sim import SimBackend


def test_sim_serve_answers_like_the_mock_transport_and_stops_on_sigint():
    # A test run launched as a shell background job (`cmd &`) has SIGINT ignored, and an
    # ignored signal stays ignored across exec, so the server would never see the Ctrl-C.
    # With a Python handler installed here, the child starts with the default action.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "intercascade_core", "sim-serve", "--port", "0", "--seed", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        line = proc.stdout.readline()  # "serving simulated models at http://127.0.0.1:PORT/v1 ..."
        assert "serving simulated models at http://127.0.0.1:" in line, line + proc.stderr.read()
        base_url = line.split(" at ")[1].split()[0]
        body = {
            "model": "sim-weak", "logprobs": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}],
        }
        with httpx.Client(base_url=base_url, timeout=10) as client:
            models = client.get("/models").json()
            served = client.post("/chat/completions", json=body).json()
        with httpx.Client(transport=SimBackend(seed=3).transport(), base_url="http://sim/v1") as mock:
            expected = mock.post("/chat/completions", json=body).json()
        assert {m["id"] for m in models["data"]} >= {"sim-weak", "sim-strong"}
        assert json.dumps(served, sort_keys=True) == json.dumps(expected, sort_keys=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leak the server into later tests
            _, err = proc.communicate()
            pytest.fail(f"sim-serve did not stop within 30 s of SIGINT; stderr: {err[-2000:]}")
    assert proc.returncode == 0, err
