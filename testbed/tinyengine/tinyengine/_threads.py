"""Single-threaded BLAS, so that matmul results never depend on thread scheduling.

Two layers of defence:

1. If numpy has not been imported yet when ``tinyengine`` is imported, the
   usual environment variables (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``,
   ``MKL_NUM_THREADS``, ...) are set to 1 before numpy loads its BLAS.
2. In every case, ``threadpoolctl.threadpool_limits(1, "blas")`` is applied
   process-wide at import (this works after numpy is imported too), and
   :func:`check_single_threaded` lets the engine verify it.
"""

from __future__ import annotations

import os
import sys
import warnings

_VARS = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def force_single_thread() -> None:
    if "numpy" not in sys.modules:
        for var in _VARS:
            os.environ[var] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        if "numpy" in sys.modules:
            warnings.warn(
                "tinyengine: numpy was imported before tinyengine and threadpoolctl is "
                "missing; BLAS may be multi-threaded (results may not be bit-reproducible)",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    import numpy  # noqa: F401  (load BLAS so that threadpoolctl can see it)

    threadpool_limits(limits=1, user_api="blas")


def blas_thread_counts() -> list[tuple[str, int]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return []
    return [
        (i.get("internal_api", "?"), int(i.get("num_threads", 0)))
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]


def check_single_threaded() -> bool:
    """True when every BLAS library loaded in this process uses one thread."""
    return all(n == 1 for _, n in blas_thread_counts())
