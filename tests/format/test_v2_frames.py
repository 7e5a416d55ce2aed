"""Format 2's frames against the document: the writer's bytes decode, with the independent
reader of tests/format/reference_v2.py, into the fine-tuned values; the codec kernels
match their definition; damaged or forged frames are refused in one line."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kenstream.errors import DiffError
from kenstream.format.v2 import FrameDecoder, encode_frame
from kenstream.kernels import codec
from tests.format import reference_v2

CODES = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "F64": np.float64,
         "I64": np.int64, "I32": np.int32, "U8": np.uint8, "F8_E4M3": np.uint8}


def pair(code, rng, rows=6, cols=40):
    """(fine-tune, base) of ``code`` in storage dtype: small changes, some values equal,
    and a few sign flips and extreme patterns."""
    dt = CODES[code]
    if code in ("F32", "F16", "F64"):
        base = (rng.standard_normal((rows, cols)) * 0.02).astype(dt)
        ft = (base.astype(np.float64) * 0.9999 + rng.standard_normal((rows, cols)) * 1e-4)
        ft = ft.astype(dt)
        ft[0, :3] = -base[0, :3]
        ft[1, 0] = np.finfo(dt).max
        ft[1, 1] = -0.0
    elif code == "BF16":
        base = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32)
                >> 16).astype(np.uint16)
        ft = (base.astype(np.int64) + rng.integers(-3, 4, (rows, cols))).astype(np.uint16)
        ft[0, 0] = 0x8000  # -0.0
    else:
        info = np.iinfo(dt)
        base = rng.integers(info.min, info.max, (rows, cols), dtype=dt, endpoint=True)
        ft = base.copy()
        ft[::2] = (ft[::2].astype(np.int64) + 1).astype(dt)
    ft[2] = base[2]  # a row equal to the base
    return np.ascontiguousarray(ft), np.ascontiguousarray(base)


def masks(rng, shape):
    yield None
    yield rng.random(shape) < 0.3
    yield rng.random(shape) < 0.02  # sparse: column gaps
    yield np.zeros(shape, bool)
    yield np.ones(shape, bool)


@pytest.mark.parametrize("code", sorted(CODES))
def test_frames_decode_with_the_reference_reader(code):
    rng = np.random.default_rng(len(code))
    ft, base = pair(code, rng)
    width = ft.itemsize
    for mask in masks(rng, ft.shape):
        for with_base in (True, False):
            if mask is not None and not with_base:
                continue  # a tensor without a base keeps every position (6.2)
            frame = encode_frame(ft, base if with_base else None, mask, code, level=3)
            positions = frame.data[:frame.positions]
            values = frame.data[frame.positions:]
            got_mask = reference_v2.frame_mask(positions, *ft.shape)
            want = np.ones(ft.shape, bool) if mask is None else mask
            assert np.array_equal(got_mask, want)
            bits = np.dtype(f"u{width}")
            base_kept = base.view(bits)[want].tolist() if with_base else []
            got = reference_v2.frame_values(values, frame.kept, code, base_kept)
            assert np.array_equal(np.array(got, dtype=np.uint64).astype(bits),
                                  ft.view(bits)[want]), (code, with_base)
            # and kenstream's own decoder agrees
            dec = FrameDecoder(frame.data, *ft.shape, code, frame.kept, frame.positions)
            packed, counts = dec.positions()
            assert counts.sum() == frame.kept
            fast = dec.values(base.view(bits)[want] if with_base else None)
            assert np.array_equal(fast.view(bits), ft.view(bits)[want])


def test_sparse_masks_use_column_gaps_and_dense_ones_the_bitmask():
    rng = np.random.default_rng(1)
    ft, base = pair("F32", rng, rows=8, cols=500)
    sparse = rng.random(ft.shape) < 0.005
    dense = rng.random(ft.shape) < 0.4
    assert encode_frame(ft, base, sparse, "F32").data[0] == 2
    assert encode_frame(ft, base, dense, "F32").data[0] == 1


def test_column_gaps_only_below_one_kept_position_in_32():
    """format.md 6: gaps are used only when fewer than one position in 32 is kept. A run
    of kept positions codes smaller as gaps (all 0) than as a bitmask; at exactly 1 in 32
    (128 of 8 x 512) the bitmask is written all the same; at 127 the gaps are."""
    rng = np.random.default_rng(2)
    ft, base = pair("F32", rng, rows=8, cols=512)
    for kept, kind in ((128, 1), (127, 2)):
        mask = np.zeros(ft.size, bool)
        mask[:kept] = True
        assert encode_frame(ft, base, mask.reshape(ft.shape), "F32").data[0] == kind, kept


def test_column_gaps_that_tie_with_the_bitmask_are_not_used():
    """Gaps are used only when they are smaller (format.md 6): 15 positions of a 4 x 256
    frame whose gaps code to exactly as many bytes as the bitmask section keep the
    bitmask."""
    import zstandard

    from kenstream.format.v2 import DEFAULT_LEVEL

    flat = np.array([13, 88, 114, 198, 236, 351, 453, 516, 533, 550, 566, 620, 735, 821, 829])
    gaps = np.diff(flat, prepend=0).astype("<u4")
    gaps[1:] -= 1
    tied = 1 + len(zstandard.ZstdCompressor(level=DEFAULT_LEVEL).compress(gaps.tobytes()))
    mask = np.zeros(4 * 256, bool)
    mask[flat] = True
    ft = np.arange(4 * 256, dtype=np.float32).reshape(4, 256)
    frame = encode_frame(ft, None, mask.reshape(4, 256), "F32")
    assert frame.data[0] == 1 and frame.positions == tied


def test_lengths_and_raw_bits_follow_the_definition():
    """encode_lengths against a plain-Python reading of docs/format.md 6.5, for every
    width, for counts that do and do not fill the writer's last 64-bit chunk, into a
    word buffer of the documented size holding garbage."""
    rng = np.random.default_rng(2)
    cases = (("BF16", 16, True), ("F16", 16, True), ("F32", 32, True), ("I32", 32, False),
             ("I64", 64, False), ("F64", 64, True), ("U8", 8, False), ("F8_E4M3", 8, True))
    for code, w, is_float in cases:
        for rows, cols in ((6, 40), (5, 37), (3, 3), (3, 2)):
            ft, base = pair(code, rng, rows=rows, cols=cols)
            bits = np.dtype(f"u{w // 8}")
            a, p = ft.view(bits).reshape(-1), base.view(bits).reshape(-1)
            lengths = np.empty(a.size, np.uint8)
            words = rng.integers(0, 2**63, a.size * (w - 1) // 64 + 1, dtype=np.uint64)
            total = codec.encode_lengths(a, p, w, is_float, lengths, words)
            stream, at = int.from_bytes(words.tobytes(), "little"), 0
            for i, (x, y) in enumerate(zip(a.tolist(), p.tolist())):
                d = (reference_v2._key(x, w, is_float) - reference_v2._key(y, w, is_float))
                d %= 1 << w
                d = d - (1 << w) if d >> (w - 1) else d
                z = 2 * d if d >= 0 else -2 * d - 1
                assert lengths[i] == z.bit_length(), (code, cols, i)
                if z.bit_length() > 1:
                    k = z.bit_length() - 1
                    assert (stream >> at) & ((1 << k) - 1) == z & ((1 << k) - 1), (code, i)
                    at += k
            assert total == at, (code, cols)
            # The bits of the last word past the stream are zero (a frame stores whole bytes).
            assert stream >> at & ((1 << (-at % 64)) - 1) == 0, (code, cols)


def test_raw_bits_decode_for_every_count_of_the_last_group():
    """decode_lengths against the values encoded, for every width and every count of the
    writer's last, shorter group, into an output holding junk (a freed array of the right
    values must not hide a value left undecoded)."""
    rng = np.random.default_rng(4)
    for code, w, is_float in (("F8_E4M3", 8, True), ("BF16", 16, True), ("F32", 32, True),
                              ("F64", 64, True), ("I64", 64, False)):
        for n in list(range(0, 19)) + [63, 64, 65, 257]:
            ft, base = pair(code, rng, rows=3, cols=40)
            bits = np.dtype(f"u{w // 8}")
            a = np.resize(ft.view(bits).reshape(-1), n)
            p = np.resize(base.view(bits).reshape(-1), n)
            lengths = np.empty(n, np.uint8)
            words = np.zeros(n * (w - 1) // 64 + 2, np.uint64)
            codec.encode_lengths(a, p, w, is_float, lengths, words)
            out = ~a  # every value wrong until decoded
            codec.decode_lengths(lengths, words, p, w, is_float, out)
            assert np.array_equal(out, a), (code, n)
    with pytest.raises(ValueError, match="uint64"):
        codec.encode_lengths(a, p, w, is_float, lengths, np.zeros(40, np.uint32))
    with pytest.raises(ValueError, match="uint64"):
        codec.decode_lengths(lengths, np.zeros(40, np.uint32), p, w, is_float, out)


def test_weight_decay_is_predicted_and_still_exact():
    """A float32 fine-tune whose untouched weights all shrank by one factor: the frame
    records that scale, codes smaller than without it, and decodes exactly."""
    rng = np.random.default_rng(3)
    base = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    ft = base * np.float32(1 - 1.2e-4)
    ft[:8] += (rng.standard_normal((8, 512)) * 1e-3).astype(np.float32)
    frame = encode_frame(ft, base, None, "F32")
    scale = np.frombuffer(frame.data, np.float32, 1, 4)[0]
    assert scale != 1.0 and abs(scale - (1 - 1.2e-4)) < 1e-5
    got = reference_v2.frame_values(frame.data, frame.kept, "F32",
                                    base.view(np.uint32).reshape(-1).tolist())
    assert np.array_equal(np.array(got, np.uint32), ft.view(np.uint32).reshape(-1))
    raw_bytes = struct.unpack_from("<BBHfIIII", frame.data)[7]
    assert raw_bytes < 0.5 * _unscaled_raw_bytes(ft, base)


def _unscaled_raw_bytes(ft, base) -> int:
    """Raw bits the same values would need against the unscaled base."""
    n = ft.size
    lengths = np.empty(n, np.uint8)
    words = np.zeros(n // 2 + 1, np.uint64)
    bits = codec.encode_lengths(ft.view(np.uint32).reshape(-1), base.view(np.uint32).reshape(-1),
                                32, True, lengths, words)
    return (bits + 7) // 8


# -- damaged frames -------------------------------------------------------------------------

def _frame(rng):
    ft, base = pair("BF16", rng, rows=16, cols=300)
    mask = rng.random(ft.shape) < 0.3
    return ft, base, mask, encode_frame(ft, base, mask, "BF16")


def _decode(frame_bytes, ft, base, mask, kept, positions):
    dec = FrameDecoder(frame_bytes, *ft.shape, "BF16", kept, positions)
    packed, _ = dec.positions()
    return dec.values(base[mask] if packed is not None else base.reshape(-1))


def test_every_damaged_byte_is_refused_or_harmless():
    """Each byte of a frame flipped in turn: the decoder raises DiffError or decodes the
    very same values (a flipped reserved or unused byte); never anything else."""
    rng = np.random.default_rng(4)
    ft, base, mask, frame = _frame(rng)
    want = ft[mask]
    for at in range(len(frame.data)):
        raw = bytearray(frame.data)
        raw[at] ^= 1 << (at % 8)
        try:
            got = _decode(bytes(raw), ft, base, mask, frame.kept, frame.positions)
        except DiffError:
            continue
        assert np.array_equal(got.view(np.uint16), want), at


def test_zstd_frames_must_declare_the_expected_size():
    """A positions payload that declares more bytes than the frame's mask is refused before
    anything of that size is allocated."""
    import zstandard

    rng = np.random.default_rng(5)
    ft, base, mask, frame = _frame(rng)
    huge = zstandard.ZstdCompressor().compress(b"\x00" * (1 << 20))
    forged = bytes([1]) + huge + frame.data[frame.positions:]
    with pytest.raises(DiffError, match=r"holds 1048576 bytes, \d+ expected"):
        _decode(forged, ft, base, mask, frame.kept, len(huge) + 1)


def test_a_wrong_base_fails_the_checksum_or_the_lengths():
    rng = np.random.default_rng(6)
    ft, base, mask, frame = _frame(rng)
    other = base.copy()
    other[mask] ^= np.uint16(1)
    with pytest.raises(DiffError, match="checksum|lengths|escapes|raw bits"):
        _decode(frame.data, ft, other, mask, frame.kept, frame.positions)


def test_a_mask_bit_past_the_row_end_is_refused():
    """Padding bits of a frame's mask MUST be 0 (6.6). One moved there from a real kept
    position leaves the bit count right, so the check on the padding must refuse it."""
    import zstandard

    rng = np.random.default_rng(8)
    ft, base, mask, frame = _frame(rng)
    rows, cols = ft.shape
    assert cols % 8 and frame.data[0] == 1  # 300 columns: 4 padding bits a row; a bitmask
    packed = np.packbits(mask, axis=1, bitorder="little")
    col = int(np.flatnonzero(mask[0])[0])
    packed[0, col // 8] ^= np.uint8(1 << (col % 8))
    packed[0, -1] |= np.uint8(0x80)
    positions = bytes([1]) + zstandard.ZstdCompressor().compress(packed.tobytes())
    forged = positions + frame.data[frame.positions:]
    dec = FrameDecoder(forged, rows, cols, "BF16", frame.kept, len(positions))
    with pytest.raises(DiffError, match="past the end of a row"):
        dec.positions()


@pytest.mark.parametrize("distinct", [17, 15])  # 17 lengths: some escape; 15: none do
def test_length_symbols_round_trip_and_refuse_what_no_writer_makes(distinct):
    """context_pack / context_unpack against docs/format.md 6.5: each value's symbol is the
    rank of its length in its context's table (or 15, its length in the escapes); the
    lengths come back; a symbol naming an unused rank, a length over the width, or
    escapes that do not match the symbols are refused (-1)."""
    rng = np.random.default_rng(distinct)
    w, n = 16, 4001
    p = rng.integers(0, 1 << 16, n).astype(np.uint16)  # predictions of every exponent
    lengths = rng.integers(0, distinct, n).astype(np.uint8)
    centre = codec.median_exponent(p, w)
    table = np.empty(codec.CONTEXTS * codec.RANKS, np.uint8)
    nibbles = np.empty((n + 1) // 2, np.uint8)
    escapes = np.empty(n, np.uint8)
    found = codec.context_pack(lengths, p, w, centre, table, nibbles, escapes)
    escapes = escapes[:found]
    symbols = np.stack([nibbles & 15, nibbles >> 4], axis=1).reshape(-1)[:n]
    contexts = np.clip(((p.astype(np.int64) >> 7) & 255) - centre + 4, 0, codec.CONTEXTS - 1)
    named = symbols != codec.ESCAPE
    assert found == n - named.sum() and (found > 0) == (distinct > 15)
    assert np.array_equal(table[contexts[named] * codec.RANKS + symbols[named]], lengths[named])
    assert np.array_equal(escapes, lengths[~named])
    got = np.empty(n, np.uint8)
    assert codec.context_unpack(nibbles, escapes, table, p, w, centre, got) == found
    assert np.array_equal(got, lengths)

    first = int(np.flatnonzero(named)[0])
    slot = contexts[first] * codec.RANKS + symbols[first]
    for bad in (codec.UNUSED, w + 1):
        forged = table.copy()
        forged[slot] = bad
        assert codec.context_unpack(nibbles, escapes, forged, p, w, centre, got) == -1, bad
    extra = np.append(escapes, np.uint8(3))
    assert codec.context_unpack(nibbles, extra, table, p, w, centre, got) == -1
    if found:
        too_long = escapes.copy()
        too_long[0] = w + 1
        assert codec.context_unpack(nibbles, too_long, table, p, w, centre, got) == -1
