"""Read one PyTorch ``.bin`` state dict with the same interface as ``SafetensorsFile``.

Loading goes through ``torch.load(..., weights_only=True)``: the restricted unpickler
that builds only tensors and plain containers, so a checkpoint cannot run code on
load. Zip-format files (``torch.save`` since 1.6) are loaded with ``mmap=True``: the
pickle (names, shapes) is read, tensor storages stay mapped from the file and are paged
in only when used. Legacy non-zip pickles cannot be mapped and are read into memory
whole; they are rare and small in practice.

Sharded ``pytorch_model-0000x-of-0000y.bin`` sets are one ``TorchBinFile`` per shard;
the index that joins them is handled by :mod:`kenstream.io.checkpoint`.

Non-tensor values in the state dict (ints, strings, nested dicts, as some training
scripts save) are *skipped with a warning*: they are not weights, and refusing the whole
checkpoint for them would block real models. A file with no tensor at its top level
raises ``CheckpointError``.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from kenstream import dtypes
from kenstream.errors import CheckpointError, CorruptFileError, UnsafeCheckpointError
from kenstream.io.safetensors_file import TensorInfo, TensorTable

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
        if not self.path.is_file():
            raise CheckpointError("file not found", file=self.path)
        is_zip = zipfile.is_zipfile(self.path)
        if not is_zip:
            with open(self.path, "rb") as f:
                head = f.read(2)
            if head == b"PK":  # a zip's local header, but no readable central directory
                raise CorruptFileError("damaged zip archive (truncated?)", file=self.path)
            if not head or head[0] != _PICKLE_PROTO:
                raise CorruptFileError("neither a zip archive nor a pickle", file=self.path)
        state = self._load(is_zip)
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
            raise CheckpointError("state dict holds no tensors at its top level", file=self.path)

    def _load(self, is_zip):
        try:
            return torch.load(str(self.path), mmap=is_zip, weights_only=True, map_location="cpu")
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
        try:
            code = dtypes.from_torch(tensor.dtype)
        except CheckpointError as exc:
            raise exc.located(file=self.path, tensor=name) from None
        shape = tuple(tensor.shape)
        nbytes = tensor.numel() * dtypes.itemsize(code)
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

    def close(self) -> None:
        """Drop the tensors; the map is released once no array from here is alive."""
        self._tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"TorchBinFile({str(self.path)!r}, {len(self._infos)} tensors)"
