"""The read-ahead thread reads exactly the ranges asked for, through its own descriptor,
and a safetensors prefetch asks for the tensor's own bytes."""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import save_file

from kenstream.io import readahead
from kenstream.io.safetensors_file import SafetensorsFile


def _recording(monkeypatch):
    """Replace os.preadv in the module by a recorder of (bytes read, offset)."""
    seen = []
    real = os.preadv

    def spy(fd, buffers, offset):
        got = real(fd, buffers, offset)
        seen.append((bytes(buffers[0][:got]), offset))
        return got

    monkeypatch.setattr(readahead.os, "preadv", spy)
    return seen


def test_a_range_is_read_whole_in_chunks_after_the_file_is_closed(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 3 * readahead.CHUNK + 123, np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data.tobytes())
    seen = _recording(monkeypatch)
    reader = readahead.ReadAhead()
    fd = os.open(path, os.O_RDONLY)
    start, stop = 77, 2 * readahead.CHUNK + 5000
    reader.submit(fd, start, stop)
    os.close(fd)  # the queued read uses its own descriptor
    reader.flush()
    assert b"".join(chunk for chunk, _ in seen) == data[start:stop].tobytes()
    assert [off for _, off in seen] == list(range(start, stop, readahead.CHUNK))
    assert max(len(chunk) for chunk, _ in seen) == readahead.CHUNK


def test_a_range_past_the_end_stops_there_and_empty_ranges_read_nothing(tmp_path, monkeypatch):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 1000)
    seen = _recording(monkeypatch)
    reader = readahead.ReadAhead()
    with open(path, "rb") as f:
        reader.submit(f.fileno(), 10, 10)
        reader.submit(f.fileno(), 900, 5000)
        reader.flush()
    # The second read finds the end of the file and ends the range.
    assert seen == [(b"x" * 100, 900), (b"", 1000)]


def test_safetensors_prefetch_reads_the_tensors_own_bytes(tmp_path, monkeypatch):
    tensors = {"a": torch.arange(1000, dtype=torch.float32),
               "b": torch.arange(64, dtype=torch.int64).reshape(8, 8) * 3}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    seen = _recording(monkeypatch)
    with SafetensorsFile(path) as sf:
        sf.prefetch("b", 16, 48)  # bytes 16..48 of b: its elements 2..5
        sf.prefetch("a")
        readahead.READ_AHEAD.flush()
    got = [chunk for chunk, _ in seen]
    assert got == [tensors["b"].numpy().reshape(-1)[2:6].tobytes(),
                   tensors["a"].numpy().tobytes()]
