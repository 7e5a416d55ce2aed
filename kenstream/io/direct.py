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
"""

from __future__ import annotations

import mmap
import os
import threading

ALIGN = 4096
"""Alignment of every direct read's offset, length and buffer (a multiple of any
logical block size in use)."""
BOUNCE = 4 << 20
"""Bytes of one thread's aligned buffer: one bf16 frame of format 2 in one read."""

_local = threading.local()


def open_direct(fd: int) -> int | None:
    """A second, ``O_DIRECT`` descriptor of the file open as ``fd`` (the same file: it is
    reopened through ``/proc/self/fd``, never by its name), or None where the system
    refuses one. The caller closes it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def physical_memory() -> int | None:
    """Bytes of RAM this machine has, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


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
