"""The engine: the one place that joins checkpoint I/O, the format and the kernels.

``compress`` (with its planner and per-shard loop), ``rebuild`` and ``load``,
``verify`` and ``info``; :mod:`.blocks` is the diff side of the streaming block layer;
:mod:`.executor` runs each output shard's work in a loop here, or as Ray tasks
(:mod:`.distributed`, imported only for ``executor="ray"``).
"""

from __future__ import annotations

from .compress import compress
from .info import info, layer_of
from .rebuild import load, rebuild
from .verify import verify

__all__ = ["compress", "info", "layer_of", "load", "rebuild", "verify"]
