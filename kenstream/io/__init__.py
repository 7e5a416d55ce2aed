"""Reading checkpoints: safetensors and PyTorch ``.bin`` files, shard indexes, the hub cache.

This layer only reads and validates; it never imports the selection kernels. The
public surface is :class:`Checkpoint` plus the single-file readers and identity helpers.
torch and huggingface_hub are imported only when a ``.bin`` file or a hub reference
needs them.
"""

from __future__ import annotations

from kenstream.io.checkpoint import Checkpoint
from kenstream.io.fingerprint import fingerprint, sha256_file
from kenstream.io.safetensors_file import SafetensorsFile, TensorInfo

_LAZY = {"TorchBinFile": "kenstream.io.torch_bin", "resolve": "kenstream.io.hub"}


def __getattr__(name):
    # Lazy so that reading safetensors never pays for importing torch or huggingface_hub.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kenstream.io' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["Checkpoint", "SafetensorsFile", "TensorInfo", "TorchBinFile", "fingerprint",
           "resolve", "sha256_file"]
