"""Names and numbers of the diff format (docs/format.md), defined once.

Pure functions and constants: file names, versions, entry names, how a tensor is cut
into rows and rows into blocks. Nothing here reads or writes.
"""

from __future__ import annotations

import math

FORMAT = "kenstream-diff"
FORMAT_VERSION = 2
"""The version this kenstream writes by default."""
READ_VERSIONS = (1, 2)
"""Every version this kenstream reads (and can write, on request)."""

INDEX_NAME = "kenstream-diff.json"
PARTIAL_NAME = "kenstream-diff.partial.json"
SHARD_SUFFIX = ".kdiff"
TEMP_SUFFIX = ".partial"
"""Every file is written as NAME + TEMP_SUFFIX and renamed when complete."""

ENCODINGS = {1: ("bitmask", "indices", "dense", "unchanged"), 2: ("coded", "unchanged")}
"""Encodings of a tensor record, by format version."""
SELECTED_ENCODINGS = ("bitmask", "indices")
"""Format 1's encodings of a selected tensor."""
ROLES = ("mask", "index", "counts", "values", "frames", "table")
"""Entry roles, the suffix after ``::`` in a shard entry name (format 1 uses the first
four, format 2 the last two)."""
TABLE_ROW_BYTES = 32
"""Bytes of one row of a format-2 frame table (four uint64)."""

MAX_TENSOR_BYTES = 1 << 62
"""No record may describe more bytes in one tensor (a guard against tampered shapes)."""

MAX_COUNT = (1 << 63) - 1
"""Counts and byte totals in an index must fit a signed 64-bit integer."""

DEFAULT_LEVEL = 1
"""Format 2's default zstd level."""
MIN_WRITE_LEVEL, MAX_WRITE_LEVEL = 1, 19
"""The zstd levels compress writes with (readers take any level zstd has: it does not
change how a frame decodes)."""
DEFAULT_FRAME_ELEMS = 1 << 20
"""Format 2 codes tensors in frames of about this many values (whole rows)."""

DEFAULT_BLOCK_ELEMS = 1 << 23
"""Tensors are worked through in row blocks of about this many parameters, so no
embedding-sized temporary (a boolean mask, a rebuilt tensor) is ever made whole."""


def shard_name(number: int, total: int) -> str:
    """File name of diff shard ``number`` (from 1) of ``total``."""
    return f"kendiff-{number:05d}-of-{total:05d}{SHARD_SUFFIX}"


def shard_names(count: int) -> list[str]:
    return [shard_name(i + 1, count) for i in range(count)]


def entry_name(tensor: str, role: str) -> str:
    """Shard entry name of ``role`` for ``tensor`` (``T::role``)."""
    return f"{tensor}::{role}"


def entry_owner(entry: str) -> str:
    """The tensor an entry name belongs to. Split at the last ``::``, since roles never
    hold one and tensor names may."""
    return entry.rsplit("::", 1)[0]


def rows_cols(shape) -> tuple[int, int]:
    """Rows and columns a tensor of ``shape`` is selected as (format.md 2.1).

    2-D and more: the first axis by the product of the others; 1-D: one row; 0-D: one
    row of one value.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def rows_cols_v2(name: str, shape) -> tuple[int, int]:
    """Rows and columns of a tensor in format 2 (format.md 6.1): a row is one output
    unit's weights.

    0-D, 1-D and 2-D tensors as in format 1. A tensor of three or more dimensions is a
    stack of matrices (fused experts ``[E, out, in]``: ``E * out`` rows of ``in``, the rows
    the unfused matrices would have), unless it is a convolution kernel
    ``[out, in, *kernel]`` (four or more dimensions, or ``conv`` in its name): then one row
    per output channel.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 2 or len(shape) >= 4 or "conv" in name.lower():
        return rows_cols(shape)
    return math.prod(shape[:-1]), shape[-1]


def valid_rows(shape, rows: int, cols: int, version: int) -> bool:
    """Whether a record's rows and columns are a split its version allows: format 1's
    rule exactly; in format 2, the tensor cut after one of its leading axes."""
    shape = tuple(int(d) for d in shape)
    if version == 1 or len(shape) <= 1:
        return (rows, cols) == rows_cols(shape)
    return any((rows, cols) == (math.prod(shape[:i]), math.prod(shape[i:]))
               for i in range(1, len(shape)))


def row_blocks(rows: int, cols: int, block_elems: int = DEFAULT_BLOCK_ELEMS):
    """(r0, r1) ranges of about ``block_elems`` parameters (at least one row each).

    Always yields at least one range: ``(0, 0)`` for a tensor without rows, and one range
    of every row for a tensor whose rows are empty (``cols == 0``: there are no parameters
    to split, and stepping through ``2**58`` empty rows would never end).
    """
    if cols == 0 or rows == 0:
        yield 0, rows
        return
    step = max(1, int(block_elems) // cols)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def frame_ranges(rows: int, cols: int, frame_elems: int, split: int | None = None) -> list:
    """(r0, r1) of each frame: whole rows, about ``frame_elems`` values each (one row at
    least); one frame of every row for a tensor without values (no rows, or empty rows:
    stepping through ``2**58`` empty rows would never end). With ``split`` (the rows that
    have a base, of a resized tensor), no frame straddles row ``split``: the frames of rows
    ``split ...`` follow those of ``0 ... split``, counted afresh."""
    if rows == 0 or cols == 0:
        return [(0, rows)]
    step = max(1, int(frame_elems) // cols)
    if split is not None and 0 <= split < rows:
        return ([(r0, min(split, r0 + step)) for r0 in range(0, split, step)]
                + [(r0, min(rows, r0 + step)) for r0 in range(split, rows, step)])
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
