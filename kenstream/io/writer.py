"""Streaming writer of safetensors-layout files.

A file is written under a temporary name (``final + '.partial'``) with room reserved for
its header, tensor data is appended as it is produced, and `finish` writes the header
into the reserved room (padded with spaces, which the safetensors layout allows), flushes
to disk and renames the file into place. Nothing larger than one array the caller hands
over is ever held in memory, and a file that exists under its final name is complete.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .. import faults
from ..errors import OutputError
from ..format.spec import TEMP_SUFFIX
from .safefs import create_exclusive

_CHUNK = 1 << 24
_WRITEBACK = 1 << 26  # how often a drop-behind writer starts writeback (64 MiB)


def header_bytes(entries: dict, metadata: dict | None) -> bytes:
    """The JSON header for ``entries`` (name -> (dtype, shape, begin, end)), unpadded."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, (dtype, shape, begin, end) in entries.items():
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape],
                        "data_offsets": [int(begin), int(end)]}
    return json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def padded_length(raw: int) -> int:
    """Header length N such that 8 + N is a multiple of 8 and N >= raw."""
    return (raw + 7) // 8 * 8


class ShardWriter:
    """Write one safetensors-layout file to ``path`` through a temporary name.

    ``reserve`` is the header room in bytes (an upper bound on the final header's length).
    With ``drop_behind``, every 64 MiB written the writer starts the disk on what it just
    wrote and drops the (by then written) window before it from the page cache
    (``posix_fadvise(DONTNEED)``): a file much larger than RAM is then written at an even
    pace instead of in bursts when dirty pages pile up, its final fsync finds little left
    to do, and it does not push other files out of the cache. For files nobody reads back
    at once; compress re-reads its shards to hash them, so it keeps them cached.
    """

    def __init__(self, path, reserve: int, drop_behind: bool = False):
        self.path = Path(path)
        self.temp = self.path.with_name(self.path.name + TEMP_SUFFIX)
        self.reserve = padded_length(max(int(reserve), 2))
        self.entries: dict = {}
        self._open = None
        self._end = 0
        self._drop = drop_behind and hasattr(os, "posix_fadvise")
        self._windows = [8 + self.reserve, 8 + self.reserve]  # [previous, current] starts
        try:
            # Created afresh: a leftover temporary file, or a link planted at its name, is
            # replaced rather than written through.
            self._fh = create_exclusive(self.temp)
            self._fh.seek(8 + self.reserve)
        except OSError as exc:
            raise OutputError.from_os(exc, "create", file=self.path) from exc

    @property
    def data_bytes(self) -> int:
        return self._end

    def append(self, name: str, dtype: str, shape, data: np.ndarray) -> None:
        """Append one entry; ``data`` is written in its C order as raw bytes."""
        self.begin(name, dtype)
        self.write(data)
        self.end(shape)

    def begin(self, name: str, dtype: str) -> None:
        """Start an entry whose bytes follow through `write` calls and close with `end`."""
        if name in self.entries or self._open is not None:
            raise ValueError(f"entry {name!r} is a duplicate or another entry is open")
        self._open = (name, dtype, self._end)

    def write(self, data: np.ndarray) -> None:
        """Append the raw bytes of ``data`` (C order) to the open entry."""
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        try:
            for start in range(0, raw.size, _CHUNK):
                self._fh.write(memoryview(raw[start:start + _CHUNK]))
        except OSError as exc:
            self.abort()
            raise OutputError.from_os(exc, "write", file=self.path) from exc
        self._end += raw.size
        if self._drop and 8 + self.reserve + self._end - self._windows[1] >= _WRITEBACK:
            self._write_back()

    def _write_back(self) -> None:
        """Start writeback of the current window; drop the previous one (written by now)."""
        self._fh.flush()
        pos = 8 + self.reserve + self._end
        try:
            os.posix_fadvise(self._fh.fileno(), self._windows[0], pos - self._windows[0],
                             os.POSIX_FADV_DONTNEED)
        except OSError:
            self._drop = False  # advice is optional; the file is written all the same
        self._windows = [self._windows[1], pos]

    def end(self, shape) -> None:
        """Close the open entry with its final ``shape``."""
        name, dtype, begin = self._open
        self._open = None
        self.entries[name] = (dtype, tuple(shape), begin, self._end)

    def finish(self, metadata: dict | None = None) -> dict:
        """Write the header, fsync, rename into place; returns ``{"size"}``."""
        faults.raise_pending()
        head = header_bytes(self.entries, metadata)
        if len(head) > self.reserve:
            self.abort()
            raise RuntimeError(f"header of {self.path.name} outgrew its reservation")
        head = head + b" " * (self.reserve - len(head))
        try:
            self._fh.seek(0)
            self._fh.write(struct.pack("<Q", self.reserve))
            self._fh.write(head)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.temp, self.path)
        except OSError as exc:
            self.abort()
            raise OutputError.from_os(exc, "write", file=self.path) from exc
        return {"size": 8 + self.reserve + self._end}

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        try:
            self._fh.close()
        except Exception:
            pass
        try:
            self.temp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


class BufferRing:
    """``count`` reusable byte buffers handed out in turn, each with the future of the
    write that last used it.

    One ring serves a whole run (every file it writes): buffers are made once, at the
    largest size asked for, so the allocator never has to find fresh room for them (a
    16 MB buffer freed and made again per output file left the heap 16 MB larger).
    """

    def __init__(self, count: int = 2, nbytes: int = 0):
        self._slots = [[np.empty(max(1, int(nbytes)), dtype=np.uint8), None]
                       for _ in range(max(1, count))]
        self._next = 0

    def take(self, dtype, shape) -> tuple[list, np.ndarray]:
        """(slot, array of ``dtype`` and ``shape``) once the slot's last write is done."""
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if slot[1] is not None:
            slot[1].result()
            slot[1] = None
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if slot[0].size < nbytes:
            slot[0] = None  # let the old buffer go before the larger one is made
            slot[0] = np.empty(nbytes, dtype=np.uint8)
        return slot, slot[0][:nbytes].view(dtype).reshape(shape)

    def release(self) -> None:
        """Forget the writes of a helper that has stopped (each done or cancelled), so the
        ring can serve the next file."""
        for slot in self._slots:
            slot[1] = None


class WriteBehind:
    """Runs a `ShardWriter`'s calls on one helper thread, in order, so that the caller
    builds the next block while the previous one is being written.

    Blocks go through a `BufferRing` (`put`): a buffer is refilled only once its previous
    write has finished, so memory is the ring's blocks and no fresh (zero-filled) pages
    are faulted per block. The first error of a call on the helper thread is raised by
    the next `put` or by `finish`; later calls are skipped. Use as a context manager
    inside the `ShardWriter`'s, so the helper has stopped before a failed file is deleted.
    """

    def __init__(self, writer: ShardWriter, ring: BufferRing | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kenstream-write")
        self._ring = ring if ring is not None else BufferRing()
        self._error = None

    def _run(self, fn, *args):
        def task():
            if self._error is None:
                try:
                    return fn(*args)
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc
            return None

        return self._pool.submit(task)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def begin(self, name: str, dtype: str) -> None:
        self._raise()
        self._run(self.writer.begin, name, dtype)

    def end(self, shape) -> None:
        self._run(self.writer.end, tuple(shape))

    def put(self, dtype, shape, fill, pool=None) -> None:
        """Call ``fill(buf)`` on a free buffer of ``dtype`` and ``shape``, then write ``buf``
        to the open entry on the helper thread.

        ``fill`` runs here, or, with ``pool`` (an executor), on one of its threads, so that
        several blocks are built at once; the writes still happen in the order of the
        calls. The ring must then have more slots than the pool has threads.
        """
        slot, buf = self._ring.take(dtype, shape)
        self._raise()
        if pool is None:
            fill(buf)
            slot[1] = self._run(self.writer.write, buf)
            return
        built = pool.submit(fill, buf)

        def write():
            built.result()  # an error building the block stops the file here
            self.writer.write(buf)

        slot[1] = self._run(write)

    def after(self, fn, *args) -> None:
        """Call ``fn(*args)`` on the helper thread once everything before it is written."""
        self._run(fn, *args)

    def finish(self, metadata: dict | None = None) -> dict:
        """Wait for every write, then `ShardWriter.finish` (header, fsync, rename)."""
        result = self._run(self.writer.finish, metadata).result()
        self._raise()
        return result

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # On an error here, skip what is queued: the file is about to be deleted anyway.
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        self._ring.release()
        if exc_type is None:
            self._raise()
        return False


def fill_greedy(things, size_of, limit: int, cost_of=None, cost_limit: int | None = None) -> list:
    """Group ``things`` in order into lists whose sizes add up to at most ``limit`` and, with
    ``cost_of``, whose costs (e.g. header bytes) add up to at most ``cost_limit``; a thing
    over either limit by itself gets a list of its own. Always returns at least one list."""
    groups, current, filled, spent = [], [], 0, 0
    for thing in things:
        size = size_of(thing)
        cost = cost_of(thing) if cost_of is not None else 0
        if current and (filled + size > limit
                        or (cost_of is not None and spent + cost > cost_limit)):
            groups.append(current)
            current, filled, spent = [], 0, 0
        current.append(thing)
        filled += size
        spent += cost
    if current or not groups:
        groups.append(current)
    return groups


def header_budget(header_limit: int, fixed: int, name_of_item, cost_of):
    """(cost function, budget) for `fill_greedy` so that no file's header passes
    ``header_limit`` bytes: ``fixed`` is the header length of an empty file, ``cost_of`` an
    upper bound on the bytes one item adds. An item over the budget alone is refused."""
    budget = header_limit - fixed - 8  # the header is padded by up to 7 bytes
    def cost(item):
        spent = cost_of(item)
        if spent > budget:
            raise OutputError(f"its header entry alone takes {spent} bytes, more than a file's "
                              f"header may hold ({header_limit})", tensor=name_of_item(item))
        return spent
    return cost, budget


def entry_cost(name: str, dtype: str, shape) -> int:
    """Most bytes the header entry of one tensor (and its comma) can take."""
    return len(header_bytes({name: (dtype, shape, _WIDEST, _WIDEST)}, None)) - 1


_WIDEST = (1 << 63) - 1


class ShardSet:
    """The output files of one run: which items each holds, their names, a writer for
    each, and the index written last.

    ``groups`` are lists of items in output order and ``names`` the file name of each;
    `plan` makes both from a size limit. Files are written one by one through `open`
    (a :class:`ShardWriter`, so each appears under its name only once complete); the
    index, through `write_index`, only after every file is in place.
    """

    def __init__(self, out, groups: list, names: list):
        self.out = Path(out)
        self.groups = groups
        self.names = names

    @classmethod
    def plan(cls, out, items, size_of, limit: int, name_of, cost_of=None,
             cost_limit=None) -> "ShardSet":
        """Fill files in order up to ``limit`` bytes (``size_of(item)`` each) and, with
        ``cost_of``, up to ``cost_limit`` header bytes; ``name_of(i, n)`` names file ``i``
        of ``n``."""
        groups = fill_greedy(items, size_of, limit, cost_of, cost_limit)
        return cls(out, groups, [name_of(i, len(groups)) for i in range(len(groups))])

    def __iter__(self):
        return iter(zip(self.names, self.groups))

    def __len__(self) -> int:
        return len(self.groups)

    def path(self, name: str) -> Path:
        return self.out / name

    def open(self, name: str, reserve: int, drop_behind: bool = False) -> ShardWriter:
        """A writer of file ``name`` with ``reserve`` bytes of header room."""
        return ShardWriter(self.out / name, reserve, drop_behind=drop_behind)

    def write_index(self, name: str, obj) -> None:
        """Write the index ``name`` (JSON, atomically): the last file of a run."""
        from .jsonfile import write_json_atomic

        faults.raise_pending()
        write_json_atomic(self.out / name, obj)
