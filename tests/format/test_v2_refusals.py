"""FrameDecoder's refusals, one forged frame each: every length and count of a frame is
checked before it is used, so a forged frame raises DiffError in one line (never an
IndexError, a struct.error, an allocation of what a record claims, or a quietly accepted
frame). The frames are forged by hand from docs/format.md 6, not by the code under test."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard

from kenstream.errors import DiffError
from kenstream.format.v2 import FrameDecoder, encode_frame
from tests.format.test_v2_frames import pair

ROWS, COLS = 6, 40
PLANES_HEAD = 8  # kind, planes, reserved, crc32 (6.4)
DELTA_HEAD = 24  # kind, centre, reserved, scale, crc32, three byte counts (6.5)


def _planes_frame():
    """(fine-tune, BF16 frame of every position, no base: two byte planes, no positions)."""
    ft, _ = pair("BF16", np.random.default_rng(11), ROWS, COLS)
    frame = encode_frame(ft, None, None, "BF16")
    assert frame.positions == 0 and frame.data[0] == 2 and frame.data[1] == 2
    return ft, frame.data


def _plane_sizes(data):
    return list(struct.unpack_from("<2I", data, PLANES_HEAD))


def _with_plane0(data, plane0: bytes) -> bytes:
    """The planes frame ``data`` with its first plane's zstd bytes replaced."""
    sizes = _plane_sizes(data)
    at = PLANES_HEAD + 8
    rest = data[at + sizes[0]:]
    return data[:PLANES_HEAD] + struct.pack("<2I", len(plane0), sizes[1]) + plane0 + rest


def _values(data, kept=ROWS * COLS, positions=0, base_kept=None):
    dec = FrameDecoder(data, ROWS, COLS, "BF16", kept, positions)
    dec.positions()
    return dec.values(base_kept)


def test_the_planes_frame_decodes_as_forged_here():
    """The forging helpers are right: the untouched frame decodes to the fine-tune."""
    ft, data = _planes_frame()
    sizes = _plane_sizes(data)
    plane0 = data[PLANES_HEAD + 8:PLANES_HEAD + 8 + sizes[0]]
    assert np.array_equal(_values(_with_plane0(data, plane0)).view(np.uint16), ft.reshape(-1))


def test_bytes_after_a_zstd_frame_are_refused():
    """A zstd section must end where its length says: a byte appended to a byte plane's
    section is refused, though the values it decodes to are right."""
    _, data = _planes_frame()
    sizes = _plane_sizes(data)
    plane0 = data[PLANES_HEAD + 8:PLANES_HEAD + 8 + sizes[0]]
    with pytest.raises(DiffError, match="does not end where its length says"):
        _values(_with_plane0(data, plane0 + b"\x00"))


def test_a_cut_zstd_frame_is_refused():
    """A byte plane's zstd section cut short (the plane lengths adjusted to match) decodes
    to fewer bytes than the frame keeps: refused, not a numpy broadcast error."""
    _, data = _planes_frame()
    sizes = _plane_sizes(data)
    plane0 = data[PLANES_HEAD + 8:PLANES_HEAD + 8 + sizes[0]]
    with pytest.raises(DiffError, match="does not end where its length says|damaged"):
        _values(_with_plane0(data, plane0[:-1]))


def test_a_kept_count_over_the_frame_is_refused_before_any_decode():
    """kept is checked against rows x cols when the decoder is made: the values step
    would allocate kept x width bytes before any zstd frame is read."""
    _, data = _planes_frame()
    with pytest.raises(DiffError, match=f"keeps {1 << 40} of {ROWS * COLS} positions"):
        dec = FrameDecoder(data, ROWS, COLS, "BF16", 1 << 40, 0)
        dec.values(None)


def test_no_positions_means_every_position_is_kept():
    _, data = _planes_frame()
    dec = FrameDecoder(data, ROWS, COLS, "BF16", ROWS * COLS - 1, 0)
    with pytest.raises(DiffError, match="stores no positions but does not keep every one"):
        dec.positions()


def test_column_gaps_past_the_frame_are_refused():
    """One kept position, its gap naming position rows x cols (one past the last)."""
    gaps = np.array([ROWS * COLS], "<u4")
    positions = bytes([2]) + zstandard.ZstdCompressor().compress(gaps.tobytes())
    dec = FrameDecoder(positions, ROWS, COLS, "BF16", 1, len(positions))
    with pytest.raises(DiffError, match="column gaps run past the frame"):
        dec.positions()


def test_a_frame_that_keeps_nothing_stores_no_values():
    data = bytes([3]) + b"\x02\x02"  # positions: none kept; then two stray value bytes
    dec = FrameDecoder(data, ROWS, COLS, "BF16", 0, 1)
    packed, counts = dec.positions()
    assert not packed.any() and not counts.any()
    with pytest.raises(DiffError, match="keeps nothing but stores values"):
        dec.values(None)


def test_a_frame_that_keeps_values_must_store_them():
    with pytest.raises(DiffError, match="stores no values"):
        _values(b"")


def test_a_planes_header_cut_short_is_refused():
    _, data = _planes_frame()
    with pytest.raises(DiffError, match="planes header does not fit the dtype"):
        _values(data[:PLANES_HEAD + 4])  # one plane length of two


def _delta_frame():
    ft, base = pair("BF16", np.random.default_rng(12), ROWS, COLS)
    frame = encode_frame(ft, base, None, "BF16")
    assert frame.positions == 0 and frame.data[0] == 1
    return ft, base, frame.data


def test_a_delta_header_cut_short_is_refused():
    _, base, data = _delta_frame()
    for cut in (DELTA_HEAD - 4, DELTA_HEAD + 16):  # in the header; in the rank table
        with pytest.raises(DiffError, match="values header is cut short"):
            _values(data[:cut], base_kept=base.reshape(-1))


def test_a_delta_frame_needs_the_base_at_every_kept_position():
    """Delta values are coded against the base: without it, or with the base of fewer
    positions than the frame keeps, the frame is refused (the kernels index the base by
    kept position and check no bounds)."""
    ft, base, data = _delta_frame()
    assert np.array_equal(_values(data, base_kept=base.reshape(-1)).view(np.uint16),
                          ft.reshape(-1))
    for given in (None, base.reshape(-1)[:-1]):
        with pytest.raises(DiffError, match="against a base that is not given"):
            _values(data, base_kept=given)


def test_a_mask_of_more_bits_than_the_kept_count_is_refused():
    """A bitmask with one bit more than the table row's kept count (all inside the rows):
    decoding it would place kept + 1 positions from kept values."""
    ft, base = pair("BF16", np.random.default_rng(13), ROWS, COLS)
    mask = np.zeros(ft.shape, bool)
    mask[:, ::3] = True
    frame = encode_frame(ft, base, mask, "BF16")
    assert frame.data[0] == 1  # a bitmask
    more = mask.copy()
    more[0, 1] = True
    packed = np.packbits(more, axis=1, bitorder="little")
    positions = bytes([1]) + zstandard.ZstdCompressor().compress(packed.tobytes())
    forged = positions + frame.data[frame.positions:]
    dec = FrameDecoder(forged, ROWS, COLS, "BF16", frame.kept, len(positions))
    with pytest.raises(DiffError, match="bit count does not match its kept count"):
        dec.positions()


def test_delta_values_must_end_where_their_lengths_say():
    """One zero byte appended to a delta frame's values: the three byte counts of its
    header no longer add up to the section, so it is refused (the values would decode)."""
    _, base, data = _delta_frame()
    with pytest.raises(DiffError, match="frame values lengths do not add up"):
        _values(data + b"\x00", base_kept=base.reshape(-1))


def _with_scale(data: bytes, scale: float) -> bytes:
    return data[:4] + struct.pack("<f", scale) + data[8:]


def test_a_scale_is_refused_outside_its_range_and_for_other_dtypes():
    """Only F32 frames carry a scale, from 0.5 to 2 (6.5): a forged one elsewhere is
    refused before the base is scaled, not left for the checksum to catch."""
    rng = np.random.default_rng(14)
    base = (rng.standard_normal((ROWS, COLS)) * 0.02).astype(np.float32)
    ft = base * np.float32(0.98)
    frame = encode_frame(ft, base, None, "F32")
    assert struct.unpack_from("<f", frame.data, 4)[0] != 1.0
    dec = FrameDecoder(frame.data, ROWS, COLS, "F32", frame.kept, 0)
    assert np.array_equal(dec.values(base.reshape(-1).view(np.uint32)),
                          ft.reshape(-1).view(np.uint32))
    for scale in (4.0, 0.25, float("nan")):
        dec = FrameDecoder(_with_scale(frame.data, scale), ROWS, COLS, "F32", frame.kept, 0)
        with pytest.raises(DiffError, match="frame scale .* is not allowed for F32"):
            dec.values(base.reshape(-1).view(np.uint32))
    _, bf_base, bf = _delta_frame()
    with pytest.raises(DiffError, match="frame scale 1.5 is not allowed for BF16"):
        _values(_with_scale(bf, 1.5), base_kept=bf_base.reshape(-1))


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_scale_at_either_end_of_its_range_is_read(factor):
    """6.5: ``s`` is in [0.5, 2], both ends included. A fine-tune of exactly half or
    twice its base is written with that scale, and read back bit for bit."""
    rng = np.random.default_rng(15)
    base = (rng.standard_normal((ROWS, COLS)) * 0.02).astype(np.float32)
    ft = base * np.float32(factor)
    frame = encode_frame(ft, base, None, "F32")
    assert struct.unpack_from("<f", frame.data, 4)[0] == factor
    dec = FrameDecoder(frame.data, ROWS, COLS, "F32", frame.kept, 0)
    assert np.array_equal(dec.values(base.reshape(-1).view(np.uint32)),
                          ft.reshape(-1).view(np.uint32))


def _nibbles(data: bytes):
    """(start, zstd bytes, decoded lengths symbols) of a delta frame's nibbles section."""
    lnib = struct.unpack_from("<I", data, 12)[0]
    at = DELTA_HEAD + 128  # the rank table: CONTEXTS x RANKS bytes
    raw = zstandard.ZstdDecompressor().decompress(data[at:at + lnib])
    return at, lnib, bytearray(raw)


def _with_nibbles(data: bytes, nibbles: bytes) -> bytes:
    at, lnib, _ = _nibbles(data)
    z = zstandard.ZstdCompressor().compress(bytes(nibbles))
    head = data[:12] + struct.pack("<I", len(z)) + data[16:at]
    return head + z + data[at + lnib:]


def test_a_symbol_past_the_last_value_is_refused():
    """An odd count of values leaves the high half of the last nibble byte unused: it
    MUST be 0."""
    ft, base = pair("BF16", np.random.default_rng(15), 3, 7)  # 21 values
    frame = encode_frame(ft, base, None, "BF16")
    at, lnib, nib = _nibbles(frame.data)
    assert len(nib) == 11 and nib[-1] >> 4 == 0
    rows, cols = ft.shape
    same = _with_nibbles(frame.data, nib)  # re-coded alike: still decodes
    dec = FrameDecoder(same, rows, cols, "BF16", frame.kept, 0)
    assert np.array_equal(dec.values(base.reshape(-1)), ft.reshape(-1))
    nib[-1] |= 0x10
    dec = FrameDecoder(_with_nibbles(frame.data, nib), rows, cols, "BF16", frame.kept, 0)
    with pytest.raises(DiffError, match="symbol past the last value"):
        dec.values(base.reshape(-1))


def test_a_rank_table_naming_no_length_is_refused():
    """Every rank of the table marked unused (255): the symbols name nothing."""
    _, base, data = _delta_frame()
    forged = data[:DELTA_HEAD] + bytes([255]) * 128 + data[DELTA_HEAD + 128:]
    with pytest.raises(DiffError, match="unused ranks"):
        _values(forged, base_kept=base.reshape(-1))


def test_planes_must_end_where_their_lengths_say():
    _, data = _planes_frame()
    with pytest.raises(DiffError, match="frame planes lengths do not add up"):
        _values(data + b"\x00")
