"""Identity of weight files: a cheap sampled hash and a full streaming hash.

A diff records which base it was made from, and later checks that the base given to
rebuild is the same one. Hashing every byte of a 100 GB checkpoint takes minutes, so
the recorded identity is :func:`fingerprint`, which reads about 2 MiB per file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .safefs import open_regular

HEAD_BYTES = 1 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 16
CHUNK_BYTES = 1 << 20


def fingerprint(path) -> str:
    """``"sha256-sampled:<hex>"`` over the file's size, head and 16 evenly spaced samples.

    Hashed, in order: the size as 8 little-endian bytes; the first 1 MiB (which holds a
    safetensors header, hence every name, dtype, shape and offset); then 64 KiB at each
    of 16 offsets ``round_down(i * (size - 64 KiB) / 15)``, i = 0..15, so the first and
    last 64 KiB are always included. Files of at most 2 MiB are hashed whole after the
    size, so for them it is exact. Cost: at most ~2 MiB read, O(1) seeks.

    Detects: any change of size, of the header or of the first MiB, of the tail, of any
    byte inside a sample window. Does NOT detect: a change confined to bytes outside the
    windows, as a revision that retrains a few tensors, or a few weights edited in place,
    can make. Use :func:`sha256_file` where that matters; a diff's readers check the
    base's content by the records' digests (docs/format.md 6.7).
    """
    path = Path(path)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        digest = hashlib.sha256(size.to_bytes(8, "little"))
        if size <= HEAD_BYTES + SAMPLES * SAMPLE_BYTES:
            _feed(digest, f, size)
        else:
            digest.update(f.read(HEAD_BYTES))
            span = size - SAMPLE_BYTES
            for i in range(SAMPLES):
                f.seek(i * span // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return "sha256-sampled:" + digest.hexdigest()


def sha256_file(path) -> str:
    """Hex sha256 of every byte of ``path``, read in 1 MiB chunks (memory O(1 MiB)).

    Only a regular file is read, and only as many bytes as it had when opened: a FIFO or a
    device (``/dev/zero``) is refused rather than read forever."""
    return sized_sha256(path)[1]


def sized_sha256(path) -> tuple[int, str]:
    """(size, hex sha256) of ``path``, both of the one file opened (as `sha256_file`), so
    a file replaced between a stat and the read cannot pair one's size with another's
    hash."""
    digest = hashlib.sha256()
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        _feed(digest, f, size)
    return size, digest.hexdigest()


def _open(path):
    return os.fdopen(open_regular(path), "rb")


def _feed(digest, f, limit):
    remaining = limit
    while remaining is None or remaining > 0:
        want = CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining)
        chunk = f.read(want)
        if not chunk:
            break
        digest.update(chunk)
        if remaining is not None:
            remaining -= len(chunk)
