"""The streaming shard writer and its write-behind helper.

Files are read back with the independent ``safetensors`` library, and the write-behind
output is compared byte for byte with the same calls made directly on a `ShardWriter`.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from kenstream.errors import OutputError
from kenstream.io import writer as writer_mod
from kenstream.io.writer import BufferRing, ShardWriter, WriteBehind


def _blocks(n=9, rows=3, cols=50):
    rng = np.random.default_rng(1)
    # Every block differs, so a buffer refilled before its write finished would show.
    return [rng.standard_normal((rows, cols)).astype(np.float32) for _ in range(n)]


def _direct(path, blocks, **kw):
    with ShardWriter(path, 400, **kw) as w:
        w.begin("a", "F32")
        for b in blocks:
            w.write(b)
        w.end((len(blocks) * blocks[0].shape[0], blocks[0].shape[1]))
        w.append("tail", "I64", (4,), np.arange(4, dtype=np.int64))
        w.finish({"format": "pt"})
    return path.read_bytes()


def _behind(path, blocks, ring=None, **kw):
    with ShardWriter(path, 400, **kw) as w, WriteBehind(w, ring) as behind:
        behind.begin("a", "F32")
        for b in blocks:
            behind.put(np.float32, b.shape, lambda out, b=b: np.copyto(out, b))
        behind.end((len(blocks) * blocks[0].shape[0], blocks[0].shape[1]))
        behind.begin("tail", "I64")
        behind.put(np.int64, (4,), lambda out: np.copyto(out, np.arange(4)))
        behind.end((4,))
        behind.finish({"format": "pt"})
    return path.read_bytes()


def test_write_behind_writes_the_same_bytes(tmp_path):
    blocks = _blocks()
    direct = _direct(tmp_path / "d.safetensors", blocks)
    assert _behind(tmp_path / "b.safetensors", blocks) == direct
    got = load_file(str(tmp_path / "b.safetensors"))
    assert np.array_equal(got["a"], np.concatenate(blocks))
    assert got["tail"].tolist() == [0, 1, 2, 3]


def test_one_ring_serves_several_files(tmp_path):
    ring = BufferRing(2, nbytes=16)  # smaller than a block: grows on first use
    small, large = _blocks(n=5, rows=2, cols=7), _blocks(n=4, rows=6, cols=90)
    for i, blocks in enumerate((small, large, small)):
        got = _behind(tmp_path / f"r{i}.safetensors", blocks, ring)
        assert got == _direct(tmp_path / f"d{i}.safetensors", blocks)


def test_write_behind_raises_the_writers_error_and_leaves_no_file(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ShardWriter.write

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OutputError("disk full (simulated)", file=self.path)
        real(self, data)

    monkeypatch.setattr(ShardWriter, "write", failing)
    path = tmp_path / "x.safetensors"
    with pytest.raises(OutputError, match="simulated"):
        _behind(path, _blocks())
    assert calls["n"] == 3  # calls queued after the failure were skipped
    assert not path.exists()
    assert not (tmp_path / "x.safetensors.partial").exists()


def test_an_error_while_building_stops_the_helper_and_removes_the_file(tmp_path):
    path = tmp_path / "y.safetensors"

    def broken(out):
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        with ShardWriter(path, 100) as w, WriteBehind(w) as behind:
            behind.begin("a", "F32")
            behind.put(np.float32, (2, 2), lambda out: out.fill(1))
            behind.put(np.float32, (2, 2), broken)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_drop_behind_writes_the_same_bytes_and_advises(tmp_path, monkeypatch):
    advised = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        advised.append((offset, length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(writer_mod, "_WRITEBACK", 1000)  # a window every ~2 blocks
    monkeypatch.setattr(os, "posix_fadvise", spy)
    blocks = _blocks()
    plain = _direct(tmp_path / "plain.safetensors", blocks)
    assert not advised
    assert _direct(tmp_path / "dropped.safetensors", blocks, drop_behind=True) == plain
    direct_calls, advised[:] = list(advised), []
    assert _behind(tmp_path / "behind.safetensors", blocks, drop_behind=True) == plain
    assert advised == direct_calls
    assert len(advised) >= 3 and all(a == os.POSIX_FADV_DONTNEED for _, _, a in advised)
    # Each call starts writeback up to where the file has got and drops the window before
    # the one it starts: it begins where the call before the previous one ended.
    assert advised[0][0] == advised[1][0] == 8 + 400
    ends = [o + n for o, n, _ in advised]
    assert ends == sorted(set(ends)) and ends[-1] <= len(plain)
    for i in range(len(advised) - 2):
        assert advised[i + 2][0] == ends[i]
