"""Small JSON and text files kenstream reads and writes: indexes, plans, model cards.

Reads check that the path is a regular file of sane size before reading it (a FIFO or a
link to ``/dev/zero`` must not hang or fill memory) and refuse duplicate keys. Writes go
through a temporary name created exclusively, are fsynced, and are renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DiffError, OutputError
from ..format.spec import TEMP_SUFFIX
from .safefs import create_exclusive, read_regular

MAX_JSON_BYTES = 1 << 30
"""A JSON file larger than this is refused before it is read (real ones are a few MB)."""


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(f"the key {key!r} appears twice")
        seen[key] = value
    return seen


def read_json_file(path, what: str = "index", *, error=DiffError, hint=None,
                   limit: int = MAX_JSON_BYTES, pairs_hook=_no_duplicates):
    """The JSON value in ``path``, or ``error`` (one line naming the file) when it is not a
    regular file, larger than ``limit``, not UTF-8 JSON, or repeats a key (``pairs_hook``
    may raise its own error for that instead)."""
    raw = read_regular(path, limit, error=error, what=what, hint=hint)
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs_hook)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON ({exc})", file=path, hint=hint) from None


def read_plan(path):
    """A plan file kenstream wrote, or a one-line OutputError saying how to start again."""
    return read_json_file(path, "plan file", error=OutputError,
                          hint="delete the output directory and start again")


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON (sorted keys, two-space indent) to ``path`` through a temporary name,
    fsynced, then renamed."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` as :func:`write_bytes_atomic` does."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name that is removed on failure.

    The temporary file is created afresh (`create_exclusive`): a symbolic link planted at
    ``NAME.partial`` is replaced, never written through; so is one at ``path``, which the
    rename replaces as an entry of its folder."""
    path = Path(path)
    temp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        with create_exclusive(temp) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OutputError.from_os(exc, "write", file=path) from exc
