"""A slow, independent reader of format-2 diffs, written from docs/format.md section 6.

Plain Python and NumPy over the bytes (with the ``zstandard`` library for the zstd
frames): no kenstream code. Tests use it to check what the fast readers and the writer
do, value by value.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import zstandard

FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
WIDTH = {"F64": 64, "I64": 64, "U64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16,
         "BF16": 16, "I16": 16, "U16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I8": 8, "U8": 8,
         "BOOL": 8}


def read_shard(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def entry(header: dict, data: bytes, name: str) -> bytes:
    begin, end = header[name]["data_offsets"]
    return data[begin:end]


def unzstd(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(blob)


def frames(diff: Path, tensor: str):
    """Yield (first row, last row + 1, positions bytes, values bytes, kept) per frame."""
    index = json.loads((Path(diff) / "kenstream-diff.json").read_text())
    rec = index["tensors"][tensor]
    header, data = read_shard(Path(diff) / rec["shard"])
    blob = entry(header, data, f"{tensor}::frames")
    table = np.frombuffer(entry(header, data, f"{tensor}::table"), "<u8").reshape(-1, 4)
    at = 0
    for i, (r0, npos, nval, kept) in enumerate(table.tolist()):
        r1 = table[i + 1, 0] if i + 1 < len(table) else rec["rows"]
        yield int(r0), int(r1), blob[at:at + npos], blob[at + npos:at + npos + nval], int(kept)
        at += npos + nval


def frame_mask(section: bytes, rows: int, cols: int) -> np.ndarray:
    """Bool [rows, cols] of a frame's positions section (section 6.3)."""
    if not section:
        return np.ones((rows, cols), bool)
    kind, payload = section[0], section[1:]
    if kind == 3:
        return np.zeros((rows, cols), bool)
    if kind == 1:
        packed = np.frombuffer(unzstd(payload), np.uint8).reshape(rows, (cols + 7) // 8)
        mask = np.zeros((rows, cols), bool)
        for r in range(rows):
            for j in range(cols):
                mask[r, j] = (packed[r, j // 8] >> (j % 8)) & 1
        return mask
    assert kind == 2
    gaps = np.frombuffer(unzstd(payload), "<u4")
    mask = np.zeros(rows * cols, bool)
    position = -1
    for i, g in enumerate(gaps.tolist()):
        position = g if i == 0 else position + g + 1
        mask[position] = True
    return mask.reshape(rows, cols)


def stored_mask(diff: Path, tensor: str) -> np.ndarray:
    """Bool [rows, cols]: the kept positions of ``tensor``, read frame by frame."""
    rec = json.loads((Path(diff) / "kenstream-diff.json").read_text())["tensors"][tensor]
    if rec["encoding"] == "unchanged":
        return np.zeros((rec["rows"], rec["cols"]), bool)
    return np.concatenate([frame_mask(pos, r1 - r0, rec["cols"])
                           for r0, r1, pos, _, _ in frames(diff, tensor)])


def _key(x: int, w: int, is_float: bool) -> int:
    sign = 1 << (w - 1)
    if is_float and x & sign:
        return ((1 << w) - 1) & ~(x & (sign - 1))
    return x


def _unkey(k: int, w: int, is_float: bool) -> int:
    sign = 1 << (w - 1)
    if is_float and k & sign:
        return (((1 << w) - 1) & ~k) | sign
    return k


def _context(p: int, w: int, centre: int) -> int:
    shift = w - 9 if w >= 16 else 3
    return min(7, max(0, ((p >> shift) & 255) - centre + 4))


def _scaled(b: int, scale: float) -> int:
    e = (b >> 23) & 255
    if not 2 <= e <= 253:
        return b
    x = np.array([b], np.uint32).view(np.float32)[0]
    return int(np.array([x * np.float32(scale)], np.float32).view(np.uint32)[0])


def frame_values(section: bytes, kept: int, code: str, base_kept: list[int]) -> list[int]:
    """The kept values (as unsigned ints) of a values section (section 6.4)."""
    w, is_float = WIDTH[code], code in FLOAT_CODES
    if kept == 0:
        return []
    if section[0] == 2:
        planes = section[1]
        sizes = struct.unpack_from(f"<{planes}I", section, 8)
        at, columns = 8 + 4 * planes, []
        for size in sizes:
            columns.append(unzstd(section[at:at + size]))
            at += size
        return [int.from_bytes(bytes(c[i] for c in columns), "little") for i in range(kept)]
    _, centre, _, scale, _, lnib, lesc, lraw = struct.unpack_from("<BBHfIIII", section)
    table = section[24:24 + 128]
    at = 24 + 128
    nibbles = unzstd(section[at:at + lnib])
    escapes = unzstd(section[at + lnib:at + lnib + lesc]) if lesc else b""
    raw = int.from_bytes(section[at + lnib + lesc:at + lnib + lesc + lraw], "little")
    out, used, bit = [], 0, 0
    for i in range(kept):
        p = base_kept[i]
        if code == "F32" and scale != 1.0:
            p = _scaled(p, scale)
        symbol = (nibbles[i // 2] >> (4 * (i % 2))) & 15
        if symbol == 15:
            length = escapes[used]
            used += 1
        else:
            length = table[_context(p, w, centre) * 16 + symbol]
        if length <= 1:
            z = length
        else:
            z = (1 << (length - 1)) | ((raw >> bit) & ((1 << (length - 1)) - 1))
            bit += length - 1
        d = (z >> 1) ^ (-(z & 1))
        out.append(_unkey((_key(p, w, is_float) + d) % (1 << w), w, is_float))
    return out


M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z = (z + GAMMA) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def base_digest(rows: np.ndarray, row0: int = 0) -> str:
    """The digest of 6.7 of ``rows`` ([n, cols], in the fine-tune's dtype), rows ``row0``
    on of their tensor, as a record stores it: word by word in plain Python."""
    n = rows.shape[0]
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1).tobytes()
    width = len(raw) // n if n else 0
    words = -(-width // 8)
    total = 0
    for r in range(n):
        row = raw[r * width:(r + 1) * width] + bytes(8 * words - width)
        for j in range(words):
            (word,) = struct.unpack_from("<Q", row, 8 * j)
            total += _mix64(word ^ (((row0 + r) * words + j) * GAMMA & M64))
    return f"{total & M64:016x}"
