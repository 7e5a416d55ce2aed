"""Read one PyTorch ``.bin`` state dict with the same interface as ``SafetensorsFile``.

Loading goes through ``torch.load(..., weights_only=True)``: the restricted unpickler
that builds only tensors and plain containers, so a checkpoint cannot run code on
load. Zip-format files (``torch.save`` since 1.6) are loaded with ``mmap=True``: the
pickle (names, shapes) is read, tensor storages stay mapped from the file and are paged
in only when used. Legacy non-zip pickles cannot be mapped and are read into memory
whole; they are rare and small in practice.

A map is only as good as what it maps, so before loading, the archive is checked:

- storages stored compressed (a zip re-packed with DEFLATE) cannot be mapped, since the
  map would show the compressed bytes as weights; such a file is loaded into memory
  instead (up to ``MAX_INFLATE_BYTES``) or refused;
- every storage the pickle declares must be a member of the archive of exactly the size
  it claims (:mod:`._torch_scan` reads the declarations without building anything);
- after loading, a tensor must be on the CPU (a ``meta`` tensor holds no data) and its
  storage must hold all its elements (a broadcast view, ``zeros(1).expand(n, n)``, would
  otherwise be copied into ``n * n`` elements of fresh memory).

Sharded ``pytorch_model-0000x-of-0000y.bin`` sets are one ``TorchBinFile`` per shard;
the index that joins them is handled by :mod:`kenstream.io.checkpoint`.

Non-tensor values in the state dict (ints, strings, nested dicts, as some training
scripts save) are *skipped with a warning*: they are not weights, and refusing the whole
checkpoint for them would block real models. A file with no tensor at its top level
raises ``CheckpointError``.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from kenstream import dtypes
from kenstream.errors import CheckpointError, CorruptFileError, UnsafeCheckpointError
from kenstream.io._torch_scan import StorageScanError, archive_storages
from kenstream.io.safefs import open_regular
from kenstream.io.safetensors_file import MAPPED, TensorInfo, TensorTable

MAX_INFLATE_BYTES = 2 << 30
"""A .bin whose storages are compressed is read into memory only up to this size."""

_PICKLE_PROTO = 0x80  # every pickle of protocol >= 2 (all torch.save output) starts with it


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# Phrases of torch's weights-only unpickler that mean "refused an object", as opposed
# to "could not parse the bytes" (e.g. "Unsupported operand"), which is damage.
_REFUSALS = ("GLOBAL", "reduce", "Can only build", "Can only create", "must be imported")


def _unsafe_reason(message: str) -> str | None:
    found = re.search(r"GLOBAL (\S+) was not an allowed global", message)
    if found:
        return f"its pickle refers to {found.group(1)!r}, which weights-only loading refuses"
    if any(phrase in message for phrase in _REFUSALS):
        return "its pickle holds objects other than tensors and plain containers"
    return None


class TorchBinFile(TensorTable):
    """A weights-only PyTorch state dict file.

    Opening unpickles the file's metadata (cost: O(number of tensors) for zip files,
    O(file size) for legacy pickles) and keeps the tensors, which for zip files are
    views of a memory map. :meth:`array` returns read-only NumPy views of them.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        with os.fdopen(open_regular(self.path), "rb") as fh:  # no FIFO, no device
            self._size = os.fstat(fh.fileno()).st_size
            is_zip = zipfile.is_zipfile(fh)
            fh.seek(0)
            head = fh.read(2)
            mmap = is_zip and self._check_archive(fh)
        if not is_zip:
            if head == b"PK":  # a zip's local header, but no readable central directory
                raise CorruptFileError("damaged zip archive (truncated?)", file=self.path)
            if not head or head[0] != _PICKLE_PROTO:
                raise CorruptFileError("neither a zip archive nor a pickle", file=self.path)
        state = self._load(mmap)
        if not isinstance(state, dict):
            raise CheckpointError(
                f"holds a {type(state).__name__}, not a state dict of tensors", file=self.path)
        self._tensors: dict[str, torch.Tensor] = {}
        self._infos: dict[str, TensorInfo] = {}
        skipped = []
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                skipped.append(repr(name))
                continue
            self._add(name, value)
        if skipped:
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            warnings.warn(f"{self.path}: skipped {len(skipped)} non-tensor entries ({shown})",
                          stacklevel=2)
        if not self._tensors:
            raise CheckpointError("state dict holds no tensors at its top level", file=self.path,
                                  hint="a training checkpoint nests its weights (for example "
                                       "under 'state_dict'); save that dict on its own")
        if mmap:
            MAPPED[id(self)] = (os.fsencode(self.path), self._size)

    def _check_archive(self, fh) -> bool:
        """Check the zip's storages against its pickle; True if they may be memory-mapped."""
        try:
            storages = archive_storages(fh)
        except StorageScanError as exc:
            raise CorruptFileError(exc.message, file=self.path, tensor=exc.tensor) from None
        if storages.compressed or not storages.checked:
            # Read into memory by torch's own zip reader, which decompresses members and
            # checks every storage against its member; only files of moderate size.
            if storages.nbytes > MAX_INFLATE_BYTES:
                what = (f"its tensor data is stored compressed ({storages.compressed}) inside "
                        "the zip" if storages.compressed else
                        "its pickle declares storages in a way kenstream cannot check")
                raise CheckpointError(
                    f"{what}, {storages.nbytes} bytes in all; only uncompressed, checkable "
                    "archives are memory-mapped", file=self.path,
                    hint="re-save it with torch.save, or convert it to safetensors")
            return False
        return True

    def _load(self, mmap):
        try:
            return torch.load(str(self.path), mmap=mmap, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            reason = _unsafe_reason(str(exc))
            if reason is not None:
                raise UnsafeCheckpointError(reason, file=self.path) from None
            raise CorruptFileError("cannot be read as a torch checkpoint (invalid pickle data)",
                                   file=self.path) from None
        except Exception as exc:  # torch reports damage as RuntimeError, EOFError, KeyError...
            reason = _first_line(str(exc)) or type(exc).__name__
            raise CorruptFileError(f"cannot be read as a torch checkpoint ({reason})",
                                   file=self.path) from None

    def _add(self, name, tensor):
        if tensor.layout != torch.strided:
            raise CheckpointError(f"{tensor.layout} tensors are not supported", file=self.path, tensor=name)
        if tensor.device.type != "cpu":
            raise CheckpointError(f"is a {tensor.device.type} tensor, which holds no data here",
                                  file=self.path, tensor=name,
                                  hint="save the state dict from CPU tensors")
        try:
            code = dtypes.from_torch(tensor.dtype)
        except CheckpointError as exc:
            raise exc.located(file=self.path, tensor=name) from None
        shape = tuple(tensor.shape)
        nbytes = tensor.numel() * dtypes.itemsize(code)
        held = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
        if nbytes and nbytes > held:
            # A broadcast or overlapping view: copying it out would make up the missing bytes.
            raise CorruptFileError(
                f"shape {list(shape)} needs {nbytes} bytes but its storage holds {max(held, 0)} "
                "(an expanded or overlapping view)", file=self.path, tensor=name,
                hint="save tensor.contiguous() instead")
        self._tensors[name] = tensor.detach()
        self._infos[name] = TensorInfo(name, code, shape, nbytes, None, self.path)

    def array(self, name: str) -> np.ndarray:
        """Read-only C-contiguous NumPy array of ``name`` in its storage dtype and shape.

        A view sharing the mapped storage (no copy), except for a tensor saved as a
        non-contiguous view (e.g. a transpose), which is copied into C order.
        """
        info = self.info(name)
        tensor = self._tensors.get(name)
        if tensor is None:
            raise CheckpointError("file is closed", file=self.path, tensor=name)
        storage = dtypes.storage_dtype(info.dtype)
        out = tensor.view(dtypes.torch_storage(info.dtype)).numpy().view(storage)
        if not out.flags.c_contiguous:
            out = out.copy(order="C")
        out.flags.writeable = False
        return out

    def prefetch(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Accepted for interface parity; does nothing (torch owns the mapping)."""
        self.info(name)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Accepted for interface parity; does nothing.

        torch owns the mapping and exposes no way to advise it. Its pages are clean and
        file-backed, so the kernel reclaims them under memory pressure anyway.
        """
        self.info(name)

    def check_intact(self, name: str | None = None) -> None:
        """Raise CorruptFileError if the file is now shorter than when it was opened (its
        storages are mapped: reading past the new end would be a bus error)."""
        try:
            size = os.stat(self.path).st_size
        except OSError:
            size = 0
        if size < self._size:
            raise CorruptFileError(f"shrank from {self._size} to {size} bytes while being read "
                                   "(changed by another program?)", file=self.path, tensor=name)

    def close(self) -> None:
        """Drop the tensors; the map is released once no array from here is alive."""
        self._tensors = {}
        MAPPED.pop(id(self), None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"TorchBinFile({str(self.path)!r}, {len(self._infos)} tensors)"
