"""The typed records of a diff: tensor records, the index, shard metadata.

Each record is a frozen dataclass with one parser, ``from_json``, which holds every check
of that record (types, ranges, consistency), and ``to_json``, which gives back the JSON
value the writer stores. Parsers raise :class:`DiffError` with the offending field in the
message; callers add the file (``exc.located(file=...)``). Unknown keys are ignored, as
docs/format.md requires of readers. The plan files of unfinished runs are in
:mod:`.plans`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .. import dtypes
from ..errors import DiffError
from . import spec


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value, what: str, *, optional=False) -> int | None:
    """A JSON integer in [0, 2**63), or None where ``optional``."""
    if value is None and optional:
        return None
    if not _is_int(value) or not 0 <= value <= spec.MAX_COUNT:
        raise DiffError(f"{what} {_short(value)} is not a count")
    return value


def _text(value, what: str, *, optional=False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise DiffError(f"{what} {_short(value)} is not a string")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise DiffError(f"{what} is missing or not a JSON object")
    return value


def is_shard_file_name(name) -> bool:
    """A plain ``*.kdiff`` file name: no folder part, nothing a path could climb with."""
    return (isinstance(name, str) and name.endswith(spec.SHARD_SUFFIX) and "/" not in name
            and "\\" not in name and name not in (".", "..") and "\x00" not in name)


@dataclass(frozen=True)
class TensorRecord:
    """What the diff holds for one fine-tune tensor (docs/format.md 3.2)."""

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

    @property
    def params(self) -> int:
        return self.rows * self.cols

    @property
    def selected(self) -> bool:
        return self.encoding in spec.SELECTED_ENCODINGS

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)

    def to_json(self) -> dict:
        return {"base_name": self.base_name, "encoding": self.encoding, "reason": self.reason,
                "dtype": self.dtype, "shape": list(self.shape), "rows": self.rows,
                "cols": self.cols, "k": self.k, "kept": self.kept, "row_kept": self.row_kept,
                "shard": self.shard, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, obj, shards=None) -> "TensorRecord":
        """Parse and check one record; ``shards`` (names) checks the shard it names."""
        rec = _object(obj, "record")
        enc = rec.get("encoding")
        if enc not in spec.ENCODINGS:
            raise DiffError(f"unknown encoding {_short(enc)}")
        code = rec.get("dtype")
        if not isinstance(code, str) or code not in dtypes.CODES:
            raise DiffError(f"unknown dtype {_short(code)}")
        shape = rec.get("shape")
        if not (isinstance(shape, list) and len(shape) <= 64
                and all(_is_int(d) and 0 <= d <= spec.MAX_COUNT for d in shape)):
            raise DiffError(f"shape {_short(shape)} is not a list of sizes")
        if math.prod(shape) * dtypes.itemsize(code) > spec.MAX_TENSOR_BYTES:
            raise DiffError(f"shape {shape} is impossibly large")
        rows, cols = spec.rows_cols(shape)
        if rec.get("rows") != rows or rec.get("cols") != cols or not _is_int(rec.get("rows")) \
                or not _is_int(rec.get("cols")):
            raise DiffError(f"rows/cols {_short(rec.get('rows'))}/{_short(rec.get('cols'))} "
                            f"do not match shape {shape}")
        kept = rec.get("kept")
        want = {"dense": rows * cols, "unchanged": 0}.get(enc)
        if not _is_int(kept) or not 0 <= kept <= rows * cols or (want is not None and kept != want):
            raise DiffError(f"kept {_short(kept)} is impossible for a {enc} {rows}x{cols} tensor")
        if enc in spec.SELECTED_ENCODINGS and kept < rows:
            # Every rule keeps k >= 1 values a row; this also bounds ``rows`` by bytes that
            # exist (the kept values), so no per-row array is sized by the record alone.
            raise DiffError(f"kept {kept} is fewer than one value a row for a selected "
                            f"{rows}x{cols} tensor")
        row_kept = rec.get("row_kept")
        if row_kept is not None and not (_is_int(row_kept) and 0 <= row_kept <= cols):
            raise DiffError(f"row_kept {_short(row_kept)} is not a count of columns")
        k = rec.get("k")
        if k is not None and not (_is_int(k) and 1 <= k <= spec.MAX_COUNT):
            raise DiffError(f"k {_short(k)} is not a whole number >= 1")
        nbytes = _count(rec.get("nbytes", 0), "nbytes")
        base_name = _text(rec.get("base_name"), "base_name", optional=True)
        if base_name is None and enc != "dense":
            raise DiffError(f"a {enc} tensor needs a base_name")
        shard = rec.get("shard")
        if enc != "unchanged" and shard is None:
            raise DiffError(f"a {enc} tensor needs a shard")
        if shard is not None and (not is_shard_file_name(shard)
                                  or (shards is not None and shard not in shards)):
            raise DiffError(f"names unknown shard {_short(shard)}")
        reason = _text(rec.get("reason"), "reason")
        return cls(base_name, enc, reason, code, tuple(shape), rows, cols, k, kept, row_kept,
                   shard, nbytes)


@dataclass(frozen=True)
class Identity:
    """Where an input came from, and a fingerprint of each of its weight files."""

    source: str | None
    kind: str | None
    repo_id: str | None
    revision: str | None
    files: dict

    def to_json(self) -> dict:
        return {"source": self.source, "kind": self.kind, "repo_id": self.repo_id,
                "revision": self.revision, "files": dict(self.files)}

    @classmethod
    def from_json(cls, obj, what: str = "identity") -> "Identity":
        obj = _object(obj, what)
        files = obj.get("files")
        if files is None:
            files = {}
        if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
            raise DiffError(f"{what}.files is not a map of file names to fingerprints")
        return cls(*(_text(obj.get(key), f"{what}.{key}", optional=True)
                     for key in ("source", "kind", "repo_id", "revision")), files)


@dataclass(frozen=True)
class Selection:
    """The selection settings a diff was made with, as recorded (not re-validated)."""

    method: str
    k: int | None
    keep: float | None
    ties: str
    include: str | None
    exclude: str | None
    seed: int

    def to_json(self) -> dict:
        return {"method": self.method, "k": self.k, "keep": self.keep, "ties": self.ties,
                "include": self.include, "exclude": self.exclude, "seed": self.seed}

    @classmethod
    def from_json(cls, obj) -> "Selection":
        obj = _object(obj, "selection")
        k = _count(obj.get("k"), "selection k", optional=True)
        keep = obj.get("keep")
        if keep is not None and not ((_is_int(keep) or isinstance(keep, float))
                                     and 0 < keep <= 1):
            raise DiffError(f"selection keep {_short(keep)} is not a fraction")
        seed = obj.get("seed", 0)
        if not _is_int(seed):
            raise DiffError(f"selection seed {_short(seed)} is not a whole number")
        return cls(_text(obj.get("method"), "selection method"), k, keep,
                   _text(obj.get("ties"), "selection ties"),
                   _text(obj.get("include"), "selection include", optional=True),
                   _text(obj.get("exclude"), "selection exclude", optional=True), seed)


@dataclass(frozen=True)
class ShardInfo:
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj, name: str) -> "ShardInfo":
        if not (isinstance(obj, dict) and _is_int(obj.get("size"))
                and 0 <= obj["size"] <= spec.MAX_COUNT and isinstance(obj.get("sha256"), str)):
            raise DiffError(f"shard {_short(name)} has no size and sha256")
        return cls(obj["size"], obj["sha256"])


TOTAL_KEYS = ("params", "selected", "kept", "reset", "finetuned_bytes", "diff_bytes")


@dataclass(frozen=True)
class Totals:
    params: int = 0
    selected: int = 0
    kept: int = 0
    reset: int = 0
    finetuned_bytes: int = 0
    diff_bytes: int = 0

    def to_json(self) -> dict:
        return {key: getattr(self, key) for key in TOTAL_KEYS}

    @classmethod
    def from_json(cls, obj) -> "Totals":
        obj = {} if obj is None else _object(obj, "totals")
        return cls(*(_count(obj.get(key, 0), f"totals {key}") for key in TOTAL_KEYS))


@dataclass(frozen=True)
class DiffIndex:
    """The index ``kenstream-diff.json`` (docs/format.md 3.1)."""

    format_version: int
    kenstream_version: str | None
    command: list | None
    selection: Selection
    shard_size: int | None
    base: Identity
    finetuned: Identity | None
    alignment: dict
    shards: dict
    tensors: dict
    totals: Totals

    def to_json(self) -> dict:
        return {
            "format": spec.FORMAT, "format_version": self.format_version, "complete": True,
            "kenstream_version": self.kenstream_version, "command": self.command,
            "selection": self.selection.to_json(), "shard_size": self.shard_size,
            "base": self.base.to_json(),
            "finetuned": None if self.finetuned is None else self.finetuned.to_json(),
            "alignment": self.alignment,
            "shards": {n: s.to_json() for n, s in self.shards.items()},
            "tensors": {n: r.to_json() for n, r in self.tensors.items()},
            "totals": self.totals.to_json(),
        }

    @classmethod
    def from_json(cls, obj) -> "DiffIndex":
        """Parse and check a whole index; O(number of tensors). Raises DiffError naming the
        tensor (``exc.tensor``) when one record is malformed."""
        if not isinstance(obj, dict) or obj.get("format") != spec.FORMAT:
            raise DiffError("is not a kenstream diff index")
        version = obj.get("format_version")
        if not _is_int(version) or version < 1:
            raise DiffError("format_version is missing or not a number")
        if version > spec.FORMAT_VERSION:
            raise DiffError(f"format version {version} is newer than this kenstream reads "
                            f"({spec.FORMAT_VERSION})", hint="upgrade kenstream")
        if obj.get("complete") is not True:
            raise DiffError("index is marked unfinished",
                            hint="finish it with kenstream compress ... --resume")
        for key in ("tensors", "shards"):
            _object(obj.get(key), f"index field {key!r}")
        command = obj.get("command")
        if command is not None and not (isinstance(command, list)
                                        and all(isinstance(a, str) for a in command)):
            raise DiffError("index field 'command' is not a list of strings")
        shards = {}
        for name, meta in obj["shards"].items():
            if not is_shard_file_name(name):
                raise DiffError(f"shard name {_short(name)} is not a plain kdiff file name")
            shards[name] = ShardInfo.from_json(meta, name)
        tensors = {}
        for name, rec in obj["tensors"].items():
            try:
                tensors[name] = TensorRecord.from_json(rec, shards)
            except DiffError as exc:
                raise DiffError(f"record is malformed: {exc.message}", tensor=name) from None
        alignment = obj.get("alignment")
        finetuned = obj.get("finetuned")
        return cls(version, _text(obj.get("kenstream_version"), "kenstream_version",
                                  optional=True),
                   command, Selection.from_json(obj.get("selection")),
                   _count(obj.get("shard_size"), "shard_size", optional=True),
                   Identity.from_json(obj.get("base"), "base"),
                   None if finetuned is None else Identity.from_json(finetuned, "finetuned"),
                   alignment if isinstance(alignment, dict) else {}, shards, tensors,
                   Totals.from_json(obj.get("totals")))


def shard_metadata(records: dict) -> dict:
    """The ``__metadata__`` of a diff shard holding ``records`` (name -> TensorRecord)."""
    return {"format": spec.FORMAT, "format_version": str(spec.FORMAT_VERSION),
            "records": json.dumps({n: r.to_json() for n, r in records.items()},
                                  sort_keys=True, separators=(",", ":"))}


def parse_shard_metadata(meta) -> dict:
    """name -> TensorRecord from a shard's ``__metadata__``; DiffError if it holds none."""
    if not isinstance(meta, dict) or meta.get("format") != spec.FORMAT:
        raise DiffError("is not a kenstream diff shard")
    try:
        raw = json.loads(meta["records"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raw = None
    if not isinstance(raw, dict):
        raise DiffError("shard metadata holds no tensor records")
    out = {}
    for name, rec in raw.items():
        try:
            out[name] = TensorRecord.from_json(rec)
        except DiffError as exc:
            raise DiffError(f"shard metadata record is malformed: {exc.message}",
                            tensor=name) from None
    return out
