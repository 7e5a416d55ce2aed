"""Read ahead: one background thread that pulls byte ranges of input files into the page
cache before they are used.

``madvise(MADV_WILLNEED)`` only queues a read, and on a model larger than the page cache
the kernel gives up part of it: at 7B a quarter of the base pages the coding threads
needed were still on disk when they got there. Here a thread reads each range for real
(``pread`` into one reused 1 MiB buffer), so the pages are in the page cache when the
memory map is read, and the wait for the disk happens on this thread, beside the
selection kernel, instead of on the threads that compute.

Nothing read here enters the process's own memory beyond the buffer: the pages go to the
page cache, which the kernel reclaims as it needs. A range is read through a duplicate
of the file's descriptor, so closing the file while a read is queued is safe. A failed
read is dropped: reading ahead is only ever a hint, and the real read reports any error.

The same thread runs a file's staged reads (:class:`kenstream.io.direct.Staged`, through
`ReadAhead.call`): with ``O_DIRECT`` on, a range is read into memory of its own instead of
the page cache, and the views the kernel reads are views of that memory.
"""

from __future__ import annotations

import os
import queue
import threading

CHUNK = 1 << 20
"""Bytes of one ``pread``."""


class ReadAhead:
    """A queue of (descriptor, start, stop) ranges read in order by one daemon thread."""

    def __init__(self):
        self._jobs = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()

    def submit(self, fd: int, start: int, stop: int) -> None:
        """Read bytes ``start:stop`` of the open file ``fd`` in the background."""
        if stop > start:
            self.call(fd, lambda own: _read_range(own, start, stop))

    def call(self, fd: int, read) -> None:
        """Call ``read(descriptor)`` in the background, with a duplicate of the open file
        ``fd`` that is closed after (``read`` handles its own errors: see `Staged.fill`)."""
        try:
            own = os.dup(fd)
        except OSError:
            return
        self._jobs.put((own, read))
        self._ensure_thread()

    def flush(self) -> None:
        """Return once every range submitted so far has been read (or dropped)."""
        done = threading.Event()
        self._jobs.put(done)
        self._ensure_thread()
        done.wait()

    def _ensure_thread(self) -> None:
        with self._lock:
            # Started on first use, and again in a process forked from one that had it.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="kenstream-readahead")
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if isinstance(job, threading.Event):
                job.set()
                continue
            fd, read = job
            try:
                read(fd)
            finally:
                os.close(fd)


_local = threading.local()


def _read_range(fd: int, start: int, stop: int) -> None:
    """Read bytes ``start:stop`` into the page cache (``pread`` into one reused buffer);
    a failed read is dropped."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = memoryview(bytearray(CHUNK))
    try:
        pos = start
        while pos < stop:
            got = os.preadv(fd, [buffer[:min(CHUNK, stop - pos)]], pos)
            if got <= 0:
                break
            pos += got
    except OSError:
        pass


READ_AHEAD = ReadAhead()
"""The process's reader (one thread: the disk serves one sequential stream best)."""
