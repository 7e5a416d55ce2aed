"""The compress loop asks the disk for the next block's rows, of the fine-tune and, where
they will be read, of the base, before it needs them (the reads overlap the kernel)."""

from __future__ import annotations

import os

import numpy as np
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
    """Format 1 stores KEN's kept values raw: the base rows are never read, so no block of
    them is asked for; only the head the unchanged-tensor check compares (256 KiB)."""
    asked = _asked(tmp_path, monkeypatch, format_version=1)
    assert _covers(asked["ft"], ROWS - BLOCK_ROWS, ROWS)
    head = (1 << 18) // (COLS * 4)
    assert asked["base"] <= {(0, head)}, asked["base"]


def test_rebuild_reads_base_rows_into_its_output_and_not_ahead(tmp_path, monkeypatch):
    """Rebuild reads each frame's base rows with one read_into (pread) into the buffer it
    rebuilds in, and does not also ask the read-ahead thread for them (that would copy
    every base byte twice); the diff's bytes are still asked for ahead."""
    b, f = _pair(tmp_path)
    block = BLOCK_ROWS * COLS
    kenstream.compress(b, f, tmp_path / "diff", keep=0.25, quiet=True, frame_elems=block)
    read, asked = [], {"base": 0}
    real_read, real_ask = Checkpoint.read_into, Checkpoint.prefetch

    def spy_read(self, name, start, out):
        if name == "w":
            read.append((start // (COLS * 4), out.shape))
        return real_read(self, name, start, out)

    def spy_ask(self, name, start=0, stop=None):
        asked["base"] += self.root.name == "base"
        return real_ask(self, name, start, stop)

    monkeypatch.setattr(Checkpoint, "read_into", spy_read)
    monkeypatch.setattr(Checkpoint, "prefetch", spy_ask)
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True)
    assert sorted(read) == [(r0, (BLOCK_ROWS, COLS)) for r0 in range(0, ROWS, BLOCK_ROWS)]
    assert asked["base"] == 0


def test_rebuild_reads_the_base_past_the_page_cache_only_when_the_pair_exceeds_memory(
        tmp_path, monkeypatch):
    """Base and rebuilt model larger than the machine's memory: the base's files are asked
    for O_DIRECT reads (the page cache could not keep them); smaller: not. The model
    written is the same bytes either way."""
    from kenstream.io import direct
    from kenstream.io.safetensors_file import SafetensorsFile

    b, f = _pair(tmp_path)
    kenstream.compress(b, f, tmp_path / "diff", keep=0.25, quiet=True,
                       frame_elems=BLOCK_ROWS * COLS)
    asked = []
    real = SafetensorsFile.read_directly

    def spy(self):
        asked.append(self.path.parent.name)
        return real(self)

    monkeypatch.setattr(SafetensorsFile, "read_directly", spy)
    pair_bytes = 2 * ROWS * COLS * 4 + 2 * 4096  # base file and model, headers included
    outputs = {}
    for memory in (10 * pair_bytes, ROWS * COLS * 4):
        monkeypatch.setattr(direct, "physical_memory", lambda memory=memory: memory)
        asked.clear()
        out = tmp_path / f"out-{memory}"
        kenstream.rebuild(b, tmp_path / "diff", out, quiet=True)
        outputs[memory] = asked[:], {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    (big_asked, big), (small_asked, small) = outputs.values()
    assert big_asked == [] and small_asked == ["base"]
    assert big == small and big


def test_compress_selects_and_codes_from_blocks_staged_past_the_page_cache(tmp_path,
                                                                          monkeypatch):
    """Where the system allows O_DIRECT, every block of both inputs is read ahead into
    memory of its own (a staged read) and the kernel and the coders read it there; the
    diff is the same bytes as with buffered reads (O_DIRECT refused)."""
    from kenstream.io import safetensors_file
    from kenstream.io.rows import TensorRows

    # Rows wide enough that the unchanged-tensor check reads less than the first block.
    rows, cols, block_rows = 64, 2048, 16
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(rows, cols, generator=g)}
    ft = {"w": base["w"] + 0.01 * torch.randn(rows, cols, generator=g)}
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    block = block_rows * cols
    served = {"base": set(), "ft": set()}  # row ranges read from memory not of the map
    real = TensorRows.raw

    def spy(self, r0, r1):
        got = real(self, r0, r1)
        if self.name == "w" and not np.shares_memory(got, self.ckpt.array("w")):
            served[self.ckpt.root.name].add((r0, r1))
        return got

    monkeypatch.setattr(TensorRows, "raw", spy)
    # Both inputs were just written, so the page cache holds them: say it does not, as for
    # a checkpoint read from the disk (which prefetch stages).
    monkeypatch.setattr(safetensors_file, "resident_fraction", lambda address, lo, hi: 0.0)
    shards = {}
    for allowed, opener in (("no", lambda fd: None), ("yes", os.dup)):
        monkeypatch.setattr(safetensors_file, "open_direct", opener)
        out = tmp_path / f"diff-{allowed}"
        kenstream.compress(b, f, out, keep=0.25, quiet=True, block_elems=block,
                           frame_elems=block)
        shards[allowed] = {p.name: p.read_bytes() for p in out.glob("*.kdiff")}
        if allowed == "no":
            assert served == {"base": set(), "ft": set()}
    assert shards["yes"] == shards["no"] and shards["no"]
    for r0 in range(0, rows, block_rows):  # selected from, then coded against its base
        assert (r0, r0 + block_rows) in served["ft"], (r0, served["ft"])
        assert (r0, r0 + block_rows) in served["base"], (r0, served["base"])


def test_a_compress_task_opening_its_own_inputs_asks_both_for_direct_reads(tmp_path,
                                                                          monkeypatch):
    """The job a Ray task runs opens the inputs itself, and asks both for direct reads (so
    that prefetch stages blocks) as the driver's local run does."""
    from kenstream.engine.executor import CompressJob, Source

    b, f = _pair(tmp_path)
    asked = []
    real = Checkpoint.read_directly
    monkeypatch.setattr(Checkpoint, "read_directly",
                        lambda self: asked.append(self.root.name) or real(self))
    with Checkpoint.open(str(b)) as base, Checkpoint.open(str(f)) as ft:
        job = CompressJob(None, Source.of(ft), Source.of(base), None, 2, 1, 1, 1, 1)
        with job.session((ft, base)):
            assert sorted(asked) == ["base", "ft"]
    asked.clear()
    with job.session() as (ft, base):
        assert ft.root.name == "ft" and base.root.name == "base"
    assert sorted(asked) == ["base", "ft"]
