"""verify's pool goes on from one tensor to the next: most tensors are a single block, and
a wait at each tensor's end would leave every thread but one idle."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch

import kenstream
from tests.ckpt import save_dir, toy_pair

# kenstream.engine's own `verify` is the function: the module is reached by its full name.
verify_module = importlib.import_module("kenstream.engine.verify")


@pytest.mark.parametrize("with_finetuned", [True, False])
def test_the_next_tensors_blocks_start_while_one_is_still_checked(tmp_path, monkeypatch,
                                                                  with_finetuned):
    """The first block checked is held until another tensor's block starts on the other
    thread, which a pool that waited at each tensor's end could never do; the report is
    the one an unhindered run gives."""
    base, ft = toy_pair(torch.float32)
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "diff", keep=0.5, quiet=True)
    finetuned = f if with_finetuned else None
    expected = kenstream.verify(tmp_path / "diff", b, finetuned, quiet=True, threads=2)

    lock, moved_on, first, held = threading.Lock(), threading.Event(), [], []
    name = "_check_block" if with_finetuned else "_decode_block"
    real = getattr(verify_module, name)

    def watched(blocks, *args):
        with lock:
            mine = not first
            if mine:
                first.append(blocks.name)
            elif blocks.name != first[0]:
                moved_on.set()
        if mine:
            held.append(moved_on.wait(timeout=30))  # a guard against a hang, not a timing
        return real(blocks, *args)

    monkeypatch.setattr(verify_module, name, watched)
    got = kenstream.verify(tmp_path / "diff", b, finetuned, quiet=True, threads=2)
    assert held == [True]
    assert got == expected and got["ok"]
