"""The compress plan (engine.plan) on tiny checkpoints: each tensor's fate, the frames a
format 2 tensor is cut into, and the warnings and refusals the plan raises. Expected
values are worked out by hand from the shapes written here."""

from __future__ import annotations

import warnings

import pytest
import torch

from kenstream.engine.align import align, tie_heads
from kenstream.engine.plan import make_items
from kenstream.errors import MismatchError
from kenstream.io.checkpoint import Checkpoint
from kenstream.settings import Settings
from tests.ckpt import save_dir


def plan(tmp_path, base: dict, ft: dict, *, version: int = 2, frame_elems: int = 1 << 20,
         **settings):
    """make_items over ``base`` and ``ft`` written as checkpoints: (items by name, the
    warnings' messages)."""
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    with Checkpoint.open(str(b)) as bc, Checkpoint.open(str(f)) as fc:
        alignment = align(fc.names(), bc.names())
        if version >= 2:
            tie_heads(alignment, bc.names())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = make_items(fc, bc, alignment, Settings(**(settings or {"keep": 0.5})),
                               version=version, frame_elems=frame_elems)
    return {i.name: i for i in items}, [str(w.message) for w in caught]


def test_format_2_items_count_their_frames_and_format_1_items_none(tmp_path):
    """Frames are whole rows of about ``frame_elems`` values: 16 values over rows of 8 is
    2 rows a frame, so 10 rows make 5 frames; a resized matrix (10 rows over a base of 7)
    starts afresh at row 7: 0-2, 2-4, 4-6, 6-7, then 7-9, 9-10. The count sizes each
    shard's header reserve (the frame table's shape), so it must not be 0 in format 2.
    Format 1 has no frames. A new tensor has no rows with a base."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(10, 8, generator=g), "emb": torch.randn(7, 8, generator=g)}
    ft = {"w": base["w"] + 1e-3, "emb": torch.randn(10, 8, generator=g),
          "new": torch.randn(3, 8, generator=g)}
    items, _ = plan(tmp_path / "v2", base, ft, frame_elems=16)
    assert items["new"].reason == "new" and items["new"].with_base == 0
    assert items["new"].frames == 2
    assert items["w"].frames == 5 and items["w"].base_rows is None
    assert items["emb"].frames == 6 and items["emb"].base_rows == 7
    assert items["emb"].with_base == 7 and items["w"].with_base == 10
    items, _ = plan(tmp_path / "v1", base, {"w": ft["w"]}, version=1, frame_elems=16)
    assert items["w"].frames == 0


def test_half_the_parameters_with_a_base_is_not_warned_about(tmp_path):
    """The 'is the base the model it was fine-tuned from?' warning is for fewer than half
    the fine-tune's parameters having a base: exactly half (8 of 16) is not warned about,
    one value fewer (8 of 17) is."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(2, 4, generator=g)}
    half = {"w": base["w"] + 1e-3, "new": torch.randn(2, 4, generator=g)}
    _, said = plan(tmp_path / "half", base, half)
    assert not [m for m in said if "have a base" in m], said
    under = {"w": base["w"] + 1e-3, "new": torch.randn(9, generator=g)}
    _, said = plan(tmp_path / "under", base, under)
    assert [m for m in said if m.startswith("only 47% of the fine-tune's parameters have a "
                                            "base tensor (1 of 2 tensors are new)")], said


def test_no_shared_name_is_no_alignment(tmp_path):
    """Two checkpoints without one tensor name in common (even by a prefix) are refused
    as unrelated, before anything is planned."""
    g = torch.Generator().manual_seed(2)
    base = {"encoder.q": torch.randn(4, 4, generator=g)}
    ft = {"decoder.k": torch.randn(4, 4, generator=g)}
    with pytest.raises(MismatchError, match="no tensor name of the fine-tune matches the base"):
        plan(tmp_path, base, ft)


def test_setting_warnings_at_their_edges(tmp_path):
    """The warnings on settings that do not do what they seem to ask, at their bounds:
    ``--k`` equal to a row's length keeps the row whole (warned); ``--keep 1`` asks for
    whole rows (not warned); no ``--include`` is not an include that selects nothing,
    even where nothing is selected (every changed tensor integer)."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(3, 8, generator=g), "v": torch.randn(3, 16, generator=g)}
    ft = {n: t + 1e-3 for n, t in base.items()}
    _, said = plan(tmp_path / "k8", base, ft, k=8)
    assert [m for m in said if m.startswith("--k 8 keeps every value of 1 of 2 selected "
                                            "tensors (rows of at most 8 values, e.g. w)")], said
    _, said = plan(tmp_path / "k7", base, ft, k=7)
    assert not [m for m in said if "keeps every value" in m], said
    _, said = plan(tmp_path / "keep1", base, ft, keep=1)
    assert said == []
    ints = {"i": torch.arange(6, dtype=torch.int32)}
    items, said = plan(tmp_path / "ints", ints, {"i": ints["i"] + 1})
    assert items["i"].reason == "non-float" and said == []
    items, said = plan(tmp_path / "inc", base, ft, keep=0.5, include="nothing")
    assert {i.reason for i in items.values()} == {"excluded"}
    assert said == ["--include 'nothing' selects no tensor: every changed tensor is stored "
                    "whole"]


def test_rows_of_one_value_are_not_warned_about_keeping_one(tmp_path):
    """``--keep`` warns of tensors whose rows keep a single value of several; a tensor of
    one-value rows (shape [4, 1]) keeps its one value whatever the keep, which is no
    surprise to warn about. Rows of 40 at --keep 0.01 are (0.4 asked: more than asked)."""
    g = torch.Generator().manual_seed(4)
    base = {"col": torch.randn(4, 1, generator=g), "w": torch.randn(2, 40, generator=g)}
    ft = {n: t + 1e-3 for n, t in base.items()}
    items, said = plan(tmp_path / "col", {"col": base["col"]}, {"col": ft["col"]}, keep=0.01)
    assert items["col"].k == 1 and items["col"].reason == "selected"
    assert said == []
    _, said = plan(tmp_path / "both", base, ft, keep=0.01)
    assert said == ["--keep 0.01 keeps one value a row in 1 tensor (e.g. w, rows of 40); "
                    "1 of them keep more than the 0.01 asked"]


def test_half_a_value_asked_is_more_than_asked(tmp_path):
    """--keep 0.25 of rows of 2 asks half a value a row; round() takes 0.5 to 0, so the
    floor of one value keeps more than asked, as --keep 0.2 (0.4 a row) does."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(3, 2, generator=g)}
    ft = {"w": base["w"] + 1e-3}
    for keep in (0.25, 0.2):
        _, said = plan(tmp_path / str(keep), base, ft, keep=keep)
        assert said == [f"--keep {keep} keeps one value a row in 1 tensor (e.g. w, rows of 2); "
                        f"1 of them keep more than the {keep} asked"], said
