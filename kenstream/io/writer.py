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

from ..errors import OutputError

TEMP_SUFFIX = ".partial"
_CHUNK = 1 << 24


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
    """

    def __init__(self, path, reserve: int):
        self.path = Path(path)
        self.temp = self.path.with_name(self.path.name + TEMP_SUFFIX)
        self.reserve = padded_length(max(int(reserve), 2))
        self.entries: dict = {}
        self._open = None
        self._end = 0
        try:
            self._fh = open(self.temp, "wb")
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

    def end(self, shape) -> None:
        """Close the open entry with its final ``shape``."""
        name, dtype, begin = self._open
        self._open = None
        self.entries[name] = (dtype, tuple(shape), begin, self._end)

    def finish(self, metadata: dict | None = None) -> dict:
        """Write the header, fsync, rename into place; returns ``{"size"}``."""
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
