"""A forger's tools for tests: edit a diff shard's header or records and re-sign the diff.

"Re-signed" means the index's shard sizes and sha256 are fixed up (and its records copied
from the shards), as anyone who can edit a diff folder can do: the integrity checks then
pass, and only the readers' own checks stand between the edit and a wrong model.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path


def read_header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def rewrite_header(path: Path, edit) -> None:
    """Call ``edit(header)`` on the parsed header of ``path`` and write it back into the
    same number of bytes (padded with spaces), so the data section does not move."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, "the edited header does not fit its reserved room"
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])


def edit_records(path: Path, edit) -> None:
    """Call ``edit(records)`` on the tensor records in shard ``path``'s metadata."""
    def change(header):
        meta = header["__metadata__"]
        records = json.loads(meta["records"])
        edit(records)
        meta["records"] = json.dumps(records, sort_keys=True, separators=(",", ":"))

    rewrite_header(path, change)


def resign(diff: Path) -> None:
    """Make the index agree with the shards again: sizes, sha256, and every record."""
    index_path = diff / "kenstream-diff.json"
    index = json.loads(index_path.read_text())
    for name in index["shards"]:
        raw = (diff / name).read_bytes()
        index["shards"][name] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        records = json.loads(read_header(diff / name)["__metadata__"]["records"])
        index["tensors"].update(records)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
