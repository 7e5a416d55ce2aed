"""Reading a diff directory: its index, its shards, and the entries of one tensor."""

from __future__ import annotations

import json
from pathlib import Path

from . import format as fmt
from .errors import DiffError, IdentityError, KenstreamError
from .io.safetensors_file import SafetensorsFile
from .io.writer import sha256_of

_ROLES = ("mask", "index", "counts", "values")


class DiffReader:
    """An opened, validated diff directory. Shards are memory-mapped on first use."""

    def __init__(self, path):
        self.path = Path(path)
        index_path = self.path / fmt.INDEX_NAME
        if not self.path.is_dir():
            raise DiffError("is not a diff directory", file=self.path)
        if not index_path.exists():
            if (self.path / fmt.PARTIAL_NAME).exists():
                raise DiffError("is an unfinished diff (the compress run was interrupted)",
                                file=self.path, hint="finish it with kenstream compress ... --resume")
            raise DiffError(f"has no {fmt.INDEX_NAME}; not a kenstream diff", file=self.path)
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DiffError(f"index is not valid JSON ({exc})", file=index_path) from None
        self._check_index(index, index_path)
        self.index = index
        self.records = index["tensors"]
        self._shards = {}

    @staticmethod
    def _check_index(index, where) -> None:
        if not isinstance(index, dict) or index.get("format") != fmt.FORMAT:
            raise DiffError("is not a kenstream diff index", file=where)
        version = index.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise DiffError("format_version is missing or not a number", file=where)
        if version > fmt.FORMAT_VERSION:
            raise DiffError(f"format version {version} is newer than this kenstream reads "
                            f"({fmt.FORMAT_VERSION})", file=where, hint="upgrade kenstream")
        if index.get("complete") is not True:
            raise DiffError("index is marked unfinished", file=where)
        for key, kind in (("tensors", dict), ("shards", dict), ("base", dict), ("selection", dict)):
            if not isinstance(index.get(key), kind):
                raise DiffError(f"index field {key!r} is missing or malformed", file=where)
        for name, rec in index["tensors"].items():
            if not isinstance(rec, dict) or rec.get("encoding") not in fmt.ENCODINGS:
                raise DiffError("record is malformed", file=where, tensor=name)
            shard = rec.get("shard")
            if shard is not None and shard not in index["shards"]:
                raise DiffError(f"record names unknown shard {shard!r}", file=where, tensor=name)
        for shard in index["shards"]:
            if Path(shard).name != shard or not shard.endswith(fmt.SHARD_SUFFIX):
                raise DiffError(f"shard name {shard!r} is not a plain kdiff file name", file=where)

    def shard(self, name: str) -> SafetensorsFile:
        sf = self._shards.get(name)
        if sf is None:
            path = self.path / name
            if not path.exists():
                raise DiffError("shard is missing", file=path)
            expected = self.index["shards"][name].get("size")
            if expected is not None and path.stat().st_size != expected:
                raise DiffError(f"shard is {path.stat().st_size} bytes, index says {expected}",
                                file=path)
            sf = self._shards[name] = SafetensorsFile(path)
        return sf

    def check_hashes(self, progress=None) -> None:
        """Raise DiffError if any shard's sha256 differs from the index. Reads every shard."""
        for name, meta in self.index["shards"].items():
            path = self.path / name
            if not path.exists():
                raise DiffError("shard is missing", file=path)
            digest = sha256_of(path)
            if digest != meta.get("sha256"):
                raise DiffError("sha256 does not match the index (tampered or damaged)",
                                file=path, hint="fetch the diff again")
            if progress is not None:
                progress(name)

    def check_base(self, base, *, force: bool = False) -> list:
        """Compare the base's file fingerprints with the recorded ones.

        Returns a list of differences; raises IdentityError unless ``force``.
        """
        recorded = self.index["base"].get("files") or {}
        actual = base.identity().get("files") or {}
        diffs = sorted(n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n))
        if diffs and not force:
            raise IdentityError(f"base differs from the one this diff was made from "
                                f"({len(diffs)} file(s) differ, e.g. {diffs[0]})", file=self.path)
        return diffs

    def entries(self, name: str) -> dict:
        """role -> read-only array for tensor ``name`` (empty for unchanged tensors)."""
        rec = self.records[name]
        shard = rec.get("shard")
        if shard is None:
            return {}
        sf = self.shard(shard)
        out = {}
        try:
            for role in _ROLES:
                key = f"{name}::{role}"
                if key in sf.names():
                    out[role] = sf.array(key)
        except KenstreamError as exc:
            raise exc.located(tensor=name)
        if "values" not in out:
            raise DiffError("shard has no values for this tensor", file=sf.path, tensor=name)
        return out

    def release(self, name: str) -> None:
        rec = self.records[name]
        if rec.get("shard") in self._shards:
            sf = self._shards[rec["shard"]]
            for role in _ROLES:
                key = f"{name}::{role}"
                if key in sf.names():
                    sf.release(key)

    def close(self) -> None:
        for sf in self._shards.values():
            sf.close()
        self._shards.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
