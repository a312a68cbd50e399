"""Build the optional C extension ``intercascade_core.core._simd`` (SIMD cosine top-k).

Everything else lives in ``pyproject.toml``. The extension is optional: when it
cannot be compiled the pure-numpy path is used and a banner says so, except when
``INTERCASCADE_REQUIRE_EXT=1`` (CI, wheel builds), where a failed build is an error.

Switches:
  INTERCASCADE_SKIP_EXT_BUILD=1  do not build the extension at all
  INTERCASCADE_REQUIRE_EXT=1     fail the install when the extension does not build
  INTERCASCADE_DEBUG_EXT=1       -O0 -g with assertions (and ASan/UBSan when =asan)

Never ``-march=native``: the kernels pick AVX-512 / AVX2+FMA / scalar at run time
with per-function ``target`` attributes, so one build runs on any x86-64 CPU.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildFailed(Exception):
    pass


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils raises several unrelated types here
            self._maybe_fail(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._maybe_fail(exc)

    @staticmethod
    def _maybe_fail(exc: Exception) -> None:
        if os.environ.get("INTERCASCADE_REQUIRE_EXT") == "1":
            raise
        print("=" * 72, file=sys.stderr)
        print(f"WARNING: the C extension failed to build ({exc}); using the numpy path.", file=sys.stderr)
        print("=" * 72, file=sys.stderr)


def extensions() -> list[Extension]:
    if os.environ.get("INTERCASCADE_SKIP_EXT_BUILD") == "1" or not sys.platform.startswith(("linux", "darwin")):
        return []
    import numpy as np

    debug = os.environ.get("INTERCASCADE_DEBUG_EXT", "")
    cflags = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing", "-ffp-contract=off"]
    ldflags: list[str] = []
    if debug:
        cflags += ["-O0", "-g", "-UNDEBUG"]
        if debug == "asan":
            cflags += ["-fsanitize=address,undefined"]
            ldflags += ["-fsanitize=address,undefined"]
    else:
        cflags += ["-O3"]
    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".c")
    )
    if not sources:
        return []
    return [
        Extension(
            "intercascade_core.core._simd",
            sources=sources,
            include_dirs=["csrc", np.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=cflags,
            extra_link_args=[*ldflags, "-lpthread"],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
