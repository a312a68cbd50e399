"""Shared test configuration.

Hypothesis runs derandomized (a fixed seed per test), so every run of the suite
explores the same examples and a failure reproduces.
"""

import os

from hypothesis import HealthCheck, settings

# llama.cpp / onnxruntime worker threads must not spin-wait on this 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
