"""The worked example of docs/format.md: its inputs, written byte for byte by hand, and
the literal blocks the document shows, read back from the document."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[2] / "docs" / "format.md"

BASE = {
    "w": np.array([[0.5, -0.25, 1.0, 2.0], [0.125, 0.75, -1.5, 3.0]], np.float32),
    "same": np.array([1.0, 2.0, 3.0], np.float32),
}
FINETUNED = {
    "w": np.array([[0.625, -0.25, 1.5, 2.25], [0.0, 1.0, -1.0, 3.5]], np.float32),
    "same": np.array([1.0, 2.0, 3.0], np.float32),
    "new": np.array([0.5, -0.5], np.float32),
}
K = 2


def write_safetensors(path: Path, tensors: dict) -> None:
    """A minimal safetensors writer (tensors in the order given, header padded with
    spaces to a multiple of 8), so the example's input bytes never depend on a library."""
    header, offset, data = {}, 0, b""
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def write_inputs(root: Path) -> None:
    write_safetensors(root / "base" / "model.safetensors", BASE)
    write_safetensors(root / "finetuned" / "model.safetensors", FINETUNED)


def doc_block(marker: str) -> str:
    """The fenced block that follows ``<!-- golden:MARKER -->`` in docs/format.md."""
    text = DOC.read_text()
    m = re.search(rf"<!-- golden:{re.escape(marker)} -->\s*```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"docs/format.md has no golden:{marker} block"
    return m.group(1)


def parse_hex(block: str) -> bytes:
    """Bytes of an ``xxd -a``-style dump: offset, colon, hex groups, then the text column;
    a line ``*`` repeats the line before it up to the next line's offset."""
    out = bytearray()
    last = b""
    repeat = False
    for line in block.splitlines():
        if not line.strip():
            continue
        if line.strip() == "*":
            repeat = True
            continue
        at, rest = line.split(":", 1)
        if repeat:
            while len(out) < int(at, 16):
                out += last
            repeat = False
        last = bytes.fromhex(rest[:40].replace(" ", ""))
        out += last
    return bytes(out)


def hex_dump(raw: bytes) -> str:
    """The ``xxd -a`` layout: 16 bytes a line in 8 groups, then printable ASCII; runs of
    identical lines shown once and then ``*``."""
    lines, previous, starred = [], None, False
    for at in range(0, len(raw), 16):
        chunk = raw[at:at + 16]
        if chunk == previous and at + 16 < len(raw):
            if not starred:
                lines.append("*")
                starred = True
            continue
        previous, starred = chunk, False
        groups = " ".join(chunk[i:i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        lines.append(f"{at:08x}: {groups:<39}  {text}")
    return "\n".join(lines) + "\n"
