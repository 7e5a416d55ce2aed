"""Tensor records (docs/format.md 3.2 and 6.2) and the shard metadata that carries them.

:class:`TensorRecord` is a frozen dataclass with one parser, ``from_json``, which holds
every check of a record (types, ranges, consistency with its format version), and
``to_json``, which gives back the JSON the writer stores. Parsers raise
:class:`DiffError` with the offending field in the message; callers add the file
(``exc.located(file=...)``). Unknown keys are ignored, as readers must. The index is in
:mod:`.index`, the plan files of unfinished runs in :mod:`.plans`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .. import dtypes
from ..errors import DiffError
from . import spec
from .fields import count, is_int, is_shard_file_name, json_object, short, text

_V2_KEYS = ("frames", "positions_bytes", "values_bytes")


@dataclass(frozen=True)
class TensorRecord:
    """What the diff holds for one fine-tune tensor.

    ``version`` is the format version the record belongs to (not stored in the record);
    ``frames``, ``positions_bytes`` and ``values_bytes`` exist from version 2 on, and
    ``base_rows`` (stored only when set) for a tensor whose base has other rows (a resized
    vocabulary): rows from ``base_rows`` on have no base.
    """

    base_name: str | None
    encoding: str
    reason: str
    dtype: str
    shape: tuple
    rows: int
    cols: int
    k: int | None
    kept: int
    row_kept: int | None
    shard: str | None
    nbytes: int
    frames: int | None = None
    positions_bytes: int | None = None
    values_bytes: int | None = None
    base_rows: int | None = None
    base_digest: str | None = None
    """The digest of the base rows the tensor takes (16 hex digits, docs/format.md 6.7),
    where the writer recorded one."""
    version: int = 1

    @property
    def params(self) -> int:
        return self.rows * self.cols

    @property
    def selected(self) -> bool:
        """Whether a selection rule chose the kept positions (else stored whole or
        unchanged)."""
        return self.k is not None

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)

    def to_json(self) -> dict:
        out = {"base_name": self.base_name, "encoding": self.encoding, "reason": self.reason,
               "dtype": self.dtype, "shape": list(self.shape), "rows": self.rows,
               "cols": self.cols, "k": self.k, "kept": self.kept, "row_kept": self.row_kept,
               "shard": self.shard, "nbytes": self.nbytes}
        if self.version >= 2:
            out.update(frames=self.frames, positions_bytes=self.positions_bytes,
                       values_bytes=self.values_bytes)
            if self.base_rows is not None:
                out["base_rows"] = self.base_rows
            if self.base_digest is not None:
                out["base_digest"] = self.base_digest
        return out

    @property
    def with_base(self) -> int:
        """How many leading rows have a base (all but a resized tensor's new rows)."""
        if self.base_name is None:
            return 0
        return self.rows if self.base_rows is None else self.base_rows

    @classmethod
    def from_json(cls, obj, shards=None, version: int = 1) -> "TensorRecord":
        """Parse and check one record of format ``version``; ``shards`` (names) checks the
        shard it names."""
        rec = json_object(obj, "record")
        enc = rec.get("encoding")
        if enc not in spec.ENCODINGS[version]:
            raise DiffError(f"unknown encoding {short(enc)}")
        code = rec.get("dtype")
        if not isinstance(code, str) or code not in dtypes.CODES:
            raise DiffError(f"unknown dtype {short(code)}")
        shape = rec.get("shape")
        if not (isinstance(shape, list) and len(shape) <= 64
                and all(is_int(d) and 0 <= d <= spec.MAX_COUNT for d in shape)):
            raise DiffError(f"shape {short(shape)} is not a list of sizes")
        if math.prod(shape) * dtypes.itemsize(code) > spec.MAX_TENSOR_BYTES:
            raise DiffError(f"shape {shape} is impossibly large")
        rows, cols = rec.get("rows"), rec.get("cols")
        if not (is_int(rows) and is_int(cols) and spec.valid_rows(shape, rows, cols, version)):
            raise DiffError(f"rows/cols {short(rows)}/{short(cols)} do not match shape {shape}")
        kept = rec.get("kept")
        want = {"dense": rows * cols, "unchanged": 0}.get(enc)
        if not is_int(kept) or not 0 <= kept <= rows * cols or (want is not None and kept != want):
            raise DiffError(f"kept {short(kept)} is impossible for a {enc} {rows}x{cols} tensor")
        if enc in spec.SELECTED_ENCODINGS and kept < rows:
            # Every rule keeps k >= 1 values a row; this also bounds ``rows`` by bytes that
            # exist (the kept values), so no per-row array is sized by the record alone.
            raise DiffError(f"kept {kept} is fewer than one value a row for a selected "
                            f"{rows}x{cols} tensor")
        row_kept = rec.get("row_kept")
        if row_kept is not None and not (is_int(row_kept) and 0 <= row_kept <= cols):
            raise DiffError(f"row_kept {short(row_kept)} is not a count of columns")
        k = rec.get("k")
        if k is not None and not (is_int(k) and 1 <= k <= spec.MAX_COUNT):
            raise DiffError(f"k {short(k)} is not a whole number >= 1")
        nbytes = count(rec.get("nbytes", 0), "nbytes")
        base_name = text(rec.get("base_name"), "base_name", optional=True)
        if base_name is None and enc not in ("dense", "coded"):
            raise DiffError(f"a {enc} tensor needs a base_name")
        shard = rec.get("shard")
        if enc != "unchanged" and shard is None:
            raise DiffError(f"a {enc} tensor needs a shard")
        if shard is not None and (not is_shard_file_name(shard)
                                  or (shards is not None and shard not in shards)):
            raise DiffError(f"names unknown shard {short(shard)}")
        reason = text(rec.get("reason"), "reason")
        extra = _v2_fields(rec, enc, rows, nbytes) if version >= 2 else (None, None, None)
        base_rows = rec.get("base_rows") if version >= 2 else None
        if base_rows is not None and not (is_int(base_rows) and 0 <= base_rows <= rows
                                          and base_name is not None and enc == "coded"):
            raise DiffError(f"base_rows {short(base_rows)} is not a count of at most {rows} "
                            "rows of a coded tensor with a base")
        digest = rec.get("base_digest") if version >= 2 else None
        if digest is not None and not (is_digest(digest) and base_name is not None):
            raise DiffError(f"base_digest {short(digest)} is not 16 hex digits of a tensor "
                            "with a base")
        return cls(base_name, enc, reason, code, tuple(shape), rows, cols, k, kept, row_kept,
                   shard, nbytes, *extra, base_rows, digest, version=version)


def is_digest(value) -> bool:
    """Whether ``value`` is a digest as records store it: 16 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 16 and all(
        c in "0123456789abcdef" for c in value)


def digest_text(value: int) -> str:
    """A digest (`kernels.digest`) as records store it."""
    return f"{value:016x}"


def _v2_fields(rec: dict, enc: str, rows: int, nbytes: int) -> tuple:
    """(frames, positions_bytes, values_bytes) of a version-2 record, checked."""
    frames, pos, val = (count(rec.get(key), key, optional=True) for key in _V2_KEYS)
    if enc == "unchanged":
        if any(v not in (None, 0) for v in (frames, pos, val)) or nbytes:
            raise DiffError("an unchanged tensor stores no frames")
        return 0, 0, 0
    if frames is None or pos is None or val is None:
        raise DiffError("a coded tensor needs frames, positions_bytes and values_bytes")
    if not 1 <= frames <= max(rows, 1):
        raise DiffError(f"frames {frames} is impossible for {rows} rows")
    if pos + val + frames * spec.TABLE_ROW_BYTES != nbytes:
        raise DiffError("positions_bytes, values_bytes and the frame table do not add up "
                        "to nbytes")
    return frames, pos, val


def shard_metadata(records: dict, version: int = spec.FORMAT_VERSION) -> dict:
    """The ``__metadata__`` of a diff shard holding ``records`` (name -> TensorRecord)."""
    return {"format": spec.FORMAT, "format_version": str(version),
            "records": json.dumps({n: r.to_json() for n, r in records.items()},
                                  sort_keys=True, separators=(",", ":"))}


def parse_shard_metadata(meta) -> dict:
    """name -> TensorRecord from a shard's ``__metadata__``; DiffError if it holds none."""
    if not isinstance(meta, dict) or meta.get("format") != spec.FORMAT:
        raise DiffError("is not a kenstream diff shard")
    version = {str(v): v for v in spec.READ_VERSIONS}.get(meta.get("format_version"))
    if version is None:
        raise DiffError(f"shard format version {short(meta.get('format_version'))} is not one "
                        "this kenstream reads", hint="upgrade kenstream")
    try:
        raw = json.loads(meta["records"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raw = None
    if not isinstance(raw, dict):
        raise DiffError("shard metadata holds no tensor records")
    out = {}
    for name, rec in raw.items():
        try:
            out[name] = TensorRecord.from_json(rec, version=version)
        except DiffError as exc:
            raise DiffError(f"shard metadata record is malformed: {exc.message}",
                            tensor=name) from None
    return out
