"""The typed records of a diff's index ``kenstream-diff.json``.

Each is a frozen dataclass with one parser, ``from_json`` (every check of that record),
and ``to_json``. Parsers raise :class:`DiffError`; callers add the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DiffError
from . import spec
from .fields import count, is_int, is_shard_file_name, json_object, short, text
from .records import TensorRecord


@dataclass(frozen=True)
class Identity:
    """Where an input came from, and a fingerprint of each of its weight files."""

    source: str | None
    kind: str | None
    repo_id: str | None
    revision: str | None
    files: dict

    @property
    def named(self) -> str:
        """The input as people name it: ``org/name@revision`` for the hub, else its source."""
        if self.kind == "hub" and self.repo_id:
            return self.repo_id + (f"@{self.revision}" if self.revision else "")
        return self.source or "(unrecorded)"

    def to_json(self) -> dict:
        return {"source": self.source, "kind": self.kind, "repo_id": self.repo_id,
                "revision": self.revision, "files": dict(self.files)}

    @classmethod
    def from_json(cls, obj, what: str = "identity") -> "Identity":
        obj = json_object(obj, what)
        files = obj.get("files")
        if files is None:
            files = {}
        if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
            raise DiffError(f"{what}.files is not a map of file names to fingerprints")
        return cls(*(text(obj.get(key), f"{what}.{key}", optional=True)
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
    budget: str = "row"
    """How the keep was shared (``row``, ``tensor``, ``global``); absent before budgets
    existed, which is ``row``."""

    def to_json(self) -> dict:
        out = {"method": self.method, "k": self.k, "keep": self.keep, "ties": self.ties,
               "include": self.include, "exclude": self.exclude, "seed": self.seed}
        if self.budget != "row":
            out["budget"] = self.budget
        return out

    @classmethod
    def from_json(cls, obj) -> "Selection":
        obj = json_object(obj, "selection")
        k = count(obj.get("k"), "selection k", optional=True)
        keep = obj.get("keep")
        if keep is not None and not ((is_int(keep) or isinstance(keep, float))
                                     and 0 < keep <= 1):
            raise DiffError(f"selection keep {short(keep)} is not a fraction")
        seed = obj.get("seed", 0)
        if not is_int(seed):
            raise DiffError(f"selection seed {short(seed)} is not a whole number")
        return cls(text(obj.get("method"), "selection method"), k, keep,
                   text(obj.get("ties"), "selection ties"),
                   text(obj.get("include"), "selection include", optional=True),
                   text(obj.get("exclude"), "selection exclude", optional=True), seed,
                   text(obj.get("budget", "row"), "selection budget"))


@dataclass(frozen=True)
class ShardInfo:
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj, name: str, what: str = "shard") -> "ShardInfo":
        if not (isinstance(obj, dict) and is_int(obj.get("size"))
                and 0 <= obj["size"] <= spec.MAX_COUNT and isinstance(obj.get("sha256"), str)):
            raise DiffError(f"{what} {short(name)} has no size and sha256")
        return cls(obj["size"], obj["sha256"])


def is_companion_name(name) -> bool:
    """A file name the index may list in ``files`` (docs/format.md 6.2): a relative POSIX
    path inside the diff, with nothing a path could climb or escape with."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def _files(obj) -> dict | None:
    """The index's ``files`` (name -> ShardInfo), or None for a diff written before it."""
    if obj is None:
        return None
    files = {}
    for name, meta in json_object(obj, "index field 'files'").items():
        if not is_companion_name(name):
            raise DiffError(f"file name {short(name)} is not a relative path inside the diff")
        files[name] = ShardInfo.from_json(meta, name, "file")
    return files


TOTAL_KEYS = ("params", "selected", "kept", "reset", "finetuned_bytes", "diff_bytes")
TOTAL_KEYS_V2 = TOTAL_KEYS + ("positions_bytes", "values_bytes")


@dataclass(frozen=True)
class Totals:
    """Sums over the tensors (docs/format.md 3.1; the last two from version 2 on)."""

    params: int = 0
    selected: int = 0
    kept: int = 0
    reset: int = 0
    finetuned_bytes: int = 0
    diff_bytes: int = 0
    positions_bytes: int = 0
    values_bytes: int = 0
    version: int = spec.FORMAT_VERSION

    def to_json(self) -> dict:
        keys = TOTAL_KEYS if self.version == 1 else TOTAL_KEYS_V2
        return {key: getattr(self, key) for key in keys}

    @classmethod
    def from_json(cls, obj, version: int = spec.FORMAT_VERSION) -> "Totals":
        obj = {} if obj is None else json_object(obj, "totals")
        keys = TOTAL_KEYS if version == 1 else TOTAL_KEYS_V2
        return cls(**{key: count(obj.get(key, 0), f"totals {key}") for key in keys},
                   version=version)


@dataclass(frozen=True)
class Coding:
    """How format 2 codes values: the zstd level and the values a frame holds."""

    level: int
    frame_elems: int

    def to_json(self) -> dict:
        return {"level": self.level, "frame_elems": self.frame_elems}

    @classmethod
    def from_json(cls, obj) -> "Coding":
        obj = json_object(obj, "coding")
        level = obj.get("level")
        if not is_int(level) or not -131072 <= level <= 22:
            raise DiffError(f"coding level {short(level)} is not a zstd level")
        frame_elems = count(obj.get("frame_elems"), "coding frame_elems")
        if frame_elems < 1:
            raise DiffError("coding frame_elems must be at least 1")
        return cls(level, frame_elems)


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
    coding: Coding | None = None
    files: dict | None = None
    """The companion files the diff carries (name -> ShardInfo), where it lists them."""

    def to_json(self) -> dict:
        out = {
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
        if self.coding is not None:
            out["coding"] = self.coding.to_json()
        if self.files is not None:
            out["files"] = {n: f.to_json() for n, f in self.files.items()}
        return out

    @classmethod
    def from_json(cls, obj) -> "DiffIndex":
        """Parse and check a whole index; O(number of tensors). Raises DiffError naming the
        tensor (``exc.tensor``) when one record is malformed."""
        if not isinstance(obj, dict) or obj.get("format") != spec.FORMAT:
            raise DiffError("is not a kenstream diff index")
        version = obj.get("format_version")
        if not is_int(version) or version < 1:
            raise DiffError("format_version is missing or not a number")
        if version > max(spec.READ_VERSIONS):
            raise DiffError(f"format version {version} is newer than this kenstream reads "
                            f"({max(spec.READ_VERSIONS)})", hint="upgrade kenstream")
        if obj.get("complete") is not True:
            raise DiffError("index is marked unfinished",
                            hint="finish it with kenstream compress ... --resume")
        for key in ("tensors", "shards"):
            json_object(obj.get(key), f"index field {key!r}")
        command = obj.get("command")
        if command is not None and not (isinstance(command, list)
                                        and all(isinstance(a, str) for a in command)):
            raise DiffError("index field 'command' is not a list of strings")
        shards = {}
        for name, meta in obj["shards"].items():
            if not is_shard_file_name(name):
                raise DiffError(f"shard name {short(name)} is not a plain kdiff file name")
            shards[name] = ShardInfo.from_json(meta, name)
        tensors = {}
        for name, rec in obj["tensors"].items():
            try:
                tensors[name] = TensorRecord.from_json(rec, shards, version)
            except DiffError as exc:
                raise DiffError(f"record is malformed: {exc.message}", tensor=name) from None
        alignment = obj.get("alignment")
        finetuned = obj.get("finetuned")
        return cls(version, text(obj.get("kenstream_version"), "kenstream_version",
                                  optional=True),
                   command, Selection.from_json(obj.get("selection")),
                   count(obj.get("shard_size"), "shard_size", optional=True),
                   Identity.from_json(obj.get("base"), "base"),
                   None if finetuned is None else Identity.from_json(finetuned, "finetuned"),
                   alignment if isinstance(alignment, dict) else {}, shards, tensors,
                   Totals.from_json(obj.get("totals"), version),
                   Coding.from_json(obj.get("coding")) if version >= 2 else None,
                   _files(obj.get("files")) if version >= 2 else None)
