"""Read one ``.safetensors`` file: a validated header and zero-copy views of its tensors.

Layout (https://huggingface.co/docs/safetensors): 8 bytes little-endian u64 ``N``,
``N`` bytes of UTF-8 JSON mapping tensor name -> {"dtype", "shape", "data_offsets":
[begin, end]} (offsets relative to the data section, which starts at ``8 + N``), an
optional ``"__metadata__"`` str -> str map, then the data section.

The header is parsed and checked in full before any tensor byte is touched, so a
damaged or truncated download fails at open with a one-line ``CorruptFileError``
instead of as garbage weights later. Tensor data is never read eagerly: the file is
memory-mapped read-only and :meth:`SafetensorsFile.array` returns a view of the map.

Leniency, on purpose: unused bytes between tensors or after the last one are accepted
(the reference reader rejects them, but they change no tensor value), as are unknown
keys inside an entry. Overlaps and out-of-range offsets are not.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kenstream import dtypes
from kenstream.errors import CheckpointError, CorruptFileError
from kenstream.io.direct import (CACHED, StagedReads, map_address, open_direct, read_aligned,
                                 resident_fraction)
from kenstream.io.readahead import READ_AHEAD
from kenstream.io.safefs import open_regular

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Headers above this are treated as corrupt: real ones are a few MB at most."""

MAX_DIMS = 32
MAX_ELEMENTS = 1 << 58
"""Shape limits (rank; product of the non-zero sizes); NumPy's own are 64 and ~2**63 bytes."""


MAPPED: dict = {}
"""id -> (path bytes, size at open) of every open memory map; the CLI's bus-error handler
(:mod:`kenstream.faults`) names the one that shrank."""

FAULT_AROUND = 1 << 16
FOLIO_ALIGN = 1 << 21


def _release_span(first: int, last: int) -> tuple[int, int]:
    """File bytes to drop so that nothing a read of ``first:last`` mapped stays resident.

    A page fault on a file mapping maps more than its page: the cached pages around it
    (Linux "fault-around", 64 KiB by default) and, on kernels with large page-cache
    folios, the whole folio, up to 2 MiB and aligned to its size in the file. So widen by
    the fault-around window, then out to 2 MiB boundaries.
    """
    first = max(0, first - FAULT_AROUND) // FOLIO_ALIGN * FOLIO_ALIGN
    last = -(-(last + FAULT_AROUND) // FOLIO_ALIGN) * FOLIO_ALIGN
    return first, last


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, without its data.

    ``dtype`` is a safetensors code (see :mod:`kenstream.dtypes`); ``shape`` a tuple of
    ints; ``nbytes`` = prod(shape) * itemsize; ``offset`` the absolute byte offset of
    the first element in ``file``, or None where the container does not expose one
    (zip ``.bin``); ``file`` the Path of the file holding it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int | None
    file: Path


class _DuplicateKey(Exception):
    def __init__(self, key):
        self.key = key


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _is_int(value) -> bool:
    # JSON true/false arrive as bool, which is an int subclass; they are not offsets.
    return isinstance(value, int) and not isinstance(value, bool)


class TensorTable:
    """Name lookup shared by the file readers: ``self._infos`` maps name -> TensorInfo in
    file order, ``self.path`` names the file in errors."""

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of ``name``; an unknown name raises ``CheckpointError``."""
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError("no such tensor in this file", file=self.path, tensor=name) from None

    def read_into(self, name: str, start: int, out: np.ndarray) -> None:
        """Copy bytes ``start : start + out.nbytes`` of ``name`` into ``out`` (C-contiguous,
        any dtype). This default copies from :meth:`array`'s view."""
        if not out.flags.c_contiguous:
            raise ValueError("read_into needs a C-contiguous array")
        flat = self.array(name).reshape(-1).view(np.uint8)
        np.copyto(out.reshape(-1).view(np.uint8), flat[start:start + out.nbytes])

    def read_directly(self) -> bool:
        """Ask :meth:`read_into` to bypass the page cache; returns whether it will (this
        default reader cannot)."""
        return False

    def staged(self, name: str, start: int, stop: int) -> None:
        """No range is staged here (see :meth:`SafetensorsFile.staged`): read the view."""
        return None


class SafetensorsFile(TensorTable):
    """A validated, memory-mapped safetensors file.

    Opening reads ``8 + N`` header bytes and maps the file; cost O(header). Arrays
    from :meth:`array` are read-only views (no copy) and stay valid after
    :meth:`close` until they are dropped.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._map = None
        self._closed = False
        self._direct = None  # the O_DIRECT descriptor, once read_directly() opened one
        # Off again after a refused read; the descriptor stays open until close(), since
        # another thread may be reading through it.
        self._direct_on = False
        self._staged = StagedReads()  # ranges prefetch read past the page cache, when direct
        # A FIFO or a device (a link to /dev/zero) is refused here, before any read.
        self._file = os.fdopen(open_regular(self.path), "rb")
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            self._infos, self.metadata = self._read_header()
            # One read-only map of the whole file; pages load only when a view is read.
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._address = map_address(self._map)
            MAPPED[id(self)] = (os.fsencode(self.path), self._size)
        except BaseException:
            self._file.close()
            raise

    # -- header -------------------------------------------------------------------

    def _corrupt(self, message, tensor=None):
        return CorruptFileError(message, file=self.path, tensor=tensor)

    def _read_header(self):
        if self._size < 8:
            raise self._corrupt(f"only {self._size} bytes; a safetensors file starts with an 8-byte header length")
        n = int.from_bytes(self._file.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise self._corrupt(f"header length {n} is absurd (limit {MAX_HEADER_BYTES} bytes)")
        if n > self._size - 8:
            raise self._corrupt(f"header length {n} exceeds the {self._size - 8} bytes after the length field")
        raw = self._file.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except _DuplicateKey as dup:
            # The hook also sees entry objects; a repeated field name is not a tensor name.
            tensor = None if dup.key in ("dtype", "shape", "data_offsets") else dup.key
            raise self._corrupt(f"header has the key {dup.key!r} twice", tensor=tensor) from None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._corrupt(f"header is not valid UTF-8 JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._corrupt(f"header is a JSON {type(header).__name__}, not an object")

        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        elif not (isinstance(metadata, dict)
                  and all(isinstance(v, str) for v in metadata.values())):
            raise self._corrupt("__metadata__ is not a map of strings to strings")

        data_start = 8 + n
        data_size = self._size - data_start
        spans = []
        infos = {}
        for name, entry in header.items():
            dtype, shape, begin, end = self._check_entry(name, entry)
            nbytes = dtypes.itemsize(dtype)
            for dim in shape:
                nbytes *= dim
            if end - begin != nbytes:
                raise self._corrupt(
                    f"data_offsets span {end - begin} bytes but {dtype} {list(shape)} needs {nbytes}",
                    tensor=name)
            if end > data_size:
                raise self._corrupt(
                    f"data ends at byte {end} of a {data_size}-byte data section (file truncated?)",
                    tensor=name)
            spans.append((begin, end, name))
            infos[name] = TensorInfo(name, dtype, shape, nbytes, data_start + begin, self.path)

        # Sorting by begin is stable, so equal offsets keep header order: file order.
        spans.sort(key=lambda s: (s[0], s[1]))
        prev_end, prev_name = 0, None
        for begin, end, name in spans:
            if begin == end:
                continue  # an empty tensor owns no bytes and cannot overlap anything
            if begin < prev_end:
                raise self._corrupt(f"data [{begin}, {end}) overlaps tensor {prev_name!r}", tensor=name)
            prev_end, prev_name = end, name
        return {name: infos[name] for _, _, name in spans}, metadata

    def _check_entry(self, name, entry):
        if not isinstance(entry, dict):
            raise self._corrupt("entry is not a JSON object", tensor=name)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise self._corrupt(f"entry has no {key!r}", tensor=name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise self._corrupt(f"dtype {dtype!r} is not a string", tensor=name)
        try:
            dtypes.lookup(dtype)
        except CheckpointError as exc:
            raise CorruptFileError(exc.message, file=self.path, tensor=name, hint=exc.hint) from None
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise self._corrupt(f"shape {shape!r} is not a list of integers", tensor=name)
        if any(d < 0 for d in shape):
            raise self._corrupt(f"shape {shape} has a negative dimension", tensor=name)
        # NumPy refuses more dimensions, or a shape whose non-zero sizes multiply past its
        # address space, even for an empty tensor; no real tensor comes near either.
        if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
            raise self._corrupt(f"shape {shape} is impossibly large", tensor=name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise self._corrupt(f"data_offsets {offsets!r} is not a pair of integers", tensor=name)
        begin, end = offsets
        if begin < 0 or begin > end:
            raise self._corrupt(f"data_offsets [{begin}, {end}] are not 0 <= begin <= end", tensor=name)
        return dtype, tuple(shape), begin, end

    # -- access -------------------------------------------------------------------

    def array(self, name: str) -> np.ndarray:
        """Read-only C-contiguous view of ``name`` in its storage dtype and shape.

        No bytes are copied or read here; pages are faulted in when the view is used.
        BF16 comes back as uint16 bits, F8_* as uint8 (see :mod:`kenstream.dtypes`).
        """
        info = self.info(name)
        if self._closed:
            raise CheckpointError("file is closed", file=self.path, tensor=name)
        storage = dtypes.storage_dtype(info.dtype)
        if info.nbytes == 0:
            out = np.empty(info.shape, dtype=storage)
            out.flags.writeable = False
            return out
        count = info.nbytes // storage.itemsize
        flat = np.frombuffer(self._map, dtype=storage, count=count, offset=info.offset)
        return flat.reshape(info.shape)

    def read_into(self, name: str, start: int, out: np.ndarray) -> None:
        """Copy bytes ``start : start + out.nbytes`` of ``name`` into ``out`` (C-contiguous)
        with ``pread``: one copy out of the page cache and no page mapped, cheaper than
        reading the memory map for data read once (a rebuilt frame starts as its base
        rows); past the page cache once :meth:`read_directly` is on. A file cut short
        raises CorruptFileError naming it."""
        info = self.info(name)
        if self._closed:
            raise CheckpointError("file is closed", file=self.path, tensor=name)
        if start < 0 or start + out.nbytes > info.nbytes or not out.flags.c_contiguous:
            raise ValueError(f"bytes {start}..{start + out.nbytes} of {name} cannot be read "
                             "into this array (outside the tensor, or not C-contiguous)")
        view = memoryview(out.reshape(-1).view(np.uint8))
        at, done = info.offset + start, 0
        if self._direct_on:
            try:
                done = read_aligned(self._direct, at, view)
            except OSError:
                self._direct_on = False  # refused (alignment, device): buffered from now on
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], at + done)
            if got <= 0:
                self.check_intact(name)
                raise self._corrupt("ends inside the tensor's data", tensor=name)
            done += got

    def read_directly(self) -> bool:
        """From now on read past the page cache (``O_DIRECT``, see :mod:`kenstream.io.direct`)
        where the system allows it; returns whether it will. :meth:`read_into` then reads
        that way, and :meth:`prefetch` stages its range for :meth:`staged`. For a file
        read once that the page cache could not keep anyway. Bytes read are the same
        either way; a file cut short still raises CorruptFileError."""
        if self._direct is None and not self._closed:
            self._direct = open_direct(self._file.fileno())
            self._direct_on = self._direct is not None
        return self._direct_on

    def staged(self, name: str, start: int, stop: int) -> np.ndarray | None:
        """Bytes ``start:stop`` of ``name`` as a read-only uint8 array, from the range
        :meth:`prefetch` staged (waiting for its read), or None when no staged read holds
        them all or its read failed (read the memory map then). A read that came back
        short means the file shrank since it was opened: CorruptFileError naming it, where
        the map would end the process with a bus error."""
        if stop <= start or not self._direct_on:
            return None
        offset = self.info(name).offset
        read = self._staged.find(offset + start, offset + stop)
        if read is None:
            return None
        view = read.bytes(offset + start, offset + stop)  # waits for the read
        if read.refused:
            self._direct_on = False  # as in read_into: buffered from now on
        elif view is None:
            self.check_intact(name)
        return view

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop the pages of ``name`` (bytes ``start:stop`` of it) from resident memory.

        Called after a tensor is done so that streaming a checkpoint larger than RAM
        keeps the resident set near one tensor. The mapping is read-only and backed by
        the file, so views still alive simply fault the pages in again when read (from
        the page cache if still there). The range is widened to what a read of it may
        have mapped (`_release_span`): without that, pages mapped around the first read
        of the next block stay resident until the file closes, a few per block, which
        adds up over a large checkpoint. Dropping a neighbour's pages is harmless (they
        fault back in from the page cache). Cost: one ``madvise`` call; a no-op where the
        platform has no ``MADV_DONTNEED`` or the file is closed.
        """
        info = self.info(name)
        stop = info.nbytes if stop is None else min(stop, info.nbytes)
        self._staged.drop(info.offset + max(0, start), info.offset + stop)
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED") or stop <= start:
            return
        first, last = _release_span(info.offset + max(0, start), info.offset + stop)
        last = min(last, len(self._map))
        self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def prefetch(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Ask the kernel to start reading ``name``'s pages (bytes ``start:stop``) in the
        background.

        Lets the disk work on the next block while the selection kernel computes on this
        one: the range is read into the page cache by the read-ahead thread
        (:mod:`kenstream.io.readahead`). Nothing is mapped into resident memory until the
        pages are used. Once :meth:`read_directly` is on, the range is staged instead:
        read past the page cache into memory of its own, which :meth:`staged` hands out
        (the memory goes when the range is released and no view of it is left), unless
        the page cache holds most of it already. A no-op on a closed file.
        """
        info = self.info(name)
        stop = info.nbytes if stop is None else min(stop, info.nbytes)
        if self._map is None or stop <= start:
            return
        lo, hi = info.offset + max(0, start), info.offset + stop
        if self._direct_on:
            cached = resident_fraction(self._address, lo, hi)
            if cached is None or cached < CACHED:
                READ_AHEAD.call(self._direct, self._staged.add(lo, hi).fill)
                return
        READ_AHEAD.submit(self._file.fileno(), lo, hi)

    def check_intact(self, name: str | None = None) -> None:
        """Raise CorruptFileError if the file is now shorter than when it was opened.

        Reading a mapped page past the new end would kill the process with a bus error, so
        the streaming readers call this before each block (cost: one ``fstat``)."""
        if self._closed:
            return
        size = os.fstat(self._file.fileno()).st_size
        if size < self._size:
            raise CorruptFileError(f"shrank from {self._size} to {size} bytes while being read "
                                   "(changed by another program?)", file=self.path, tensor=name)

    def close(self) -> None:
        """Release the file. Views still alive keep the mapping until they are dropped."""
        if self._closed:
            return
        self._closed = True
        MAPPED.pop(id(self), None)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # views still export the buffer; the map is freed with the last one
            self._map = None
        self._direct_on = False
        self._staged.clear()
        if self._direct is not None:
            os.close(self._direct)
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._infos)} tensors)"
