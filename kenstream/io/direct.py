"""Reads that bypass the page cache (``O_DIRECT``), for inputs read once and too large to
stay cached.

A rebuild reads every base byte once. When the base and the model being written together
exceed the machine's memory, the pages a buffered ``pread`` puts in the page cache are
reclaimed before anyone reads them again, and filling then reclaiming them is most of the
rebuild's system time (at 7B on 2 cores: 18-28 s of system time with buffered reads,
6.5-8.7 s with these; docs/benchmarks.md). ``O_DIRECT`` moves the bytes from the disk into
this process's memory and nowhere else.

``O_DIRECT`` wants the file offset, the length and the memory address aligned to the
device's logical block (512 or 4096 bytes), which a tensor's bytes are not. So a read
covers the aligned range around the bytes asked for, into a page-aligned per-thread
buffer of `BOUNCE` bytes, and copies the bytes asked for out of it: the one memory copy
a buffered read also makes, without page-cache pages to allocate, track and reclaim. Where the system refuses ``O_DIRECT`` (no such flag, a
file system without it, ``/proc`` missing), :func:`open_direct` returns None and the
caller reads as before.

A compress reads both inputs once, a row block ahead of the kernel that selects from it.
There a block is *staged* (:class:`StagedReads`): read past the page cache straight into
aligned memory of its own by the read-ahead thread, with no copy at all, and the views the
kernel and the coders read are views of that memory. A range no staged read holds is read
through the memory map as before, so staging changes where bytes come from, never which.
A range mostly in the page cache already (an input read a moment ago) is not staged: the
disk would be read again for bytes memory holds (:func:`resident_fraction`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections import deque
from functools import cache

import numpy as np

ALIGN = 4096
"""Alignment of every direct read's offset, length and buffer (a multiple of any
logical block size in use)."""
BOUNCE = 4 << 20
"""Bytes of one thread's aligned buffer: one bf16 frame of format 2 in one read."""

_local = threading.local()


SWITCH = "KENSTREAM_DIRECT_IO"
"""Environment variable: ``0`` reads every input through the page cache, as where the
system refuses ``O_DIRECT`` (for a file system on which it is slow); unset or anything
else lets kenstream choose."""


def open_direct(fd: int) -> int | None:
    """A second, ``O_DIRECT`` descriptor of the file open as ``fd`` (the same file: it is
    reopened through ``/proc/self/fd``, never by its name), or None where the system
    refuses one or `SWITCH` is ``0``. The caller closes it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get(SWITCH, "").strip() == "0":
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def exceeds_memory(nbytes: int) -> bool:
    """Whether ``nbytes`` of files read once (and written) exceed this machine's memory:
    then the page cache cannot keep their pages until anything reads them again."""
    memory = physical_memory()
    return memory is not None and nbytes > memory


def physical_memory() -> int | None:
    """Bytes of RAM this machine has, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


CACHED = 0.5
"""Fraction of a range's pages in the page cache from which the range is read through the
page cache instead of staged."""


@cache
def _mincore():
    """libc's ``mincore``, or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def map_address(mapped: mmap.mmap) -> int:
    """Where ``mapped`` (a read-only file map) starts in this process's memory."""
    return np.frombuffer(mapped, np.uint8, count=1).ctypes.data


def resident_fraction(address: int, start: int, stop: int) -> float | None:
    """Fraction of the pages holding bytes ``start:stop`` of a file mapped at ``address``
    that the page cache holds now (``mincore``), or None where the system does not say.
    Cost: one system call and one byte of scratch a page."""
    fn = _mincore()
    if fn is None or stop <= start:
        return None
    page = mmap.PAGESIZE
    lo = start - start % page
    pages = -(-(stop - lo) // page)
    vec = np.zeros(pages, np.uint8)
    if fn(address + lo, pages * page, vec.ctypes.data) != 0:
        return None
    return float(np.count_nonzero(vec & 1)) / pages


def _buffer() -> memoryview:
    """This thread's aligned buffer (anonymous maps start on a page boundary)."""
    buf = getattr(_local, "buffer", None)
    if buf is None:
        buf = _local.buffer = memoryview(mmap.mmap(-1, BOUNCE + ALIGN))
    return buf


def read_aligned(fd: int, at: int, view: memoryview) -> int:
    """Fill ``view`` (writable bytes) with the file's bytes from offset ``at``, reading
    ``fd`` only at aligned offsets and lengths into aligned memory; returns how many
    bytes it filled (fewer than ``len(view)`` only where the file ends first). Works on
    any descriptor; an ``O_DIRECT`` one may raise OSError (EINVAL where the device's
    alignment is coarser than `ALIGN`). Cost: one ``pread`` a `BOUNCE` of bytes, one copy.
    """
    buf = _buffer()
    done = 0
    while done < len(view):
        pos = at + done
        lo = pos - pos % ALIGN
        want = min(len(view) - done, BOUNCE - (pos - lo))
        span = -(-(pos + want - lo) // ALIGN) * ALIGN
        # One read: a regular file reads short only at its end, and a second read from
        # there would start off the alignment.
        got = os.preadv(fd, [buf[:span]], lo)
        take = min(want, got - (pos - lo))
        if take <= 0:
            break
        view[done:done + take] = buf[pos - lo:pos - lo + take]
        done += take
        if take < want:
            break
    return done


MAX_STAGED = 4
"""Staged reads one file holds at once: the block being selected, the next one, one still
being coded, and the head of the next tensor. Adding one more drops the oldest (its
memory goes once no view of it is left), so a caller that never releases still holds at
most this many blocks a file."""


class Staged:
    """Bytes ``start:stop`` of a file, read past the page cache into aligned memory of
    their own by :meth:`fill` (the read-ahead thread). Cost: ``stop - start`` bytes plus
    at most ``3 * ALIGN``, allocated at once."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self._lo = start - start % ALIGN
        hi = -(-stop // ALIGN) * ALIGN
        memory = np.empty(hi - self._lo + ALIGN, np.uint8)
        skip = -memory.ctypes.data % ALIGN
        self._span = memory[skip:skip + hi - self._lo]
        self._ready = threading.Event()
        self.ok = False
        self.refused = False  # the system refused the read (alignment, device)

    def fill(self, fd: int) -> None:
        """Read the aligned span around the bytes with ``pread``s on the ``O_DIRECT``
        descriptor ``fd``; short only where the file ends, refused with OSError."""
        pos, end = self._lo, self._lo + len(self._span)
        try:
            while pos < end:
                got = os.preadv(fd, [self._span[pos - self._lo:]], pos)
                if got <= 0:
                    break
                pos += got
                if got % ALIGN:  # the file's end; a further read would start unaligned
                    break
        except OSError:
            self.refused = True
        finally:
            self.ok = pos >= self.stop
            self._ready.set()

    def bytes(self, start: int, stop: int) -> np.ndarray | None:
        """Read-only uint8 view of file bytes ``start:stop`` (inside this read) once the
        read is done, or None when it failed (the caller reads the bytes another way)."""
        self._ready.wait()
        if not self.ok:
            return None
        view = self._span[start - self._lo:stop - self._lo]
        view.flags.writeable = False
        return view


class StagedReads:
    """One file's staged reads, found by the byte ranges they hold. Thread-safe: the
    compress loop adds and looks up, the coding threads look up and drop."""

    def __init__(self):
        self._lock = threading.Lock()
        self._reads = deque()

    def add(self, start: int, stop: int) -> Staged:
        """A new staged read of file bytes ``start:stop`` (the caller queues its fill)."""
        read = Staged(start, stop)
        with self._lock:
            self._reads.append(read)
            while len(self._reads) > MAX_STAGED:
                self._reads.popleft()
        return read

    def find(self, start: int, stop: int) -> Staged | None:
        """The staged read that holds all of file bytes ``start:stop``, or None."""
        with self._lock:
            return next((r for r in reversed(self._reads)
                         if r.start <= start and stop <= r.stop), None)

    def drop(self, start: int, stop: int) -> None:
        """Forget the staged reads that end inside file bytes ``start:stop`` (the last of
        their bytes is used); views already handed out stay valid."""
        with self._lock:
            self._reads = deque(r for r in self._reads if not start < r.stop <= stop)

    def clear(self) -> None:
        with self._lock:
            self._reads.clear()
