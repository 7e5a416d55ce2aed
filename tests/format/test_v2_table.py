"""A format-2 tensor's frame table against its record (kenstream.format.v2_tensor): a table
of another frame count, frames starting elsewhere, kept counts or byte counts that do not
add up, numbers no table can hold, rows without a base that do not keep every position.
Each table here is the written one edited by hand; each is refused with DiffError when
the tensor is opened, before any frame is decoded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kenstream
from kenstream.errors import DiffError
from kenstream.format.v2_tensor import V2Tensor
from kenstream.io.diff_reader import DiffReader
from tests.test_reliability import pair  # noqa: F401

FRAME_ELEMS = 32  # 2 rows of 16 a frame: a.weight [8, 16] is 4 frames


@pytest.fixture
def coded(pair):
    """(record, frames entry, table copy) of a.weight in a diff of 4-frame tensors."""
    b, f, out = pair
    kenstream.compress(b, f, out, keep=0.5, frame_elems=FRAME_ELEMS, quiet=True)
    with DiffReader(out) as d:
        rec = d.records["a.weight"]
        entries = {k: np.array(v) for k, v in d.entries("a.weight").items()}
    table = entries["table"].reshape(-1, 4).copy()
    assert rec.encoding == "coded" and table.shape == (4, 4)
    assert table[:, 0].tolist() == [0, 2, 4, 6]
    return rec, entries["frames"], table


def _open(rec, frames, table):
    return V2Tensor("a.weight", rec, {"frames": frames, "table": table}, FRAME_ELEMS)


def test_the_written_table_opens_and_decodes(coded):
    rec, frames, table = coded
    t = _open(rec, frames, table)
    assert sum(int(t.positions(i)[1].sum()) for i in range(4)) == rec.kept


def test_a_table_of_another_frame_count_is_refused(coded):
    rec, frames, table = coded
    with pytest.raises(DiffError, match="has 3 frames, 4 expected"):
        _open(rec, frames, table[:3])


def test_frames_that_start_elsewhere_are_refused(coded):
    rec, frames, table = coded
    table[1, 0] = 3
    with pytest.raises(DiffError, match="rows do not start where the frames do"):
        _open(rec, frames, table)


def test_kept_counts_must_add_up_and_fit_their_frame(coded):
    rec, frames, table = coded
    moved = table.copy()
    moved[0, 3] += 1  # the total is wrong
    with pytest.raises(DiffError, match="kept counts do not add up"):
        _open(rec, frames, moved)
    over = table.astype(np.int64)
    extra = 2 * 16 + 1 - int(over[0, 3])
    over[0, 3] = 2 * 16 + 1  # more than a frame of 2 rows holds, the total kept right
    for i in (1, 2, 3):
        take = min(extra, int(over[i, 3]))
        over[i, 3] -= take
        extra -= take
    assert extra == 0 and int(over[:, 3].sum()) == rec.kept
    over = over.astype(np.uint64)
    with pytest.raises(DiffError, match="kept counts do not add up"):
        _open(rec, frames, over)


def test_byte_counts_must_add_up_to_the_record(coded):
    rec, frames, table = coded
    for column in (1, 2):
        edited = table.copy()
        edited[0, column] += 1
        with pytest.raises(DiffError, match="frame lengths do not add up"):
            _open(rec, frames, edited)


def test_numbers_no_table_holds_are_refused(coded):
    """2**63 + x read as int64 is negative: two such byte counts would add up again."""
    rec, frames, table = coded
    table = table.astype(np.uint64)
    table[0, 1] += np.uint64(1 << 63)
    table[1, 1] += np.uint64(1 << 63)
    with pytest.raises(DiffError, match="impossible numbers"):
        _open(rec, frames, table)


def test_rows_without_a_base_must_keep_every_position(coded):
    """The same table under a record that says the tensor has no base rows (a new
    tensor): its frames keep half their positions, which only rows with a base may."""
    rec, frames, table = coded
    assert int(table[0, 3]) < 2 * 16
    orphan = dataclasses.replace(rec, base_name=None)
    assert orphan.with_base == 0
    with pytest.raises(DiffError, match="rows without a base must keep every position"):
        _open(orphan, frames, table)


def test_a_row_longer_than_any_real_one_is_refused_however_consistent(coded):
    """A forged record of one row of 2**40 values with a table that agrees with it in
    every count: only the frame-size bound stops the first decode from allocating
    2**40 values."""
    rec, frames, _ = coded
    cols = 1 << 40
    giant = dataclasses.replace(rec, shape=(1, cols), rows=1, cols=cols, base_name=None,
                                kept=cols, row_kept=cols, frames=1, positions_bytes=0,
                                values_bytes=len(frames))
    table = np.array([[0, 0, len(frames), cols]], np.uint64)
    with pytest.raises(DiffError, match=f"a frame of {cols} values is larger than any real"):
        _open(giant, frames, table)
