"""The plan files of unfinished runs: ``kenstream-diff.partial.json`` (compress) and
``kenstream-rebuild.partial.json`` (rebuild).

A plan records everything that shapes the output's bytes, so that ``--resume`` can refuse
to finish a run with other inputs or settings. Plans are deleted when the run completes and
are no part of a finished diff. One parser each, as for the records in :mod:`.records`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DiffError
from . import spec
from .fields import count as _count
from .fields import is_int as _is_int
from .fields import is_shard_file_name
from .fields import json_object as _object
from .index import Coding, Identity


@dataclass(frozen=True)
class CompressPlan:
    """The plan file ``kenstream-diff.partial.json`` of an unfinished compress run."""

    settings: dict
    shard_size: int
    base: dict
    finetuned: dict
    shards: dict
    command: list | None = None
    format_version: int = spec.FORMAT_VERSION
    strict: dict | None = None
    """``--strict-resume``: {"base": {file: sha256}, "finetuned": {...}}, else None."""
    coding: dict | None = None
    """Format 2's coding settings (``Coding.to_json()``), else None."""
    budget: dict | None = None
    """A tensor or global budget's cuts: {tensor name: [shift, bin, quota, count]}, else
    None."""

    def to_json(self) -> dict:
        out = {"format": spec.FORMAT, "format_version": self.format_version,
               "settings": self.settings, "shard_size": self.shard_size, "base": self.base,
               "finetuned": self.finetuned, "shards": self.shards, "command": self.command}
        if self.strict is not None:
            out["strict"] = self.strict
        if self.coding is not None:
            out["coding"] = self.coding
        if self.budget is not None:
            out["budget"] = self.budget
        return out

    @classmethod
    def from_json(cls, obj) -> "CompressPlan":
        obj = _object(obj, "plan")
        if obj.get("format") != spec.FORMAT:
            raise DiffError("is not a kenstream compress plan")
        shards = _object(obj.get("shards"), "plan shards")
        if not all(is_shard_file_name(n) and isinstance(t, list)
                   and all(isinstance(x, str) for x in t) for n, t in shards.items()):
            raise DiffError("plan shards are not shard names with tensor lists")
        Identity.from_json(obj.get("base"), "base")
        Identity.from_json(obj.get("finetuned"), "finetuned")
        strict = obj.get("strict")
        if strict is not None and not (
                isinstance(strict, dict) and set(strict) == {"base", "finetuned"}
                and all(_is_file_map(v) for v in strict.values())):
            raise DiffError("plan strict hashes are not maps of file names to sha256")
        coding = obj.get("coding")
        if coding is not None:
            Coding.from_json(coding)
        budget = obj.get("budget")
        if budget is not None and not (
                isinstance(budget, dict)
                and all(isinstance(v, list) and len(v) == 4 and all(_is_int(x) for x in v)
                        for v in budget.values())):
            raise DiffError("plan budget is not a map of tensor names to "
                            "[shift, bin, quota, count]")
        return cls(_object(obj.get("settings"), "plan settings"),
                   _count(obj.get("shard_size"), "plan shard_size"), obj["base"],
                   obj["finetuned"], shards, obj.get("command"),
                   _count(obj.get("format_version"), "plan format_version"), strict, coding,
                   budget)


def _is_file_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items())


@dataclass(frozen=True)
class RebuildPlan:
    """The plan file of an unfinished rebuild: everything that shapes the output's bytes.

    ``diff``: the diff's shard table (name -> size and sha256); ``shard_size``; ``files``:
    the output shard names; ``base``: the base's file fingerprints (``Checkpoint.identity()
    ["files"]``), since reset positions take the base's values; ``force``: whether a base
    other than the recorded one was accepted."""

    diff: dict
    shard_size: int
    files: list
    base: dict = field(default_factory=dict)
    force: bool = False
    extra: dict = field(default_factory=dict)

    FIELDS = (("diff", "diff's shards"), ("base", "base files"), ("force", "--force setting"),
              ("shard_size", "--shard-size value"), ("files", "output shard plan"))
    """Each field and how a refusal names it, in the order a resume compares them."""

    def to_json(self) -> dict:
        return dict(self.extra, diff=self.diff, shard_size=self.shard_size, files=self.files,
                    base=self.base, force=self.force)

    def differs(self, other: "RebuildPlan") -> str | None:
        """How ``other`` differs from this plan (``"the base files"``), or None."""
        for key, what in self.FIELDS:
            if getattr(self, key) != getattr(other, key):
                return what
        return None

    @classmethod
    def from_json(cls, obj) -> "RebuildPlan":
        obj = _object(obj, "rebuild plan")
        files = obj.get("files")
        if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            raise DiffError("rebuild plan files are not a list of names")
        base = obj.get("base", {})
        if not _is_file_map(base):
            raise DiffError("rebuild plan base is not a map of file names to fingerprints")
        force = obj.get("force", False)
        if not isinstance(force, bool):
            raise DiffError("rebuild plan force is not true or false")
        known = ("diff", "shard_size", "files", "base", "force")
        extra = {k: v for k, v in obj.items() if k not in known}
        return cls(_object(obj.get("diff"), "rebuild plan diff"),
                   _count(obj.get("shard_size"), "rebuild plan shard_size"), files, base, force,
                   extra)
