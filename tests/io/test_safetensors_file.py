"""SafetensorsFile against files written by the safetensors library and hand-made bytes."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as torch_save_file

from kenstream import dtypes
from kenstream.errors import CheckpointError, CorruptFileError
from kenstream.io.safetensors_file import SafetensorsFile


def _numpy_tensors():
    rng = np.random.default_rng(7)
    return {
        "f64": rng.standard_normal((3, 2)),
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": rng.standard_normal((2, 3)).astype(np.float16),
        "i64": rng.integers(-2**62, 2**62, size=(5,), dtype=np.int64),
        "i32": rng.integers(-2**30, 2**30, size=(2, 2), dtype=np.int32),
        "i16": rng.integers(-2**14, 2**14, size=(3,), dtype=np.int16),
        "i8": rng.integers(-100, 100, size=(7,), dtype=np.int8),
        "u8": rng.integers(0, 255, size=(2, 2, 2), dtype=np.uint8),
        "u16": rng.integers(0, 2**16 - 1, size=(3,), dtype=np.uint16),
        "u32": rng.integers(0, 2**32 - 1, size=(3,), dtype=np.uint32),
        "u64": rng.integers(0, 2**63, size=(2,), dtype=np.uint64),
        "bool": rng.integers(0, 2, size=(9,)).astype(bool),
        "scalar": np.array(3.25, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _header(path):
    # Independent header parse: the layout, read with struct and json only.
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), 8 + n, raw


def test_numpy_written_file_reads_back_bit_for_bit(tmp_path):
    tensors = _numpy_tensors()
    path = tmp_path / "m.safetensors"
    np_save_file(tensors, str(path), metadata={"format": "np", "note": "x"})
    header, data_start, raw = _header(path)
    header.pop("__metadata__")
    by_offset = sorted(header, key=lambda k: tuple(header[k]["data_offsets"]))
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "np", "note": "x"}
        assert sorted(f.names()) == sorted(tensors)
        nonempty = [n for n in f.names() if header[n]["data_offsets"][0] != header[n]["data_offsets"][1]]
        assert nonempty == [n for n in by_offset if n in nonempty]
        for name, expected in tensors.items():
            got = f.array(name)
            info = f.info(name)
            assert got.dtype == expected.dtype
            assert got.shape == expected.shape == info.shape
            assert got.tobytes() == expected.tobytes()
            assert info.dtype == header[name]["dtype"]
            assert info.nbytes == expected.nbytes
            assert info.offset == data_start + header[name]["data_offsets"][0]
            assert raw[info.offset:info.offset + info.nbytes] == expected.tobytes()
            assert info.file == path


def test_torch_bf16_and_f8_read_as_exact_bits(tmp_path, io_helpers):
    gen = torch.Generator().manual_seed(3)
    state = {
        "bf": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "e4": (torch.randn(6, generator=gen) * 30).to(torch.float8_e4m3fn),
        "e5": (torch.randn(6, generator=gen) * 1000).to(torch.float8_e5m2),
        "f32": torch.randn(3, generator=gen),
    }
    path = tmp_path / "t.safetensors"
    torch_save_file(state, str(path))
    with SafetensorsFile(path) as f:
        assert f.info("bf").dtype == "BF16" and f.array("bf").dtype == np.uint16
        assert f.info("e4").dtype == "F8_E4M3" and f.array("e4").dtype == np.uint8
        assert f.info("e5").dtype == "F8_E5M2"
        for name, tensor in state.items():
            assert io_helpers.same_bits(f.array(name), tensor), name
            widened = dtypes.widen_to_f32(f.array(name), f.info(name).dtype)
            assert np.array_equal(widened, tensor.float().numpy())


def test_arrays_are_read_only_views_of_one_mapping(tmp_path):
    path = tmp_path / "m.safetensors"
    np_save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(path))
    f = SafetensorsFile(path)
    a, b = f.array("w"), f.array("w")
    assert not a.flags.writeable
    assert a.flags.c_contiguous
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    assert np.shares_memory(a, b)  # both views of the same mapped bytes, not copies
    f.close()
    assert a[2, 3] == 11.0  # a live view keeps the mapping after close
    with pytest.raises(CheckpointError, match="closed"):
        f.array("w")


def test_release_keeps_views_correct(tmp_path):
    rng = np.random.default_rng(5)
    tensors = {"a": rng.standard_normal((300, 50)).astype(np.float32),
               "b": rng.integers(0, 9, size=(1000,), dtype=np.int16)}
    path = tmp_path / "m.safetensors"
    np_save_file(tensors, str(path))
    with SafetensorsFile(path) as f:
        views = {n: f.array(n) for n in tensors}
        assert all(np.array_equal(views[n], tensors[n]) for n in tensors)
        for name in tensors:
            f.release(name)
        # Released pages are faulted in again from the file on the next read.
        assert all(np.array_equal(views[n], tensors[n]) for n in tensors)
        with pytest.raises(CheckpointError):
            f.release("nope")


def _resident_pages(f: SafetensorsFile) -> int:
    """Pages of ``f``'s mapping that are mapped into this process (Linux pagemap)."""
    buf = np.frombuffer(f._map, np.uint8)
    first = buf.ctypes.data // 4096
    count = (buf.ctypes.data + buf.size + 4095) // 4096 - first
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(first * 8)
        entries = np.frombuffer(fh.read(count * 8), np.uint64)
    return int(np.count_nonzero(entries >> np.uint64(63)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/pagemap")
def test_streaming_release_leaves_nothing_resident(tmp_path):
    # The compress loop's order: read block b, release it, then read block b+1. The first
    # read of b+1 maps cached pages around it ("fault-around"), the tail of b included
    # where the block boundary is not aligned; release must drop those too.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((96, 4096)).astype(np.float32)  # 16 KiB rows
    path = tmp_path / "m.safetensors"
    np_save_file({"a_small": np.arange(5, dtype=np.float32), "w": w}, str(path))
    row = 4096 * 4
    with SafetensorsFile(path) as f:
        assert f.info("w").offset % 4096 != 0  # blocks straddle pages
        view = f.array("w")
        for r0 in range(0, 96, 5):
            r1 = min(96, r0 + 5)
            assert np.array_equal(view[r0:r1], w[r0:r1])
            f.release("w", r0 * row, r1 * row)
        f.release("a_small")
        assert _resident_pages(f) == 0


def test_read_into_copies_the_tensor_bytes_and_names_a_file_cut_short(tmp_path):
    """Rebuild reads base rows with read_into (pread, no map); the bytes are the view's,
    a range outside the tensor is refused, and a file that shrank is one named error."""
    import os

    path = tmp_path / "m.safetensors"
    tensors = _numpy_tensors()
    np_save_file(tensors, str(path))
    with SafetensorsFile(path) as sf:
        for name in ("f32", "u16", "f64"):
            want = tensors[name].reshape(-1).view(np.uint8)
            out = np.empty(want.size - 3, np.uint8)
            sf.read_into(name, 3, out)
            assert np.array_equal(out, want[3:])
        with pytest.raises(ValueError):
            sf.read_into("f32", 8, np.empty(tensors["f32"].nbytes, np.uint8))
        with pytest.raises(ValueError):  # a copy of it would be written, not ``out``
            sf.read_into("f32", 0, np.empty((4, 4), np.uint8)[:, ::2])
        os.truncate(path, 8 + struct.unpack("<Q", path.read_bytes()[:8])[0])  # no data left
        with pytest.raises(CorruptFileError, match="shrank from") as err:
            sf.read_into("u64", 0, np.empty(16, np.uint8))
        assert str(path) in str(err.value)


def test_empty_file_and_empty_tensor(tmp_path, io_helpers):
    path = tmp_path / "e.safetensors"
    path.write_bytes(io_helpers.raw_safetensors({}))
    with SafetensorsFile(path) as f:
        assert f.names() == [] and f.metadata == {}
    path.write_bytes(io_helpers.raw_safetensors(
        {"z": {"dtype": "BF16", "shape": [3, 0], "data_offsets": [0, 0]}}))
    with SafetensorsFile(path) as f:
        arr = f.array("z")
        assert arr.shape == (3, 0) and arr.dtype == np.uint16 and not arr.flags.writeable


def test_gap_between_tensors_is_tolerated(tmp_path, io_helpers):
    a = np.array([1, 2], dtype=np.int32).tobytes()
    b = np.array([7], dtype=np.int16).tobytes()
    header = {"b": {"dtype": "I16", "shape": [1], "data_offsets": [12, 14]},
              "a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}
    path = tmp_path / "g.safetensors"
    path.write_bytes(io_helpers.raw_safetensors(header, a + b"\0" * 4 + b + b"\0\0"))
    with SafetensorsFile(path) as f:
        assert f.names() == ["a", "b"]  # file order, not header order
        assert f.array("a").tolist() == [1, 2] and f.array("b").tolist() == [7]


def test_unknown_tensor_and_missing_file(tmp_path, io_helpers):
    path = tmp_path / "m.safetensors"
    path.write_bytes(io_helpers.raw_safetensors({}))
    with SafetensorsFile(path) as f:
        with pytest.raises(CheckpointError, match="no such tensor"):
            f.info("nope")
    with pytest.raises(CheckpointError, match="not found"):
        SafetensorsFile(tmp_path / "absent.safetensors")


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

# (id, header or raw header bytes, data bytes, tensor named in the error, message fragment)
CORRUPT = [
    ("bad-utf8", b'{"w": \xff}', b"", None, "UTF-8"),
    ("bad-json", b'{"w": ', b"", None, "JSON"),
    ("not-object", b"[1, 2]", b"", None, "not an object"),
    ("dup-tensor", b'{"w": %s, "w": %s}' % ((json.dumps(F32x2).encode(),) * 2), b"\0" * 8, "w", "twice"),
    ("entry-not-object", {"w": [1, 2]}, b"", "w", "not a JSON object"),
    ("no-dtype", {"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "w", "'dtype'"),
    ("no-shape", {"w": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8, "w", "'shape'"),
    ("no-offsets", {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "w", "'data_offsets'"),
    ("dtype-not-str", {"w": {**F32x2, "dtype": 4}}, b"\0" * 8, "w", "not a string"),
    ("unknown-dtype", {"w": {**F32x2, "dtype": "C64"}}, b"\0" * 8, "w", "unsupported dtype"),
    ("shape-not-list", {"w": {**F32x2, "shape": 2}}, b"\0" * 8, "w", "not a list of integers"),
    ("shape-float", {"w": {**F32x2, "shape": [2.0]}}, b"\0" * 8, "w", "not a list of integers"),
    ("shape-bool", {"w": {**F32x2, "shape": [True, 2]}}, b"\0" * 8, "w", "not a list of integers"),
    ("shape-negative", {"w": {**F32x2, "shape": [-2]}}, b"\0" * 8, "w", "negative"),
    ("offsets-one", {"w": {**F32x2, "data_offsets": [0]}}, b"\0" * 8, "w", "pair of integers"),
    ("offsets-str", {"w": {**F32x2, "data_offsets": ["0", "8"]}}, b"\0" * 8, "w", "pair of integers"),
    ("offsets-bool", {"w": {**F32x2, "data_offsets": [False, 8]}}, b"\0" * 8, "w", "pair of integers"),
    ("offsets-reversed", {"w": {**F32x2, "data_offsets": [8, 0]}}, b"\0" * 8, "w", "begin <= end"),
    ("offsets-negative", {"w": {**F32x2, "data_offsets": [-8, 0]}}, b"\0" * 8, "w", "begin <= end"),
    ("size-mismatch", {"w": {**F32x2, "data_offsets": [0, 6]}}, b"\0" * 8, "w", "needs 8"),
    ("truncated", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 12, "w", "truncated"),
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "b", "overlaps"),
    ("metadata-not-dict", {"__metadata__": ["x"], "w": F32x2}, b"\0" * 8, None, "__metadata__"),
    ("metadata-int-value", {"__metadata__": {"k": 1}, "w": F32x2}, b"\0" * 8, None, "__metadata__"),
]


@pytest.mark.parametrize("header, data, tensor, fragment",
                         [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_header_is_named(tmp_path, io_helpers, header, data, tensor, fragment):
    path = tmp_path / "bad.safetensors"
    if isinstance(header, bytes):
        path.write_bytes(io_helpers.raw_safetensors(None, data, header_bytes=header))
    else:
        path.write_bytes(io_helpers.raw_safetensors(header, data))
    with pytest.raises(CorruptFileError) as caught:
        SafetensorsFile(path)
    err = caught.value
    assert err.file == str(path) and str(path) in str(err)
    assert err.tensor == tensor
    if tensor is not None:
        assert repr(tensor) in str(err)
    assert fragment in err.message
    assert "\n" not in str(err)


@pytest.mark.parametrize("raw, fragment", [
    (b"\x05\0\0", "only 3 bytes"),
    (struct.pack("<Q", 50) + b"{}", "exceeds"),
    (struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "absurd"),
], ids=["short", "header-past-end", "absurd-header"])
def test_corrupt_length_field(tmp_path, raw, fragment):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CorruptFileError, match=fragment) as caught:
        SafetensorsFile(path)
    assert caught.value.file == str(path)


def test_truncated_real_file(tmp_path):
    path = tmp_path / "m.safetensors"
    np_save_file({"a": np.ones(64, np.float32), "b": np.ones(64, np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="truncated") as caught:
        SafetensorsFile(path)
    assert caught.value.tensor in ("a", "b")


# -- the dtype table -------------------------------------------------------------------

def test_dtype_table_matches_torch():
    for code in dtypes.CODES:
        tdt = dtypes.torch_dtype(code)
        assert dtypes.from_torch(tdt) == code
        assert torch.empty(0, dtype=tdt).element_size() == dtypes.itemsize(code)
        assert dtypes.storage_dtype(code).itemsize == dtypes.itemsize(code)
        assert dtypes.is_float(code) == tdt.is_floating_point
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        dtypes.lookup("F4")
    with pytest.raises(CheckpointError, match="unsupported torch dtype"):
        dtypes.from_torch(torch.complex64)


@pytest.mark.parametrize("tdtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_widen_every_bit_pattern_matches_torch(tdtype):
    width = torch.empty(0, dtype=tdtype).element_size()
    if width == 1:
        bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    else:
        bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    expected = bits.view(tdtype).float().numpy()
    code = dtypes.from_torch(tdtype)
    got = dtypes.widen_to_f32(bits.numpy().view(dtypes.storage_dtype(code)), code)
    assert got.dtype == np.float32
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def test_widen_refuses_inexact_and_mismatched():
    with pytest.raises(CheckpointError):
        dtypes.widen_to_f32(np.zeros(2, np.float64), "F64")
    with pytest.raises(CheckpointError):
        dtypes.widen_to_f32(np.zeros(2, np.int32), "I32")
    with pytest.raises(ValueError):
        dtypes.widen_to_f32(np.zeros(2, np.float32), "BF16")
    x = np.arange(3, dtype=np.float32)
    assert dtypes.widen_to_f32(x, "F32") is x


def _torch_cast_bits(values64: np.ndarray, src: str, dst: str):
    """(src storage array, dst storage array) made by torch alone: the reference."""
    t_src = torch.from_numpy(values64).to(dtypes.torch_dtype(src))
    t_dst = t_src.to(dtypes.torch_dtype(dst))
    carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    src_bits = t_src.view(carrier[t_src.element_size()]).numpy().view(dtypes.storage_dtype(src))
    dst_bits = t_dst.view(carrier[t_dst.element_size()]).numpy().view(dtypes.storage_dtype(dst))
    return src_bits, dst_bits


@pytest.mark.parametrize("src", ["F64", "F32", "F16", "BF16"])
@pytest.mark.parametrize("dst", ["F64", "F32", "F16", "BF16", "F8_E4M3", "I32"])
def test_convert_matches_torch(src, dst):
    rng = np.random.default_rng(17)
    scale = np.exp2(rng.integers(-30, 20, 20000))
    # Exact float32 halfway points for bf16 and f16 exercise ties-to-even, and values a
    # hair above them exercise torch's double rounding of F64 through float32.
    bf_ties = ((np.arange(1, 4000, dtype=np.uint32) << 16) | 0x8000).view(np.float32)
    f16_ties = ((np.arange(1, 4000, dtype=np.uint32) << 13) | (1 << 12)).view(np.float32)
    values = np.concatenate([
        rng.standard_normal(20000) * scale, bf_ties, f16_ties, bf_ties * (1 + 1e-12),
        [np.inf, -np.inf, 0.0, -0.0, 1e300, -1e300, 65520.0, 3.5e38, 1e-50, np.nan]])
    if dst == "I32":
        values = np.clip(np.nan_to_num(values), -1e9, 1e9)
    src_bits, expected = _torch_cast_bits(values, src, dst)
    got = dtypes.convert(src_bits, src, dst)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if dtypes.is_float(dst):
        nan = np.isnan(dtypes.widen_to_f32(expected, dst) if dst != "F64" else expected)
        got_nan = np.isnan(dtypes.widen_to_f32(got, dst) if dst != "F64" else got)
        assert np.array_equal(nan, got_nan)
        # NaN bits are left out: torch writes different NaN bits on different code paths.
        assert np.array_equal(got[~nan].view(f"u{got.itemsize}"), expected[~nan].view(f"u{got.itemsize}"))
    else:
        assert np.array_equal(got, expected)
    if src == dst:
        assert got is src_bits


def test_to_torch_shares_or_copies():
    bits = np.array([0x3F80, 0xC040], dtype=np.uint16)
    tensor = dtypes.to_torch(bits, "BF16")
    assert tensor.dtype == torch.bfloat16 and tensor.tolist() == [1.0, -3.0]
    tensor[0] = 2.0
    assert bits[0] == 0x4000  # shared memory: the write shows through
    frozen = np.array([1, 2], dtype=np.uint64)
    frozen.flags.writeable = False
    copied = dtypes.to_torch(frozen, "U64")
    assert copied.dtype == torch.uint64 and copied.view(torch.int64).tolist() == [1, 2]
    with pytest.raises(ValueError):
        dtypes.to_torch(np.zeros(2, np.float32), "F16")
