"""Format 2's shard writer: the compress loop does not wait at a tensor's end for its last
frames to be coded, and the bytes are those of a writer that does (the frames' own bytes
are checked against the reference coder of tests/format/reference_v2.py elsewhere)."""

from __future__ import annotations

import hashlib
import threading

import torch

import kenstream
from kenstream.engine import sink_v2
from tests.ckpt import save_dir, toy_pair


def _tree(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.suffix == ".kdiff"}


def test_the_loop_goes_on_to_the_next_tensor_while_the_last_frames_are_coded(tmp_path,
                                                                            monkeypatch):
    """The first tensor's frames are held in the coder until the loop hands the sink
    another tensor, which a loop that drained at the tensor's end could never do."""
    base, ft = toy_pair(torch.bfloat16)
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    end = sink_v2.V2Sink._end

    def waits(self, tensor):  # the reference: every frame written before the tensor ends
        self._drain(0)
        return end(self, tensor)

    with monkeypatch.context() as m:
        m.setattr(sink_v2.V2Sink, "_end", waits)
        kenstream.compress(b, f, tmp_path / "waits", keep=1, quiet=True, threads=1)

    moved_on, first, held = threading.Event(), [], []
    encode, block = sink_v2.encode_frame, sink_v2.V2Sink.block

    def coded(*args, **kwargs):
        if not held and threading.current_thread().name.startswith("kenstream-code"):
            held.append(moved_on.wait(timeout=30))  # a guard against a hang, not a timing
        return encode(*args, **kwargs)

    def handed(self, item, *args, **kwargs):
        if not first:
            first.append(item.name)
        elif item.name != first[0]:
            moved_on.set()
        return block(self, item, *args, **kwargs)

    monkeypatch.setattr(sink_v2, "encode_frame", coded)
    monkeypatch.setattr(sink_v2.V2Sink, "block", handed)
    kenstream.compress(b, f, tmp_path / "goes-on", keep=1, quiet=True, threads=1)
    assert held == [True]
    assert _tree(tmp_path / "goes-on") == _tree(tmp_path / "waits")
