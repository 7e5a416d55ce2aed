"""Numba settings shared by every kernel, set in one place.

``cache=True`` so a second process does not recompile; ``fastmath`` stays off because
the selection rule is specified bit for bit (float32 distances, float64 densities) and
reassociation would change picks on ties; ``nogil`` so a reader thread can run beside
a kernel.
"""

from __future__ import annotations

import numba

JIT = dict(cache=True, nogil=True, fastmath=False)
PARALLEL = dict(JIT, parallel=True)

njit = numba.njit
prange = numba.prange


def set_threads(threads: int | None) -> None:
    """Use ``threads`` numba threads (None: all cores numba sees)."""
    if threads is None:
        threads = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
