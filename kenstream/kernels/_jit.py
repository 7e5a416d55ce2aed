"""Numba settings shared by every kernel, set in one place, and the thread count.

``cache=True`` so a second process does not recompile; ``fastmath`` stays off because
the selection rule is specified bit for bit (float32 distances, float64 densities) and
reassociation would change picks on ties; ``nogil`` so a reader or encoder thread can run
beside a kernel.
"""

from __future__ import annotations

import ctypes
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache

# numba's OpenMP workers spin for a while after each parallel kernel returns, on the cores
# that compress's coding threads need between two kernel calls; told to sleep at once they
# cost a wake-up per call instead (microseconds against a block's 0.1 s). Measured on 1B,
# docs/benchmarks.md: compress 0.95-0.97x the time, `--method delta` 0.83-0.92x, rebuild
# and the kernel alone unchanged. Set before numba loads its OpenMP runtime (at the first
# parallel call); a value the user set wins, and a runtime already loaded (torch, imported
# first, brings the same libgomp) keeps what it read.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402  (after the OpenMP setting above)

from ..errors import SelectionError  # noqa: E402

JIT = dict(cache=True, nogil=True, fastmath=False)
PARALLEL = dict(JIT, parallel=True)

njit = numba.njit
prange = numba.prange


def thread_count(threads: int | None) -> int:
    """A caller's thread count, at most the cores numba sees; below 1 is an error."""
    if threads is None:
        return numba.config.NUMBA_NUM_THREADS
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise SelectionError(f"threads must be a whole number >= 1, got {threads!r}")
    return min(int(threads), numba.config.NUMBA_NUM_THREADS)


def get_threads() -> int:
    """The numba thread count in effect (set by :func:`threads`)."""
    return numba.get_num_threads()


ALLOCATOR_SWITCH = "KENSTREAM_MALLOC"
"""Environment variable: ``0`` leaves the C allocator's settings as they are (see
:func:`keep_freed_memory`)."""
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20


@cache
def keep_freed_memory() -> bool:
    """Have glibc's allocator keep memory a thread frees for its next allocation, once
    per process; returns whether the settings took.

    The coders and decoders allocate and free arrays of a few MB for every frame. Left
    to itself, glibc's ``malloc`` gives many such blocks back to the system when they
    are freed (it maps blocks over a moving threshold, and trims a heap's free top), and
    the next frame's arrays fault fresh zeroed pages in: 990 page faults for one step
    that allocates two 2 MB arrays and frees the larger first; in a 1B rebuild 1.45 M
    faults and 5.3 s of system time against 28 k and 2.3 s with these settings
    (docs/benchmarks.md). Fixing the mapping threshold at `MMAP_THRESHOLD` and the trim
    threshold at `TRIM_THRESHOLD` keeps them: the process may then hold up to
    `TRIM_THRESHOLD` of freed memory per heap for reuse. A no-op (False) where the C
    library is not glibc or `ALLOCATOR_SWITCH` is ``0``.
    """
    if os.environ.get(ALLOCATOR_SWITCH, "").strip() == "0":
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_TRIM_THRESHOLD is -1, M_MMAP_THRESHOLD -3 (glibc's malloc.h); mallopt returns 1.
    return mallopt(-3, MMAP_THRESHOLD) == 1 and mallopt(-1, TRIM_THRESHOLD) == 1


@contextmanager
def threads(count: int | None):
    """Run the body with ``count`` numba threads (None: every core numba sees), then put
    the caller's thread count back, also when the body raises."""
    before = numba.get_num_threads()
    numba.set_num_threads(thread_count(count))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def frame_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads named ``name``_N, each running whole frames or blocks,
    in which numba's parallel kernels run on one thread (numba's count is per thread):
    the pool is the parallelism, and a team of its own for each worker would put
    ``workers`` x ``threads`` threads on the cores (a 1B rebuild took about 7 % longer so)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name,
                              initializer=numba.set_num_threads, initargs=(1,))


def cached(dispatcher) -> bool:
    """Whether numba's on-disk cache holds an index for ``dispatcher`` (a ``cache=True``
    kernel): False means its first call in this process compiles it (seconds). Reads
    numba's cache locator, which numba does not document as public; when that is not
    there, says True rather than warn for nothing."""
    try:
        return os.path.exists(dispatcher._cache._cache_file._index_path)
    except AttributeError:
        return True
