"""Numba settings shared by every kernel, set in one place, and the thread count.

``cache=True`` so a second process does not recompile; ``fastmath`` stays off because
the selection rule is specified bit for bit (float32 distances, float64 densities) and
reassociation would change picks on ties; ``nogil`` so a reader or encoder thread can run
beside a kernel.
"""

from __future__ import annotations

from contextlib import contextmanager

import numba

JIT = dict(cache=True, nogil=True, fastmath=False)
PARALLEL = dict(JIT, parallel=True)

njit = numba.njit
prange = numba.prange


def _clamp(threads: int | None) -> int:
    if threads is None:
        threads = numba.config.NUMBA_NUM_THREADS
    return max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))


def get_threads() -> int:
    """The numba thread count in effect (set by :func:`threads`)."""
    return numba.get_num_threads()


@contextmanager
def threads(count: int | None):
    """Run the body with ``count`` numba threads (None: every core numba sees), then put
    the caller's thread count back, also when the body raises."""
    before = numba.get_num_threads()
    numba.set_num_threads(_clamp(count))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def cached(dispatcher) -> bool:
    """Whether numba's on-disk cache holds an index for ``dispatcher`` (a ``cache=True``
    kernel): False means its first call in this process compiles it (seconds). Reads
    numba's cache locator, which numba does not document as public; when that is not
    there, says True rather than warn for nothing."""
    try:
        import os

        return os.path.exists(dispatcher._cache._cache_file._index_path)
    except AttributeError:
        return True
