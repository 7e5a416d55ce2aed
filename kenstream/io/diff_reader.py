"""Reading a diff directory: its index, its shards, and the raw entries of one tensor.

Every reader of a diff (rebuild, verify, info, viz, load, resume) opens it here, so every
one runs the same checks: the index parsed by :class:`DiffIndex.from_json`, shard hashes
and the records in each shard's metadata (:meth:`DiffReader.check_hashes`), and each
entry's dtype and shape against its record (:meth:`DiffReader.entries`). Checks of the
entries' content (bit counts, index ranges) belong to the encoding's decoder.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import DiffError, IdentityError, KenstreamError
from ..format import spec
from ..format.layout import OPTIONAL_ROLES, expected_entries
from ..format.index import DiffIndex
from ..format.records import TensorRecord, parse_shard_metadata
from ..progress import say
from ..text import printable
from .extras import extra_files
from .fingerprint import sha256_file, sized_sha256
from .jsonfile import read_json_file
from .outputs import HOUSEKEEPING
from .safetensors_file import SafetensorsFile

HASH_THREADS = 8
"""At most this many shards are hashed side by side by `DiffReader.check_hashes` (sha256
runs outside the GIL): at 7B, 3 shards on 2 threads took 0.9 s against 1.35-1.6 s one
after another."""

RESUME_HINT = "finish it with kenstream compress ... --resume"


class DiffReader:
    """An opened, validated diff directory. Shards are memory-mapped on first use.

    Opening reads and checks the whole index (O(number of tensors)); a damaged or
    hand-edited index fails here with a one-line ``DiffError`` naming the tensor.
    ``index`` is the :class:`DiffIndex`, ``records`` its name -> :class:`TensorRecord`.
    """

    def __init__(self, path):
        self.path = Path(path)
        index_path = self.path / spec.INDEX_NAME
        if not self.path.exists():
            raise DiffError("does not exist", file=self.path, hint="check the diff's path")
        if not self.path.is_dir():
            holder = self.path.parent
            raise DiffError("is not a diff directory", file=self.path,
                            hint=f"pass the folder that holds {spec.INDEX_NAME}"
                            + (f": {holder}" if (holder / spec.INDEX_NAME).is_file() else ""))
        if not index_path.exists():
            self._refuse_unindexed()
        try:
            self.index = DiffIndex.from_json(read_json_file(index_path, "index"))
        except DiffError as exc:
            raise exc.located(file=index_path) from None
        self.records: dict[str, TensorRecord] = self.index.tensors
        self._shards = {}
        self.forced_base = False  # set when check_base let a different base through
        self._checked = set()  # shards whose hash and records check_hashes has checked

    def _refuse_unindexed(self):
        names = [p.name for p in self.path.iterdir() if p.name not in HOUSEKEEPING]
        if spec.PARTIAL_NAME in names:
            raise DiffError("is an unfinished diff (its compress run stopped before the end)",
                            file=self.path, hint=RESUME_HINT)
        if any(n.endswith((spec.TEMP_SUFFIX, spec.SHARD_SUFFIX)) for n in names):
            raise DiffError(f"has diff shards but no {spec.INDEX_NAME}: an incomplete diff",
                            file=self.path, hint="copy or download the whole diff directory again")
        if not names:
            raise DiffError("is empty, not a kenstream diff", file=self.path)
        if any(n.endswith((".safetensors", ".bin")) for n in names):
            raise DiffError(f"has no {spec.INDEX_NAME}; it holds a model, not a kenstream "
                            "diff", file=self.path,
                            hint="a model where the diff goes: are the paths swapped? "
                                 "rebuild and verify take BASE DIFF")
        raise DiffError(f"has no {spec.INDEX_NAME}; not a kenstream diff", file=self.path)

    def companions(self) -> list[str]:
        """The companion files (config, tokenizer, the fine-tune's card) a rebuilt model
        gets from this diff: those its index lists, each checked to be a regular file of
        the listed size and sha256 (DiffError naming it otherwise: lost or damaged in
        transit), or, for a diff written before the index listed them, those the folder
        holds. Cost: reads the listed files (a few MB)."""
        listed = self.index.files
        if listed is None:
            return extra_files(self.path)
        hint = "copy the whole diff folder again"
        for name, want in listed.items():
            path = self.path / name
            try:
                size, digest = sized_sha256(path)
            except (KenstreamError, OSError):
                raise DiffError("is listed in the diff's index but missing or not a regular "
                                "file", file=path, hint=hint) from None
            if (size, digest) != (want.size, want.sha256):
                raise DiffError(f"differs from the file the diff's index lists ({size} bytes, "
                                f"{want.size} listed; or another sha256)", file=path, hint=hint)
        return sorted(listed)

    def check_files(self) -> None:
        """Every shard the index lists is a regular file of the indexed size (no hashing:
        `check_hashes` reads them)."""
        for name in self.index.shards:
            self._shard_path(name)

    def _shard_path(self, name: str) -> Path:
        """The shard's path, once it is known to be a regular file of the indexed size."""
        path = self.path / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DiffError("shard is missing", file=path,
                            hint="copy the whole diff folder again") from None
        except OSError as exc:
            raise DiffError(f"shard cannot be read: {exc.strerror}", file=path) from None
        if not stat.S_ISREG(st.st_mode):
            raise DiffError("shard is not a regular file", file=path)
        expected = self.index.shards[name].size
        if st.st_size != expected:
            raise DiffError(f"shard is {st.st_size} bytes, index says {expected}", file=path,
                            hint="the shard is cut short or was replaced; copy it again")
        return path

    def shard(self, name: str) -> SafetensorsFile:
        sf = self._shards.get(name)
        if sf is None:
            sf = self._shards[name] = SafetensorsFile(self._shard_path(name))
        return sf

    def check_hashes(self, progress=None, tensors=None, threads: int = 1) -> None:
        """Check the diff's integrity; raise DiffError at the first problem.

        Every shard's sha256 must match the index, and every tensor record in the index
        must equal the copy its shard's metadata carries (format.md 1). The hashes cover
        the shards only; comparing records makes an edited index fail here too, instead
        of rebuilding a different model. Cost: reads every shard once.

        ``tensors`` (names) limits the check to the shards holding them, and to the records
        those shards carry (all shards if one of them is in none, being ``unchanged``);
        shards already checked by this reader are not read again. For readers of a few
        tensors (viz). ``threads`` shards (at most HASH_THREADS) are hashed at once.
        """
        everything = list(self.index.shards)
        wanted = everything
        if tensors is not None:
            held = [self.records[t].shard for t in tensors if t in self.records]
            if None not in held:
                wanted = sorted(set(held))
        wanted = [n for n in wanted if n not in self._checked]
        if not wanted:
            return
        stored = {}
        paths = [self._shard_path(name) for name in wanted]
        pool = ThreadPoolExecutor(max(1, min(len(paths), threads, HASH_THREADS)))
        try:
            digests = pool.map(sha256_file, paths)  # in order, hashed side by side
            for name, path, digest in zip(wanted, paths, digests):
                self._check_shard(name, path, digest, stored, progress)
        finally:
            pool.shutdown(cancel_futures=True)  # a refused shard leaves the rest unread
        where = self.path / spec.INDEX_NAME
        whole = len(wanted) == len(everything)
        for tensor, rec in self.records.items():
            shard, copy = stored.pop(tensor, (None, None))
            if copy is None:
                if whole or rec.shard in wanted:
                    raise DiffError("record is in no shard's metadata (index edited?)",
                                    file=where, tensor=tensor, hint="fetch the diff again")
            elif copy != rec:
                raise DiffError(f"record differs from the copy in {shard} (index edited?)",
                                file=where, tensor=tensor, hint="fetch the diff again")
        if stored:
            tensor, (shard, _) = next(iter(stored.items()))
            raise DiffError(f"shard {shard} records a tensor the index lacks (index edited?)",
                            file=where, tensor=tensor, hint="fetch the diff again")
        self._checked.update(wanted)

    def _check_shard(self, name, path, digest, stored, progress) -> None:
        """One shard of `check_hashes`: its hash, then its records gathered into
        ``stored`` (tensor -> (shard, record))."""
        if digest != self.index.shards[name].sha256:
            raise DiffError("sha256 does not match the index (tampered or damaged)",
                            file=path, hint="fetch the diff again")
        try:
            records = parse_shard_metadata(self.shard(name).metadata)
        except DiffError as exc:
            raise exc.located(file=path) from None
        for tensor, rec in records.items():
            if tensor in stored:
                raise DiffError(f"is recorded in both {stored[tensor][0]} and {name}",
                                file=self.path, tensor=tensor)
            stored[tensor] = (name, rec)
        if progress is not None:
            progress(name)

    def base_ref(self, base, quiet: bool = False) -> str:
        """The base to open for ``base`` as given: the recorded hub revision when ``base``
        names the recorded hub repository without one (its main may have moved since the
        diff was made, and the diff needs the revision it was made from), said in a note;
        else ``base`` itself. A local path is never changed."""
        text, recorded = str(base), self.index.base
        if recorded.kind != "hub" or not recorded.revision or Path(text).exists():
            return text
        from . import hub  # huggingface_hub loads only for hub references

        if not hub.looks_like_ref(text) or hub.parse_ref(text) != (recorded.repo_id, None):
            return text
        say(f"note: {printable(text)} has no revision: using {printable(recorded.named)}, the "
            "one the diff was made from", quiet)
        return f"{recorded.repo_id}@{recorded.revision}"

    @property
    def content_checked(self) -> bool:
        """Whether every record that takes values from the base carries its digest
        (docs/format.md 6.7), so that each base tensor's content is checked as it is read."""
        return self.index.format_version >= 2 and all(
            r.base_digest is not None for r in self.records.values() if r.base_name is not None)

    def check_base(self, base, *, force: bool = False) -> list:
        """Compare the base's file fingerprints with the recorded ones.

        Returns a list of differences; raises IdentityError unless ``force`` or the diff
        checks the base's content (`content_checked`: the same tensors in other files,
        another layout or dtype, are then the right base, and a wrong one is refused
        tensor by tensor as it is read).
        """
        recorded = self.index.base.files
        actual = base.identity().get("files") or {}
        diffs = sorted(n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n))
        if diffs and not force and not self.content_checked:
            first = diffs[0]
            if first not in actual:
                what = "is missing: the base this diff was made from has it"
            elif first not in recorded:
                what = "is not part of the base this diff was made from"
            else:
                what = "differs from the base this diff was made from (fingerprint)"
            more = f"; {len(diffs)} files differ" if len(diffs) > 1 else ""
            raise IdentityError(f"{what}{more} ({printable(self.index.base.named)})",
                                file=Path(base.root) / first)
        self.forced_base = bool(diffs) and not self.content_checked
        return diffs

    def base_note(self, diffs: list) -> str:
        """What to tell the user about a base whose files differ (``check_base``'s list)."""
        if self.content_checked:
            return (f"note: the base's files differ from the recorded ones in {len(diffs)} "
                    "file(s) (another layout, dtype or copy); every base tensor is checked "
                    "against the diff's digest as it is read")
        return (f"warning: --force: base differs from the recorded one in {len(diffs)} "
                "file(s); this diff records no base digests, so a different base is not "
                "detected where positions were reset or tensors are unchanged")

    def entries(self, name: str) -> dict:
        """role -> read-only array of tensor ``name`` (empty for unchanged tensors), each
        checked to have the dtype and shape its record implies."""
        rec = self.records[name]
        if rec.shard is None:
            return {}
        sf = self.shard(rec.shard)
        expected = expected_entries(rec)
        out = {}
        try:
            for role in spec.ROLES:
                key = spec.entry_name(name, role)
                if key not in sf:
                    continue
                if role not in expected:
                    raise DiffError(f"shard has a {role!r} entry, which a {rec.encoding} "
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
        missing = [r for r in expected if r not in out and r not in OPTIONAL_ROLES]
        if missing:
            raise DiffError(f"shard has no {missing[0]} entry for this tensor", file=sf.path,
                            tensor=name)
        return out

    def release(self, name: str, role: str | None = None, start: int = 0,
                stop: int | None = None) -> None:
        """Drop the pages of ``name``'s entries (or bytes ``start:stop`` of one ``role``)
        from resident memory; arrays handed out stay valid."""
        sf = self._shards.get(self.records[name].shard)
        if sf is not None:
            for r in spec.ROLES if role is None else (role,):
                key = spec.entry_name(name, r)
                if key in sf:
                    sf.release(key, start, stop)

    def prefetch(self, name: str, role: str, start: int = 0, stop: int | None = None) -> None:
        """Start reading bytes ``start:stop`` of ``name``'s ``role`` entry ahead of use."""
        sf = self._shards.get(self.records[name].shard)
        key = spec.entry_name(name, role)
        if sf is not None and key in sf:
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
