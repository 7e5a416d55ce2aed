"""What a torch.save zip archive declares about its storages, read without building anything.

A zip ``.bin`` holds ``ARCHIVE/data.pkl`` (the pickle of the state dict, in which every
storage is a persistent id ``('storage', type, key, location, numel)``) and one member
``ARCHIVE/data/KEY`` per storage. ``torch.load(mmap=True)`` maps each storage from its
member's offset for as many bytes as the pickle *claims*, without comparing the claim with
the member, and maps compressed members as they are stored. :func:`archive_storages` reads
the declarations with an unpickler that resolves no global (every one becomes an inert
placeholder) and compares them with the zip directory.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass

MAX_PICKLE_BYTES = 1 << 30
"""A ``data.pkl`` larger than this is refused (real ones are a few MB)."""


class StorageScanError(Exception):
    """The archive contradicts its pickle; ``message`` and ``tensor`` say where."""

    def __init__(self, message: str, tensor=None):
        super().__init__(message)
        self.message, self.tensor = message, tensor


class _Global:
    """A global the pickle names; calling it records the call and builds nothing."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        return _Call(self, args)


class _Call(dict):
    """The result of calling a placeholder: remembers its arguments, accepts any state."""

    def __init__(self, func, args):
        super().__init__()
        self.func, self.args = func, args

    def __setstate__(self, state):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _Storage:
    def __init__(self, key):
        self.key = key


class _Scanner(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.claims = {}

    def find_class(self, module, name):
        return _Global(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise StorageScanError("its pickle holds a persistent id that is not a storage")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(numel, int) or numel < 0:
            raise StorageScanError(f"storage {key!r} claims {numel!r} elements")
        self.claims[key] = numel * _itemsize(kind)
        return _Storage(key)


def _itemsize(kind) -> int:
    """Bytes per element of a pickled storage type (``torch FloatStorage``, ...)."""
    name = getattr(kind, "name", "")
    if name == "UntypedStorage":
        return 1  # its numel counts bytes
    import warnings

    import torch

    cls = getattr(torch, name, None) if getattr(kind, "module", "") == "torch" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage classes warn that they are deprecated
        dtype = getattr(cls, "dtype", None) if isinstance(cls, type) else None
    if not isinstance(dtype, torch.dtype):
        raise StorageScanError(f"storage type {name!r} is not a torch storage")
    return dtype.itemsize


@dataclass(frozen=True)
class Storages:
    """``compressed``: the first compression method found on a storage member, or None;
    ``nbytes``: the bytes all storages hold once decompressed; ``checked``: whether every
    declared storage was compared with its member (False for a pickle the scan could not
    follow, which then must not be memory-mapped)."""

    compressed: str | None
    nbytes: int
    checked: bool


_METHODS = {zipfile.ZIP_DEFLATED: "DEFLATE", zipfile.ZIP_BZIP2: "BZIP2",
            zipfile.ZIP_LZMA: "LZMA"}


def archive_storages(fh) -> Storages:
    """Check the zip archive open in ``fh``: each storage its pickle declares is a member of
    exactly the claimed size. Raises StorageScanError (tensor named where known)."""
    try:
        archive = zipfile.ZipFile(fh)
        members = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise StorageScanError("the zip archive holds no single data.pkl")
        info = members[pickles[0]]
        if info.file_size > MAX_PICKLE_BYTES:
            raise StorageScanError(f"its data.pkl is {info.file_size} bytes, more than any real one")
        raw = archive.read(info)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            NotImplementedError, RuntimeError) as exc:
        raise StorageScanError(f"damaged zip archive ({exc})") from None
    prefix = pickles[0][: -len("data.pkl")] + "data/"
    stored = [m for n, m in members.items() if n.startswith(prefix)]
    compressed = next((_METHODS.get(m.compress_type, f"method {m.compress_type}")
                       for m in stored if m.compress_type != zipfile.ZIP_STORED), None)
    scanner = _Scanner(io.BytesIO(raw))
    try:
        state = scanner.load()
    except StorageScanError:
        raise
    except Exception:  # noqa: BLE001 - a pickle this scan cannot follow: torch will judge it
        return Storages(compressed, sum(m.file_size for m in stored), checked=False)
    owners = {}
    if isinstance(state, dict):
        for name, value in state.items():
            args = getattr(value, "args", ())
            if args and isinstance(args[0], _Storage):
                owners.setdefault(args[0].key, name)
    total = 0
    for key, claimed in scanner.claims.items():
        member = members.get(prefix + key)
        tensor = owners.get(key) if isinstance(owners.get(key), str) else None
        if member is None:
            raise StorageScanError(f"storage {key!r} is not in the archive", tensor=tensor)
        if member.file_size != claimed:
            raise StorageScanError(f"storage {key!r} claims {claimed} bytes but the archive "
                                   f"holds {member.file_size}", tensor=tensor)
        total += claimed
    return Storages(compressed, total, checked=True)
