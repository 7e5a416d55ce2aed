"""kenstream: streaming KEN pruning of fine-tuned checkpoints into exact sparse diffs."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "select_positions": "kenstream.select",
    "select_mask": "kenstream.select",
    "kept_counts": "kenstream.select",
    "compress": "kenstream.engine",
    "rebuild": "kenstream.rebuilder",
    "load": "kenstream.rebuilder",
    "verify": "kenstream.verifier",
    "info": "kenstream.verifier",
    "render": "kenstream.viz",
    "select_mask_method": "kenstream.methods",
}


def __getattr__(name):
    # Lazy so that `import kenstream` (e.g. for the CLI's --help) does not compile kernels.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kenstream' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY) + ["__version__"]
