"""kenstream: streaming KEN pruning of fine-tuned checkpoints into exact sparse diffs."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "select_positions": "kenstream.kernels.ken",
    "select_mask": "kenstream.kernels.ken",
    "kept_counts": "kenstream.kernels.ken",
    "select": "kenstream.kernels",
    "select_mask_method": "kenstream.kernels.baselines",
    "compress": "kenstream.engine.compress",
    "compress_to_size": "kenstream.engine.size",
    "rebuild": "kenstream.engine.rebuild",
    "load": "kenstream.engine.rebuild",
    "verify": "kenstream.engine.verify",
    "info": "kenstream.engine.info",
    "render": "kenstream.viz",
    "KenstreamError": "kenstream.errors",
}


def __getattr__(name):
    # Lazy so that `import kenstream` (e.g. for the CLI's --help) does not compile kernels.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kenstream' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__():
    # The lazy names too, so that tab completion and help() show the API.
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY) + ["__version__"]
