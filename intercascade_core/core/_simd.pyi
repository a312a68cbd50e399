"""Type stub for the C extension ``intercascade_core.core._simd`` (csrc/)."""

from typing import Literal

import numpy as np
import numpy.typing as npt

Isa = Literal["scalar", "avx2", "avx512"]

def topk(
    vectors: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    k: int,
    codes: npt.NDArray[np.int32] | None = None,
    tenant: int = -1,
    *,
    isa: Isa | None = None,
    threads: int = 0,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def topk_int8(
    vectors: npt.NDArray[np.float32],
    packed: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    errs: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    k: int,
    codes: npt.NDArray[np.int32] | None = None,
    tenant: int = -1,
    *,
    isa: Isa | None = None,
    threads: int = 0,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], int]: ...
def gather(
    vectors: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
    *,
    isa: Isa | None = None,
) -> npt.NDArray[np.float32]: ...
def capabilities() -> tuple[Isa, ...]: ...
