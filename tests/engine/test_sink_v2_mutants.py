"""Format 2's shard writer, pieces the round-trip tests cannot see: the progress bar's
count and the selection blocks' sizes (neither changes a byte of the diff)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import kenstream
from kenstream.engine import sink_v2
from tests.ckpt import save_dir, toy_pair
from tests.test_cli import spy_bar


def test_compress_counts_every_parameter_on_its_bar(tmp_path, monkeypatch):
    """The bar's total is every parameter of the fine-tune, and every one is counted, those
    of unchanged tensors (written without a frame) and of coded ones alike."""
    base, ft = toy_pair(torch.float32)
    assert torch.equal(base["layer.1.norm.weight"], ft["layer.1.norm.weight"])  # unchanged
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    seen = spy_bar(monkeypatch, "kenstream.engine.compress")
    kenstream.compress(b, f, tmp_path / "out", keep=0.5, quiet=True, threads=2)
    params = sum(t.numel() for t in ft.values())
    assert seen == {"total": params, "quiet": True, "counted": params}


def _sink(block_elems, frame_elems):
    return sink_v2.V2Sink(writer=None, shard="s", progress=None, block_elems=block_elems,
                          level=3, frame_elems=frame_elems, threads=1)


def _item(rows, cols, base_rows=None):
    return SimpleNamespace(rows=rows, cols=cols, base_rows=base_rows)


def test_blocks_are_runs_of_whole_frames_of_about_block_elems_values():
    """Frames of 2 rows x 4 columns (8 values); blocks of 16 values are 2 frames each, the
    last one what is left; none crosses the first row without a base."""
    sink = _sink(block_elems=16, frame_elems=8)
    try:
        assert sink.blocks(_item(10, 4)) == [(0, 4), (4, 8), (8, 10)]
        assert sink.blocks(_item(12, 4)) == [(0, 4), (4, 8), (8, 12)]
        # 5 rows with a base: frames (0,2) (2,4) (4,5), then (5,7) (7,9) (9,10)
        assert sink.blocks(_item(10, 4, base_rows=5)) == [(0, 4), (4, 5), (5, 9), (9, 10)]
        # one frame a block when a block holds no more than a frame
        assert _sink(block_elems=8, frame_elems=8).blocks(_item(6, 4)) == [(0, 2), (2, 4), (4, 6)]
    finally:
        sink.close()


def test_an_excluded_resized_matrix_codes_its_new_rows_without_a_base(tmp_path):
    """A resized vocabulary stored whole (``--exclude``): the rows the base has are coded
    against it, the rows it lacks (a block of their own) against nothing; it loads as the
    fine-tune's bit for bit."""
    g = torch.Generator().manual_seed(7)
    base = {"embed.weight": torch.randn(40, 16, generator=g).to(torch.bfloat16),
            "other.weight": torch.randn(8, 16, generator=g)}
    ft = {"embed.weight": torch.cat([base["embed.weight"].float() * 1.01,
                                     torch.randn(6, 16, generator=g)]).to(torch.bfloat16),
          "other.weight": base["other.weight"] + 0.01}
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    index = kenstream.compress(b, f, tmp_path / "d", keep=0.5, exclude="^embed", quiet=True,
                               frame_elems=64, block_elems=128)
    rec = index["tensors"]["embed.weight"]
    assert rec["reason"] == "excluded" and rec["base_rows"] == 40
    got = dict(kenstream.load(b, tmp_path / "d"))
    assert torch.equal(got["embed.weight"].view(torch.int16), ft["embed.weight"].view(torch.int16))


def _many_frames_pair(tmp_path):
    """A changed matrix to select and a new one to store, of 48 frames each at 16 values
    a frame."""
    g = torch.Generator().manual_seed(9)
    base = {"a.weight": torch.randn(48, 16, generator=g)}
    ft = {"a.weight": base["a.weight"] + 0.01 * torch.randn(48, 16, generator=g),
          "new.weight": torch.randn(48, 16, generator=g)}
    return save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)


def test_frames_in_flight_stay_a_few_per_thread(tmp_path, monkeypatch):
    """However many frames a tensor has, at most ``2 x threads + 2`` wait to be written
    once a frame is handed to the pool: memory stays a few frames."""
    b, f = _many_frames_pair(tmp_path)
    frame, most = sink_v2.V2Sink._frame, []

    def counted(self, tensor, r0, future):
        frame(self, tensor, r0, future)
        most.append((self._frames, self._limit))

    monkeypatch.setattr(sink_v2.V2Sink, "_frame", counted)
    kenstream.compress(b, f, tmp_path / "d", keep=0.5, quiet=True, threads=1,
                       frame_elems=16, block_elems=64)
    assert len(most) >= 96
    assert {limit for _, limit in most} == {4}
    assert max(n for n, _ in most) == 4


def test_a_selected_blocks_frames_are_written_before_the_next_selection(tmp_path,
                                                                        monkeypatch):
    """The selection kernel uses every core: a selected block's frames are coded and
    written before the loop selects the next block, not beside it."""
    b, f = _many_frames_pair(tmp_path)
    block, left = sink_v2.V2Sink.block, []

    def handed(self, item, rows, base_rows, r0, r1, mask):
        block(self, item, rows, base_rows, r0, r1, mask)
        if mask is not None:
            left.append(self._frames)

    monkeypatch.setattr(sink_v2.V2Sink, "block", handed)
    kenstream.compress(b, f, tmp_path / "d", keep=0.5, quiet=True, threads=1,
                       frame_elems=16, block_elems=64)
    assert len(left) == 12 and set(left) == {0}  # 48 rows, 4 frames of 1 row a block


def test_coded_rows_are_released_from_memory(tmp_path, monkeypatch):
    """Each frame's rows of the fine-tune, and of the base where it is coded against one,
    are dropped from resident memory once coded: a model larger than memory streams."""
    import threading
    from pathlib import Path

    from kenstream.io import rows as rows_mod

    b, f = _many_frames_pair(tmp_path)
    release, seen = rows_mod.TensorRows.release, {}

    def noted(self, r0=0, r1=None):
        if threading.current_thread().name.startswith("kenstream-code"):
            key = (Path(self.ckpt.root).name, self.name)
            seen.setdefault(key, set()).update(range(r0, r1))
        return release(self, r0, r1)

    monkeypatch.setattr(rows_mod.TensorRows, "release", noted)
    kenstream.compress(b, f, tmp_path / "d", keep=0.5, quiet=True, threads=2,
                       frame_elems=16, block_elems=64)
    every = set(range(48))
    assert seen == {("f", "a.weight"): every, ("b", "a.weight"): every,
                    ("f", "new.weight"): every}
