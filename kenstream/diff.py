"""Reading a diff directory: its index, its shards, and the entries of one tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import dtypes, format as fmt
from .errors import DiffError, IdentityError, KenstreamError
from .io.safetensors_file import SafetensorsFile
from .io.fingerprint import sha256_file

_ROLES = ("mask", "index", "counts", "values")

# The tensor record fields of format version 1 (format.md 3.2), compared between the index
# and the shards' metadata; other keys are ignored, as readers must.
RECORD_KEYS = ("base_name", "encoding", "reason", "dtype", "shape", "rows", "cols", "k", "kept",
               "row_kept", "shard", "nbytes")

RESUME_HINT = "finish it with kenstream compress ... --resume"

# No index may describe more than this many bytes in one tensor (a guard against
# tampered shapes that would overflow int64 sizes, far above any real tensor).
_MAX_TENSOR_BYTES = 1 << 62


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DiffError(f"index has the key {key!r} twice")
        seen[key] = value
    return seen


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class DiffReader:
    """An opened, validated diff directory. Shards are memory-mapped on first use.

    Opening reads and checks the whole index (O(number of tensors)); every record field
    that later code computes with is type- and range-checked here, so a damaged or
    hand-edited index fails at open with a one-line ``DiffError`` naming the tensor.
    """

    def __init__(self, path):
        self.path = Path(path)
        index_path = self.path / fmt.INDEX_NAME
        if not self.path.is_dir():
            raise DiffError("is not a diff directory", file=self.path)
        if not index_path.exists():
            self._refuse_unindexed()
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"),
                               object_pairs_hook=_no_duplicates)
        except DiffError as exc:
            raise exc.located(file=index_path) from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DiffError(f"index is not valid JSON ({exc})", file=index_path) from None
        self._check_index(index, index_path)
        self.index = index
        self.records = index["tensors"]
        self._shards = {}

    def _refuse_unindexed(self):
        names = [p.name for p in self.path.iterdir()]
        if fmt.PARTIAL_NAME in names:
            raise DiffError("is an unfinished diff (the compress run was interrupted)",
                            file=self.path, hint=RESUME_HINT)
        if any(n.endswith((fmt.TEMP_SUFFIX, fmt.SHARD_SUFFIX)) for n in names):
            raise DiffError(f"has diff shards but no {fmt.INDEX_NAME}: an incomplete diff",
                            file=self.path, hint="copy or download the whole diff directory again")
        if not names:
            raise DiffError("is empty, not a kenstream diff", file=self.path)
        raise DiffError(f"has no {fmt.INDEX_NAME}; not a kenstream diff", file=self.path)

    @staticmethod
    def _check_index(index, where) -> None:
        if not isinstance(index, dict) or index.get("format") != fmt.FORMAT:
            raise DiffError("is not a kenstream diff index", file=where)
        version = index.get("format_version")
        if not _is_int(version) or version < 1:
            raise DiffError("format_version is missing or not a number", file=where)
        if version > fmt.FORMAT_VERSION:
            raise DiffError(f"format version {version} is newer than this kenstream reads "
                            f"({fmt.FORMAT_VERSION})", file=where, hint="upgrade kenstream")
        if index.get("complete") is not True:
            raise DiffError("index is marked unfinished", file=where, hint=RESUME_HINT)
        for key, kind in (("tensors", dict), ("shards", dict), ("base", dict), ("selection", dict),
                          ("finetuned", (dict, type(None))), ("totals", (dict, type(None)))):
            if not isinstance(index.get(key), kind):
                raise DiffError(f"index field {key!r} is missing or malformed", file=where)
        _check_identity(index["base"], "base", where)
        if index.get("finetuned") is not None:
            _check_identity(index["finetuned"], "finetuned", where)
        _check_selection(index["selection"], where)
        for key, value in (index.get("totals") or {}).items():
            if not (_is_int(value) or isinstance(value, float)):
                raise DiffError(f"totals field {key!r} is not a number", file=where)
        for shard, meta in index["shards"].items():
            if Path(shard).name != shard or not shard.endswith(fmt.SHARD_SUFFIX):
                raise DiffError(f"shard name {shard!r} is not a plain kdiff file name", file=where)
            if not (isinstance(meta, dict) and _is_int(meta.get("size"))
                    and isinstance(meta.get("sha256"), str)):
                raise DiffError(f"shard {shard!r} has no size and sha256", file=where)
        for name, rec in index["tensors"].items():
            problem = _record_problem(rec, index["shards"])
            if problem:
                raise DiffError(f"record is malformed: {problem}", file=where, tensor=name)

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
        """Check the diff's integrity; raise DiffError at the first problem.

        Every shard's sha256 must match the index, and every tensor record in the index
        must equal the copy its shard's metadata carries (format.md 2). The hashes cover
        the shards only; comparing records makes an edited index fail here too, instead
        of rebuilding a different model. Cost: reads every shard once.
        """
        stored = {}
        for name, meta in self.index["shards"].items():
            path = self.path / name
            if not path.exists():
                raise DiffError("shard is missing", file=path)
            digest = sha256_file(path)
            if digest != meta.get("sha256"):
                raise DiffError("sha256 does not match the index (tampered or damaged)",
                                file=path, hint="fetch the diff again")
            for tensor, rec in self._shard_records(name).items():
                if tensor in stored:
                    raise DiffError(f"is recorded in both {stored[tensor][0]} and {name}",
                                    file=self.path, tensor=tensor)
                stored[tensor] = (name, rec)
            if progress is not None:
                progress(name)
        where = self.path / fmt.INDEX_NAME
        for tensor, rec in self.records.items():
            shard, copy = stored.pop(tensor, (None, None))
            if copy is None:
                raise DiffError("record is in no shard's metadata (index edited?)", file=where,
                                tensor=tensor, hint="fetch the diff again")
            if any(copy.get(k) != rec.get(k) for k in RECORD_KEYS):
                raise DiffError(f"record differs from the copy in {shard} (index edited?)",
                                file=where, tensor=tensor, hint="fetch the diff again")
        if stored:
            tensor, (shard, _) = next(iter(stored.items()))
            raise DiffError(f"shard {shard} records a tensor the index lacks (index edited?)",
                            file=where, tensor=tensor, hint="fetch the diff again")

    def _shard_records(self, name: str) -> dict:
        sf = self.shard(name)
        meta = sf.metadata or {}
        try:
            records = json.loads(meta["records"]) if meta.get("format") == fmt.FORMAT else None
        except (KeyError, ValueError, RecursionError):
            records = None
        if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
            raise DiffError("shard metadata holds no tensor records", file=sf.path)
        return records

    def check_base(self, base, *, force: bool = False) -> list:
        """Compare the base's file fingerprints with the recorded ones.

        Returns a list of differences; raises IdentityError unless ``force``.
        """
        recorded = self.index["base"].get("files") or {}
        actual = base.identity().get("files") or {}
        diffs = sorted(n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n))
        if diffs and not force:
            first = diffs[0]
            if first not in actual:
                what = "is missing: the base this diff was made from has it"
            elif first not in recorded:
                what = "is not part of the base this diff was made from"
            else:
                what = "differs from the base this diff was made from (fingerprint)"
            more = f"; {len(diffs)} files differ" if len(diffs) > 1 else ""
            raise IdentityError(f"{what}{more}", file=Path(base.root) / first)
        return diffs

    def entries(self, name: str) -> dict:
        """role -> read-only array for tensor ``name`` (empty for unchanged tensors)."""
        rec = self.records[name]
        shard = rec.get("shard")
        if shard is None:
            return {}
        sf = self.shard(shard)
        expected = _expected_entries(rec)
        out = {}
        try:
            for role in _ROLES:
                key = f"{name}::{role}"
                if key not in sf:
                    continue
                if role not in expected:
                    raise DiffError(f"shard has a {role!r} entry, which a {rec['encoding']} "
                                    "record does not use", file=sf.path)
                info = sf.info(key)
                dtype, shape = expected[role]
                if info.dtype != dtype or list(info.shape) != shape:
                    raise DiffError(f"{role} entry is {info.dtype}{list(info.shape)}, the record "
                                    f"says {dtype}{shape} (dtype or shape tampered)",
                                    file=sf.path)
                out[role] = sf.array(key)
        except KenstreamError as exc:
            raise exc.located(tensor=name)
        missing = [r for r in expected if r not in out and r != "counts"]
        if missing:
            raise DiffError(f"shard has no {missing[0]} entry for this tensor", file=sf.path,
                            tensor=name)
        return out

    def release(self, name: str, role: str | None = None, start: int = 0,
                stop: int | None = None) -> None:
        """Drop the pages of ``name``'s entries (or bytes ``start:stop`` of one ``role``)
        from resident memory; arrays handed out stay valid."""
        rec = self.records[name]
        if rec.get("shard") in self._shards:
            sf = self._shards[rec["shard"]]
            for r in _ROLES if role is None else (role,):
                key = f"{name}::{r}"
                if key in sf:
                    sf.release(key, start, stop)

    def prefetch(self, name: str, role: str, start: int = 0, stop: int | None = None) -> None:
        """Start reading bytes ``start:stop`` of ``name``'s ``role`` entry ahead of use."""
        rec = self.records[name]
        if rec.get("shard") in self._shards:
            sf = self._shards[rec["shard"]]
            key = f"{name}::{role}"
            if key in sf:
                sf.prefetch(key, start, stop)

    def close(self) -> None:
        for sf in self._shards.values():
            sf.close()
        self._shards.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _expected_entries(rec: dict) -> dict:
    """role -> (dtype code, shape) the shard must hold for record ``rec`` (format.md 2.2)."""
    rows, cols, kept, enc = rec["rows"], rec["cols"], rec["kept"], rec["encoding"]
    if enc == "dense":
        return {"values": (rec["dtype"], list(rec["shape"]))}
    if enc == "bitmask":
        return {"mask": ("U8", [rows, (cols + 7) // 8]), "values": (rec["dtype"], [kept])}
    if enc == "indices":
        return {"index": (fmt.index_code(cols), [kept]), "counts": (fmt.count_code(cols), [rows]),
                "values": (rec["dtype"], [kept])}
    return {}


def _check_identity(ident: dict, key: str, where) -> None:
    files = ident.get("files")
    if files is not None and not (isinstance(files, dict)
                                  and all(isinstance(v, str) for v in files.values())):
        raise DiffError(f"index field {key}.files is not a map of file names to fingerprints",
                        file=where)


def _check_selection(sel: dict, where) -> None:
    for key in ("method", "ties"):
        if not isinstance(sel.get(key), str):
            raise DiffError(f"selection field {key!r} is missing or not a string", file=where)
    if sel.get("k") is not None and not _is_int(sel["k"]):
        raise DiffError("selection field 'k' is not a whole number", file=where)
    keep = sel.get("keep")
    if keep is not None and not (_is_int(keep) or isinstance(keep, float)):
        raise DiffError("selection field 'keep' is not a number", file=where)


def _record_problem(rec, shards) -> str | None:
    """Why tensor record ``rec`` cannot be used, or None. O(len(shape))."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    enc = rec.get("encoding")
    if enc not in fmt.ENCODINGS:
        return f"unknown encoding {enc!r}"
    code = rec.get("dtype")
    if not isinstance(code, str) or code not in dtypes.CODES:
        return f"unknown dtype {code!r}"
    shape = rec.get("shape")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        return f"shape {shape!r} is not a list of sizes"
    if math.prod(shape) * dtypes.itemsize(code) > _MAX_TENSOR_BYTES:
        return f"shape {shape} is impossibly large"
    rows, cols = fmt.rows_cols(shape)
    if rec.get("rows") != rows or rec.get("cols") != cols or not _is_int(rec.get("rows")) \
            or not _is_int(rec.get("cols")):
        return f"rows/cols {rec.get('rows')!r}/{rec.get('cols')!r} do not match shape {shape}"
    kept = rec.get("kept")
    want = {"dense": rows * cols, "unchanged": 0}.get(enc)
    if not _is_int(kept) or not 0 <= kept <= rows * cols or (want is not None and kept != want):
        return f"kept {kept!r} is impossible for a {enc} {rows}x{cols} tensor"
    row_kept = rec.get("row_kept")
    if row_kept is not None and not (_is_int(row_kept) and 0 <= row_kept <= cols):
        return f"row_kept {row_kept!r} is not a count of columns"
    if rec.get("k") is not None and not _is_int(rec["k"]):
        return f"k {rec['k']!r} is not a whole number"
    nbytes = rec.get("nbytes", 0)
    if not _is_int(nbytes) or nbytes < 0:
        return f"nbytes {nbytes!r} is not a byte count"
    base_name = rec.get("base_name")
    if not (base_name is None or isinstance(base_name, str)):
        return f"base_name {base_name!r} is not a tensor name"
    if base_name is None and enc != "dense":
        return f"a {enc} tensor needs a base_name"
    shard = rec.get("shard")
    if enc != "unchanged" and shard is None:
        return f"a {enc} tensor needs a shard"
    if shard is not None and (not isinstance(shard, str) or shard not in shards):
        return f"names unknown shard {shard!r}"
    return None
