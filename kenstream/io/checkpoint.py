"""A whole checkpoint, wherever it lives, as one name -> tensor mapping.

``Checkpoint.open(ref)`` accepts a model folder, a single weight file, an index file or a
hub reference ``org/name[@revision]``, finds the weight files, validates any shard index
against the shards' own headers, and then answers ``names() / info() / array()`` across
all files as if they were one. Nothing is read beyond headers until ``array()`` views are
used.

In a folder, the weights are chosen by :func:`pick_weight_file`: safetensors before
``.bin``, a single file before an index. A local path always wins over a hub id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from kenstream.errors import CheckpointError, CorruptFileError, SourceNotFoundError
from kenstream.format import spec
from kenstream.io.extras import extra_files
from kenstream.io.fingerprint import fingerprint
from kenstream.io.jsonfile import read_json_file
from kenstream.io.safetensors_file import SafetensorsFile, TensorInfo, _DuplicateKey, _no_duplicates

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHARD = re.compile(r"(?P<stem>.+)-\d+-of-(?P<total>\d+)(?P<suffix>\.safetensors|\.bin)")
"""A shard's name, ``model-00001-of-00003.safetensors``; its index is
``model.safetensors.index.json``."""


def _refuse_unindexed_shards(names, suffix: str) -> None:
    """Refuse shards of a model split in several (``-of-00003``) found without their
    index: every shard is needed, and the index joins them, so neither one shard nor a
    choice among them is the model."""
    shards = sorted(n for n in names if (m := _SHARD.fullmatch(n)) and m["suffix"] == suffix
                    and int(m["total"]) > 1)
    if shards:
        index = _SHARD.fullmatch(shards[0])["stem"] + suffix + ".index.json"
        listed = ", ".join(shards[:3]) + (", ..." if len(shards) > 3 else "")
        raise CheckpointError(
            f"{index} is missing: {listed} {'is a shard' if len(shards) == 1 else 'are shards'}"
            " of a model that needs all its shards and that index to join them",
            hint=f"copy or download {index} into this folder")


def pick_weight_file(filenames) -> str | None:
    """The entry-point weight file among a folder's top-level ``filenames``, or None.

    Precedence: ``model.safetensors``, ``model.safetensors.index.json``, the only
    ``*.safetensors.index.json``, the only ``*.safetensors``, ``pytorch_model.bin``,
    ``pytorch_model.bin.index.json``. Several unnamed candidates of one kind and no
    standard name is ambiguous, and shards without their index are no model:
    ``CheckpointError`` (no file set; callers locate it).
    """
    names = set(filenames)
    for standard in ("model.safetensors", "model.safetensors.index.json"):
        if standard in names:
            return standard
    for suffix in (".safetensors.index.json", ".safetensors"):
        found = sorted(n for n in names if n.endswith(suffix))
        _refuse_unindexed_shards(found, suffix)
        if len(found) == 1:
            return found[0]
        if found:
            raise CheckpointError(
                f"several *{suffix} files ({', '.join(found[:4])}) and no model{suffix}; "
                "pass the one to use")
    for standard in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if standard in names:
            return standard
    _refuse_unindexed_shards(names, ".bin")
    return None


def _no_weights(folder: Path) -> SourceNotFoundError:
    """The error for a folder without weights, saying what it is where that is known: a
    kenstream diff, or a hub cache's folder of a model."""
    for name in (spec.INDEX_NAME, spec.PARTIAL_NAME):
        if (folder / name).is_file():
            return SourceNotFoundError(
                f"holds {name}: it is a kenstream diff, not a model", file=folder,
                hint="pass a model folder here: rebuild and verify take BASE DIFF, compress "
                     "takes BASE FINETUNED")
    from kenstream.io import hub  # huggingface_hub loads only for a hub cache's folder

    if hub.is_cache_folder(folder):
        return SourceNotFoundError("is a hub cache's folder of a model, not a model folder",
                                   file=folder, hint=hub.cache_folder_hint(folder))
    return SourceNotFoundError(
        "found no model.safetensors, *.safetensors, *.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json here", file=folder)


def read_weight_map(index_path) -> dict[str, str]:
    """``weight_map`` of a shard index (tensor name -> shard file), validated for shape.

    Raises ``CorruptFileError`` for a path that is not a regular file, invalid JSON, a
    missing or malformed ``weight_map``, or a shard path that is absolute or climbs out of
    the index's folder.
    """
    index_path = Path(index_path)
    try:
        # A regular file of sane size only: a FIFO or a link to /dev/zero must not hang.
        data = read_json_file(index_path, "index", error=CorruptFileError,
                              pairs_hook=_no_duplicates)
    except _DuplicateKey as dup:
        # Plain JSON keeps the last of two equal keys; a tensor mapped twice is ambiguous.
        raise CorruptFileError("index lists this name twice", file=index_path,
                               tensor=dup.key) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptFileError("index has no weight_map of tensor names to shard files", file=index_path)
    for name, shard in weight_map.items():
        parts = PurePosixPath(shard).parts
        if not parts or PurePosixPath(shard).is_absolute() or ".." in parts or "\\" in shard:
            raise CorruptFileError(f"shard path {shard!r} is not a file beside the index",
                                   file=index_path, tensor=name)
    return weight_map


def _open_reader(path: Path):
    if path.name.endswith(_TORCH_SUFFIXES):
        from kenstream.io.torch_bin import TorchBinFile  # torch loads only when needed

        return TorchBinFile(path)
    return SafetensorsFile(path)


class Checkpoint:
    """All tensors of one checkpoint, across its files.

    Attributes: ``root`` (folder of the weights, and of the extra files), ``files``
    (weight file Paths in read order), ``index_file`` (Path or None), ``source`` (the
    reference given to :meth:`open`), ``kind`` ("local" or "hub"), ``repo_id`` and
    ``revision`` (hub only; revision is the snapshot's commit hash).
    """

    def __init__(self, *, source, kind, root, readers, index_file=None, repo_id=None, revision=None):
        self.source = source
        self.kind = kind
        self.root = Path(root)
        self.index_file = index_file
        self.repo_id = repo_id
        self.revision = revision
        self._readers = readers
        self.files = [r.path for r in readers]
        self._where = {}
        for reader in readers:
            for name in reader.names():
                self._where[name] = reader

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(cls, ref, *, cache_dir=None) -> "Checkpoint":
        """Open ``ref``: a folder, a weight file, an index file, or ``org/name[@revision]``.

        Cost: reads every weight file's header (for ``.bin``: its pickle), nothing else.
        Raises ``SourceNotFoundError`` when nothing usable is found, ``CorruptFileError``
        when a file or index contradicts itself.
        """
        text = os.fspath(ref)
        path = Path(text).expanduser()
        if path.exists():
            return cls._open_path(path, source=text, kind="local")
        from kenstream.io import hub  # huggingface_hub loads only for hub references

        if not hub.looks_like_ref(text):
            raise SourceNotFoundError(
                "no such file or folder, nor a hub reference (org/name[@revision])", file=text)
        head = text.split("/", 1)[0]
        if "/" in text and Path(head).expanduser().is_dir():
            # p1/bse beside a folder p1: a mistyped local path, not a model to download.
            raise SourceNotFoundError(
                f"no such file or folder (taken as a local path: {head!r} is a folder here)",
                file=text, hint="check the path; run from another folder to use the hub "
                                "reference")
        repo_id, _ = hub.parse_ref(text)
        try:
            snapshot = hub.resolve(text, cache_dir=cache_dir)
        except SourceNotFoundError as exc:
            raise SourceNotFoundError(f"no local path {text!r}, and {exc.message}",
                                      hint=exc.hint) from exc.__cause__
        revision = snapshot.name if _COMMIT.fullmatch(snapshot.name) else None
        return cls._open_path(snapshot, source=text, kind="hub", repo_id=repo_id, revision=revision)

    @classmethod
    def _open_path(cls, path: Path, **meta) -> "Checkpoint":
        if path.is_dir():
            listing = [p.name for p in path.iterdir() if p.is_file()]
            try:
                chosen = pick_weight_file(listing)
            except CheckpointError as exc:
                raise exc.located(file=path) from None
            if chosen is None:
                raise _no_weights(path)
            path = path / chosen
        if path.name.endswith(".index.json"):
            return cls._open_index(path, **meta)
        if not path.name.endswith((".safetensors",) + _TORCH_SUFFIXES):
            raise CheckpointError("not a .safetensors, .bin or .index.json file", file=path)
        return cls(root=path.parent, readers=[_open_reader(path)], **meta)

    @classmethod
    def _open_index(cls, index_path: Path, **meta) -> "Checkpoint":
        weight_map = read_weight_map(index_path)
        root = index_path.parent
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            try:
                found = (root / shard).is_file()
            except OSError:  # e.g. a name longer than the file system allows
                found = False
            if not found:
                raise CorruptFileError(f"weight_map names shard {shard!r}, which is missing",
                                       file=index_path, tensor=names[0])
        readers = []
        try:
            seen: dict[str, str] = {}
            # Sorted shard names put "model-00001-of-00003" before "-00002-": file order.
            for shard in sorted(by_shard):
                reader = _open_reader(root / shard)
                readers.append(reader)
                for name in reader.names():
                    if name in seen:
                        raise CorruptFileError(f"is in both shards {seen[name]!r} and {shard!r}",
                                               file=index_path, tensor=name)
                    seen[name] = shard
                    if name not in weight_map:
                        raise CorruptFileError(f"is in shard {shard!r} but not in the weight_map",
                                               file=index_path, tensor=name)
            for name, shard in weight_map.items():
                if seen.get(name) != shard:
                    raise CorruptFileError(f"is listed for shard {shard!r} but missing from it",
                                           file=index_path, tensor=name)
        except BaseException:
            for reader in readers:
                reader.close()
            raise
        return cls(root=root, readers=readers, index_file=index_path, **meta)

    # -- access -------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every tensor name: shards in sorted file-name order, each in its file order."""
        return list(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _reader(self, name):
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError("no such tensor in this checkpoint", file=self.root, tensor=name) from None

    def info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of ``name`` (its ``file`` is the shard holding it)."""
        return self._reader(name).info(name)

    def array(self, name: str):
        """Read-only C-contiguous view of ``name`` in its storage dtype (no copy)."""
        return self._reader(name).array(name)

    def read_into(self, name: str, start: int, out) -> None:
        """Copy bytes ``start : start + out.nbytes`` of ``name`` into the C-contiguous array
        ``out`` (a ``pread`` for safetensors; see :meth:`SafetensorsFile.read_into`)."""
        self._reader(name).read_into(name, start, out)

    def read_directly(self) -> bool:
        """Let :meth:`read_into` bypass the page cache in every weight file that can
        (see :meth:`SafetensorsFile.read_directly`); returns whether all of them will."""
        return all([reader.read_directly() for reader in self._readers])

    def staged(self, name: str, start: int, stop: int):
        """Bytes ``start:stop`` of ``name`` from a range :meth:`prefetch` read past the page
        cache (read-only uint8), or None (see :meth:`SafetensorsFile.staged`)."""
        return self._reader(name).staged(name, start, stop)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Tell the file holding ``name`` that its pages (bytes ``start:stop`` of the tensor)
        are no longer needed (see :meth:`SafetensorsFile.release`); arrays already handed
        out stay valid."""
        self._reader(name).release(name, start, stop)

    def check_intact(self, name: str) -> None:
        """Raise CorruptFileError if the file holding ``name`` shrank since it was opened."""
        self._reader(name).check_intact(name)

    def prefetch(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Start reading bytes ``start:stop`` of ``name`` ahead of use, where the reader
        can (safetensors)."""
        self._reader(name).prefetch(name, start, stop)

    def extra_files(self) -> list[str]:
        """Config, tokenizer and generation files beside the weights and a sentence-transformers
        model's module folders, as sorted names relative to `root`; links
        leading out of the folder (or of a hub cache repository) are skipped with a warning
        (see :func:`kenstream.io.extras.extra_files`)."""
        return extra_files(self.root)

    def identity(self) -> dict:
        """JSON-able identity: source, kind, repo_id, revision and a fingerprint per weight file.

        Cost: about 2 MiB read per weight file (see :func:`fingerprint`).
        """
        files = {p.relative_to(self.root).as_posix(): fingerprint(p) for p in self.files}
        return {"source": self.source, "kind": self.kind, "repo_id": self.repo_id,
                "revision": self.revision, "files": files}

    def close(self) -> None:
        """Close every weight file (views still alive stay valid until dropped)."""
        for reader in self._readers:
            reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self._where)} tensors in {len(self.files)} files)"
