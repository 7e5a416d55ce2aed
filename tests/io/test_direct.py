"""Reads past the page cache: aligned reads that return the file's bytes, the safetensors
reader routing through them once asked to (read_into, and ranges staged by prefetch), and
their fall-backs."""

from __future__ import annotations

import fcntl
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from kenstream.errors import CorruptFileError
from kenstream.io import direct, safetensors_file
from kenstream.io.readahead import READ_AHEAD
from kenstream.io.safetensors_file import SafetensorsFile


@pytest.fixture
def small_bounce(monkeypatch):
    """Two alignment units a read: every test range spans several reads."""
    monkeypatch.setattr(direct, "BOUNCE", 2 * direct.ALIGN)
    monkeypatch.setattr(direct, "_local", direct.threading.local())


def _aligned_only(monkeypatch, fds):
    """os.preadv that, on the descriptors ``fds`` (a list, or a test of a descriptor),
    refuses what O_DIRECT refuses: an offset, a length or a buffer address off the
    alignment."""
    real = os.preadv
    calls = []
    picked = fds if callable(fds) else fds.__contains__

    def preadv(fd, buffers, offset):
        if not picked(fd):
            return real(fd, buffers, offset)
        (buf,) = buffers
        address = np.frombuffer(buf, np.uint8).ctypes.data if len(buf) else 0
        if offset % direct.ALIGN or len(buf) % direct.ALIGN or address % direct.ALIGN:
            raise OSError(22, "unaligned")
        calls.append((offset, len(buf)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(direct.os, "preadv", preadv)
    return calls


def test_aligned_reads_return_the_files_bytes_at_any_offset_and_length(tmp_path, monkeypatch,
                                                                       small_bounce):
    data = np.random.default_rng(3).integers(0, 256, 5 * direct.ALIGN + 123, np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    calls = _aligned_only(monkeypatch, [fd])
    try:
        for at, n in [(0, 10), (1, direct.ALIGN), (direct.ALIGN - 1, 2),
                      (5, 3 * direct.ALIGN + 7), (0, len(data)), (len(data) - 9, 9),
                      (2 * direct.ALIGN, direct.ALIGN)]:
            out = bytearray(n)
            assert direct.read_aligned(fd, at, memoryview(out)) == n
            assert bytes(out) == data[at:at + n], (at, n)
        out = bytearray(50)  # past the end: what there is, and the count says so
        assert direct.read_aligned(fd, len(data) - 20, memoryview(out)) == 20
        assert bytes(out[:20]) == data[-20:]
    finally:
        os.close(fd)
    assert calls and max(n for _, n in calls) <= direct.BOUNCE + direct.ALIGN
    assert len(calls) >= 4  # 3 * ALIGN + 7 bytes from offset 5: two-unit reads, several


def _tensor_file(tmp_path):
    rng = np.random.default_rng(5)
    tensors = {"a": rng.standard_normal((37, 129)).astype(np.float32),
               "b": rng.integers(0, 2**16, (3001,), dtype=np.uint16)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def _reads(sf, tensors):
    for name, want in tensors.items():
        raw = want.reshape(-1).view(np.uint8)
        for start in (0, 1, 4093, raw.size // 3):
            out = np.empty(raw.size - start, np.uint8)
            sf.read_into(name, start, out)
            assert np.array_equal(out, raw[start:]), (name, start)


def test_read_into_goes_through_aligned_reads_once_asked(tmp_path, monkeypatch, small_bounce):
    """With read_directly() on, every read_into goes through read_aligned on the second
    descriptor (a plain one here, so that the test does not depend on the file system
    taking O_DIRECT) and returns the same bytes; close() closes that descriptor."""
    path, tensors = _tensor_file(tmp_path)
    opened = []
    monkeypatch.setattr(safetensors_file, "open_direct",
                        lambda fd: opened.append(os.dup(fd)) or opened[-1])
    calls = _aligned_only(monkeypatch, opened)
    with SafetensorsFile(path) as sf:
        _reads(sf, tensors)
        assert calls == []  # buffered until asked
        assert sf.read_directly()
        _reads(sf, tensors)
        assert len(calls) > 8
    with pytest.raises(OSError):
        os.fstat(opened[0])


def test_direct_reads_fall_back_when_refused_and_still_name_a_short_file(tmp_path,
                                                                         monkeypatch):
    path, tensors = _tensor_file(tmp_path)
    monkeypatch.setattr(safetensors_file, "open_direct", lambda fd: None)
    with SafetensorsFile(path) as sf:
        assert not sf.read_directly()
        _reads(sf, tensors)

    refused = []

    def refuse(fd, at, view):
        refused.append(at)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(safetensors_file, "open_direct", os.dup)
    monkeypatch.setattr(safetensors_file, "read_aligned", refuse)
    with SafetensorsFile(path) as sf:
        assert sf.read_directly()
        _reads(sf, tensors)
        assert len(refused) == 1  # buffered from the first refusal on

    monkeypatch.undo()
    with SafetensorsFile(path) as sf:
        sf.read_directly()  # whatever this file system allows, the bytes are the same
        _reads(sf, tensors)
        os.truncate(path, 8 + struct.unpack("<Q", path.read_bytes()[:8])[0] + 100)
        with pytest.raises(CorruptFileError, match="shrank from") as err:
            sf.read_into("b", 0, np.empty(6002, np.uint8))
        assert str(path) in str(err.value)


def _staging(monkeypatch, tmp_path):
    """A tensor file whose second descriptor is opened without O_DIRECT (so that the test
    does not depend on the file system taking it) but refuses unaligned reads, as do its
    duplicates: it is marked by O_NONBLOCK, a status flag that, like O_DIRECT, duplicates
    share and that changes nothing for a regular file. The file was just written, so the
    page cache holds it: the test says it does not, as for a checkpoint read from the disk."""
    path, tensors = _tensor_file(tmp_path)
    monkeypatch.setattr(safetensors_file, "resident_fraction", lambda address, lo, hi: 0.0)
    monkeypatch.setattr(safetensors_file, "open_direct",
                        lambda fd: os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK))
    marked = lambda fd: bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)  # noqa: E731
    return path, tensors, _aligned_only(monkeypatch, marked)


def test_prefetch_stages_ranges_read_past_the_page_cache_and_hands_out_their_bytes(
        tmp_path, monkeypatch):
    path, tensors, calls = _staging(monkeypatch, tmp_path)
    raw = tensors["a"].reshape(-1).view(np.uint8)
    with SafetensorsFile(path) as sf:
        sf.prefetch("a", 100, 9000)
        READ_AHEAD.flush()
        assert sf.staged("a", 100, 9000) is None and calls == []  # buffered until asked
        assert sf.read_directly()
        sf.prefetch("a", 100, 9000)
        READ_AHEAD.flush()
        assert calls  # read aligned on the second descriptor, in the background
        for start, stop in [(100, 9000), (101, 102), (4000, 9000), (100, 101)]:
            got = sf.staged("a", start, stop)
            assert np.array_equal(got, raw[start:stop]), (start, stop)
            assert not got.flags.writeable
            with pytest.raises(ValueError):
                got[0] = 0
        # Only ranges a staged read holds whole: the rest is read from the map.
        assert sf.staged("a", 99, 200) is None and sf.staged("a", 8000, 9001) is None
        assert sf.staged("b", 0, 10) is None
        kept = sf.staged("a", 100, 9000)
        sf.release("a", 0, 5000)  # not to the range's end: still staged
        assert sf.staged("a", 200, 300) is not None
        sf.release("a", 5000, 9000)  # its last byte used: forgotten, views stay valid
        assert sf.staged("a", 200, 300) is None
        assert np.array_equal(kept, raw[100:9000])


def test_staged_reads_are_bounded_and_fall_back_when_refused_or_short(tmp_path, monkeypatch):
    path, tensors, calls = _staging(monkeypatch, tmp_path)
    raw = tensors["a"].reshape(-1).view(np.uint8)
    with SafetensorsFile(path) as sf:
        sf.read_directly()
        spans = [(i * 1000, i * 1000 + 500) for i in range(direct.MAX_STAGED + 2)]
        for start, stop in spans:
            sf.prefetch("a", start, stop)
        READ_AHEAD.flush()
        found = [sf.staged("a", *span) is not None for span in spans]
        assert found == [False] * 2 + [True] * direct.MAX_STAGED  # the oldest dropped

    ahead = []
    monkeypatch.setattr(safetensors_file.READ_AHEAD, "submit",
                        lambda fd, start, stop: ahead.append((start, stop)))

    def refuse(fd, buffers, offset):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(direct.os, "preadv", refuse)
    with SafetensorsFile(path) as sf:
        sf.read_directly()
        sf.prefetch("a", 0, 600)
        READ_AHEAD.flush()
        assert sf.staged("a", 0, 600) is None  # refused: the caller reads the map
        sf.prefetch("a", 600, 1200)  # and from then on the page cache reads ahead
        assert len(ahead) == 1

    monkeypatch.undo()
    path, tensors, calls = _staging(monkeypatch, tmp_path)
    with SafetensorsFile(path) as sf:
        sf.read_directly()
        end = raw.size
        os.truncate(path, sf.info("a").offset + end // 2)  # cut short before the read
        sf.prefetch("a", 0, end)
        READ_AHEAD.flush()
        # A short read hands out nothing, and names the file that shrank (the map would
        # end the process with a bus error where the file no longer reaches).
        for span in ((0, end), (0, 10)):
            with pytest.raises(CorruptFileError, match="shrank from") as err:
                sf.staged("a", *span)
            assert str(path) in str(err.value) and "'a'" in str(err.value)


def test_resident_fraction_counts_the_pages_the_page_cache_holds(tmp_path):
    """Written pages are in the page cache; pages of a hole never read or written are not."""
    page = direct.mmap.PAGESIZE
    path = tmp_path / "sparse"
    with open(path, "wb") as fh:
        fh.truncate(64 * page)  # a hole: no page of it has been read
        fh.write(b"x" * (16 * page))  # the first 16 pages written, so cached
    with open(path, "rb") as fh, direct.mmap.mmap(fh.fileno(), 0,
                                                   access=direct.mmap.ACCESS_READ) as mapped:
        at = direct.map_address(mapped)
        assert direct.resident_fraction(at, 0, 16 * page) == 1.0
        assert direct.resident_fraction(at, 16 * page, 64 * page) == 0.0
        assert direct.resident_fraction(at, 8 * page + 1, 24 * page - 1) == 0.5
        assert direct.resident_fraction(at, 5, 5) is None


@pytest.mark.parametrize("cached, staged", [(0.49, True), (direct.CACHED, False), (1.0, False)])
def test_prefetch_reads_a_range_mostly_in_the_page_cache_from_there(tmp_path, monkeypatch,
                                                                     cached, staged):
    """A range the page cache mostly holds is not read from the disk again: prefetch
    leaves it to the map (read ahead as a buffered read) instead of staging it."""
    path, tensors, calls = _staging(monkeypatch, tmp_path)
    asked = []
    monkeypatch.setattr(safetensors_file, "resident_fraction",
                        lambda address, lo, hi: asked.append((lo, hi)) or cached)
    buffered = []
    monkeypatch.setattr(safetensors_file.READ_AHEAD, "submit",
                        lambda fd, lo, hi: buffered.append((lo, hi)))
    with SafetensorsFile(path) as sf:
        sf.read_directly()
        sf.prefetch("a", 100, 9000)
        READ_AHEAD.flush()
        span = (sf.info("a").offset + 100, sf.info("a").offset + 9000)
        assert asked == [span]
        assert (sf.staged("a", 100, 9000) is not None) == staged
        assert bool(calls) == staged
        assert buffered == ([] if staged else [span])


def test_a_file_just_written_is_read_ahead_through_the_page_cache(tmp_path, monkeypatch):
    """With the real page-cache query: the file was just written, so nothing is staged."""
    path, tensors = _tensor_file(tmp_path)
    monkeypatch.setattr(safetensors_file, "open_direct", os.dup)
    with SafetensorsFile(path) as sf:
        assert sf.read_directly()
        sf.prefetch("a", 0, 9000)
        READ_AHEAD.flush()
        assert sf.staged("a", 0, 9000) is None


def test_direct_reads_can_be_switched_off_from_the_environment(tmp_path, monkeypatch):
    """KENSTREAM_DIRECT_IO=0 keeps every read in the page cache: no O_DIRECT descriptor is
    even asked for. Unset (or another value), one is (the system may still refuse it)."""
    path, tensors = _tensor_file(tmp_path)
    asked = []
    monkeypatch.setattr(direct.os, "O_DIRECT", 0o40000, raising=False)
    monkeypatch.setattr(direct.os, "open", lambda name, flags: asked.append(flags) or
                        os.dup(int(name.rsplit("/", 1)[1])))
    with open(path, "rb") as fh:
        for value, opened in (("0", False), (" 0 ", False), ("1", True), (None, True)):
            if value is None:
                monkeypatch.delenv(direct.SWITCH, raising=False)
            else:
                monkeypatch.setenv(direct.SWITCH, value)
            asked.clear()
            fd = direct.open_direct(fh.fileno())
            assert (fd is not None) == opened and bool(asked) == opened, value
            if fd is not None:
                assert asked[0] & direct.os.O_DIRECT
                os.close(fd)
