"""The C extension must really be built where it can be: the differential tests skip
without it, so a silently failed build would otherwise pass unnoticed."""

from __future__ import annotations

import importlib
import os
import platform
import sys

import pytest


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")),
    reason="the extension is required only on x86-64 Linux",
)
@pytest.mark.skipif(
    "1" in (os.environ.get("INTERCASCADE_SKIP_EXT_BUILD"), os.environ.get("INTERCASCADE_NO_EXT")),
    reason="the extension is switched off on purpose",
)
def test_c_extension_is_built_and_importable():
    simd = importlib.import_module("intercascade_core.core._simd")
    assert simd.__file__ and simd.__file__.endswith(".so")
    # retrieve's one guarded import found it too (a failing import would fall back silently)
    assert importlib.import_module("intercascade_core.core.retrieve")._ext is simd
