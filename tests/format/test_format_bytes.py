"""The bytes of a format-1 diff shard are what docs/format.md predicts, for a tiny case.

The prediction is assembled here from the document's rules (bit order, entry order,
index widths, header padding) and the slow twin of the KEN rule; nothing is read back
through kenstream's own reader.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import kenstream
from tests.ckpt import save_dir
from tests.slow_ken import ken_mask


def predicted_mask_bytes(mask: np.ndarray) -> bytes:
    rows, cols = mask.shape
    out = bytearray()
    for r in range(rows):
        row = bytearray((cols + 7) // 8)
        for j in range(cols):
            if mask[r, j]:
                row[j // 8] |= 1 << (j % 8)
        out += row
    return bytes(out)


def test_shard_bytes_match_the_document(tmp_path):
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(3, 10, generator=g), "big": torch.randn(2, 200, generator=g),
            "same": torch.ones(4)}
    ft = {"w": base["w"] + 0.01 * torch.randn(3, 10, generator=g),
          "big": base["big"] + 0.01 * torch.randn(2, 200, generator=g),
          "same": torch.ones(4)}
    b = save_dir(tmp_path / "b", base)
    f = save_dir(tmp_path / "f", ft)
    kenstream.compress(b, f, tmp_path / "d", k=3, quiet=True, format_version=1)

    shards = sorted((tmp_path / "d").glob("kendiff-*.kdiff"))
    assert [p.name for p in shards] == ["kendiff-00001-of-00001.kdiff"]
    raw = shards[0].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    head_text = raw[8:8 + n]
    stripped = head_text.rstrip(b" ")
    assert set(head_text[len(stripped):]) <= {0x20}
    header = json.loads(stripped)
    meta = header.pop("__metadata__")
    assert meta["format"] == "kenstream-diff" and meta["format_version"] == "1"
    records = json.loads(meta["records"])
    assert records["same"]["encoding"] == "unchanged"

    mask_w = np.stack([ken_mask(row, 3) for row in ft["w"].numpy()])
    mask_big = np.stack([ken_mask(row, 3) for row in ft["big"].numpy()])
    # 3 x 10 at k=3: bitmask 3*2 + 9*4 = 42 bytes < indices 9*(2+4) = 54 bytes.
    # 2 x 200 at k=3: bitmask 2*25 + 6*4 = 74 bytes > indices 6*(2+4) = 36 bytes.
    cols_big = np.nonzero(mask_big)[1].astype("<u2").tobytes()
    expected = [
        ("w::mask", "U8", [3, 2], predicted_mask_bytes(mask_w)),
        ("w::values", "F32", [9], ft["w"].numpy()[mask_w].astype("<f4").tobytes()),
        ("big::index", "U16", [6], cols_big),
        ("big::values", "F32", [6], ft["big"].numpy()[mask_big].astype("<f4").tobytes()),
    ]
    data = raw[8 + n:]
    offset = 0
    ordered = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    keys = [k for k, _ in ordered]
    assert sorted(keys) == sorted(e[0] for e in expected)
    # within a tensor, entries come in the document's order
    assert keys.index("w::values") + 1 == keys.index("w::mask")
    assert keys.index("big::values") + 1 == keys.index("big::index")
    by_name = {e[0]: e for e in expected}
    for key, entry in ordered:
        name, dtype, shape, payload = by_name[key]
        assert entry["dtype"] == dtype and entry["shape"] == shape, name
        assert entry["data_offsets"] == [offset, offset + len(payload)], name
        assert data[offset:offset + len(payload)] == payload, name
        offset += len(payload)
    assert offset == len(data)  # the data section ends the file, no gaps
    assert records["w"]["encoding"] == "bitmask" and records["big"]["encoding"] == "indices"
    assert records["big"]["row_kept"] == 3 and records["w"]["kept"] == 9

    index = json.loads((tmp_path / "d" / "kenstream-diff.json").read_text())
    import hashlib

    assert index["shards"][shards[0].name] == {"size": len(raw),
                                               "sha256": hashlib.sha256(raw).hexdigest()}


def test_diff_within_two_percent_of_raw_encoding(tmp_path):
    """Shard bytes stay within 2% of the smaller encoding's raw size, summed over tensors."""
    g = torch.Generator().manual_seed(1)
    base = {f"layer.{i}.w": torch.randn(256, 2048, generator=g).to(torch.bfloat16) for i in range(4)}
    ft = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(torch.bfloat16)
          for n, t in base.items()}
    b = save_dir(tmp_path / "b", base)
    f = save_dir(tmp_path / "f", ft)
    for keep, ties in ((0.5, "positions"), (0.03, "positions"), (0.25, "values")):
        out = tmp_path / f"d{keep}{ties}"
        index = kenstream.compress(b, f, out, keep=keep, ties=ties, quiet=True,
                                   format_version=1)
        raw = 0
        for rec in index["tensors"].values():
            rows, cols, kept = rec["rows"], rec["cols"], rec["kept"]
            vary = rec["row_kept"] is None
            bitmask = rows * ((cols + 7) // 8) + kept * 2
            indices = kept * (2 + 2) + (rows * 2 if vary else 0)
            raw += min(bitmask, indices)
        diff_bytes = sum(p.stat().st_size for p in out.glob("*.kdiff"))
        assert raw <= diff_bytes <= 1.02 * raw, (keep, ties, diff_bytes, raw)


def test_a_mask_bit_past_the_row_end_is_refused(tmp_path):
    """A re-signed v1 diff whose mask moves a row's bit into the padding past ``cols``:
    the bit count still matches, so only the padding check stands between it and a row
    rebuilt with its values shifted."""
    from kenstream.errors import DiffError
    from tests.forge import read_header, resign

    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(3, 10, generator=g)}
    ft = {"w": base["w"] + 0.01 * torch.randn(3, 10, generator=g)}
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    diff = tmp_path / "d"
    kenstream.compress(b, f, diff, k=3, quiet=True, format_version=1)
    shard = next(diff.glob("kendiff-*.kdiff"))
    header = read_header(shard)
    start = 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]
    raw = bytearray(shard.read_bytes())
    at = start + header["w::mask"]["data_offsets"][0]  # row 0: bytes at, at + 1
    row = int.from_bytes(raw[at:at + 2], "little")
    assert row and row < 1 << 10
    row &= row - 1  # one kept column fewer ...
    row |= 1 << 15  # ... and a bit past column 9
    raw[at:at + 2] = row.to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    resign(diff)
    with pytest.raises(DiffError, match="mask has bits set past the end of a row"):
        kenstream.rebuild(b, diff, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "model.safetensors").exists()
