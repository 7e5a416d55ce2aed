"""The compress loop asks the disk for the next block's rows, of the fine-tune and, where
they will be read, of the base, before it needs them (the reads overlap the kernel)."""

from __future__ import annotations

import torch

import kenstream
from kenstream.io.checkpoint import Checkpoint
from tests.ckpt import save_dir

ROWS, COLS, BLOCK_ROWS = 64, 32, 8


def _pair(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(ROWS, COLS, generator=g)}
    ft = {"w": base["w"] + 0.01 * torch.randn(ROWS, COLS, generator=g)}
    return save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)


def _asked(tmp_path, monkeypatch, **options):
    """Row ranges of tensor ``w`` prefetched, per checkpoint root (base / ft)."""
    asked = {"base": set(), "ft": set()}
    real = Checkpoint.prefetch

    def spy(self, name, start=0, stop=None):
        if name == "w" and stop is not None:
            row_bytes = COLS * 4
            asked[self.root.name].add((start // row_bytes, -(-stop // row_bytes)))
        return real(self, name, start, stop)

    monkeypatch.setattr(Checkpoint, "prefetch", spy)
    b, f = _pair(tmp_path)
    block = BLOCK_ROWS * COLS
    kenstream.compress(b, f, tmp_path / "diff", keep=0.25, quiet=True, block_elems=block,
                       frame_elems=block, **options)
    return asked


def _covers(ranges, r0, r1):
    return any(a <= r0 and r1 <= b for a, b in ranges)


def test_format2_prefetches_every_later_block_of_both_inputs(tmp_path, monkeypatch):
    asked = _asked(tmp_path, monkeypatch)
    for r0 in range(BLOCK_ROWS, ROWS, BLOCK_ROWS):
        assert _covers(asked["ft"], r0, r0 + BLOCK_ROWS), (r0, asked["ft"])
        assert _covers(asked["base"], r0, r0 + BLOCK_ROWS), (r0, asked["base"])


def test_format1_ken_does_not_read_ahead_in_the_base(tmp_path, monkeypatch):
    """Format 1 stores KEN's kept values raw: the base rows are never read, so not asked for."""
    asked = _asked(tmp_path, monkeypatch, format_version=1)
    assert _covers(asked["ft"], ROWS - BLOCK_ROWS, ROWS)
    assert not any(b > 1 for _, b in asked["base"]), asked["base"]
