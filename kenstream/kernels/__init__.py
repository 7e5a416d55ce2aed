"""Selection kernels: NumPy in, NumPy out, no I/O.

:func:`select` is the one front door the engine uses, for every rule: it checks the
inputs once, runs the rule's parallel kernel and names bad rows by their global row
number. The public single-rule functions live in :mod:`.ken` (the KEN rule, bit-exact
with the golden vectors) and :mod:`.baselines` (``delta``, ``magnitude``, ``random``);
:mod:`.pack` holds the bit packing and merging kernels of the diff encodings, :mod:`.compare`
verify's comparison of a rebuilt block.
"""

from __future__ import annotations

import numpy as np

from ..errors import MismatchError, SelectionError
from ..settings import METHODS, TIES
from ._inputs import as_array, check_k, check_out, check_row_offset, check_ties
from ._jit import cached, frame_pool, get_threads, keep_freed_memory, thread_count, threads

__all__ = ["METHODS", "TIES", "compiled", "frame_pool", "get_threads", "keep_freed_memory",
           "select", "thread_count", "threads", "warm_up"]


def _selection_kernel(method: str, budget: str = "row"):
    """The numba kernel that selects by ``method`` under ``budget`` (a tensor or global
    budget selects by the scores' bins, whatever the rule)."""
    if budget != "row":
        from .scores import _bins_kernel

        return _bins_kernel
    if method == "ken":
        from ._ken import mask_rows

        return mask_rows
    from . import baselines

    return baselines._random_kernel if method == "random" else baselines._rank_kernel


def compiled(method: str = "ken", budget: str = "row") -> bool:
    """Whether the selection kernel of ``method`` under ``budget`` is in numba's on-disk
    cache; else the first selection in this process compiles it (on 2 cores about 30 s
    for ``ken``, a few seconds for the others)."""
    return cached(_selection_kernel(method, budget))


def warm_up(method: str, budget: str = "row") -> None:
    """Compile the selection kernel of ``method`` under ``budget`` now, on a 2 x 8
    example: every input dtype and shape shares its one compiled signature, so a caller
    that does this before its progress bar starts keeps the compiler's wait out of the
    bar's rate."""
    rows = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(2, 8)
    if budget != "row":
        from .scores import raw_bins

        raw_bins(method, rows, np.zeros_like(rows))
    else:
        select(method, rows, 2, base_rows=np.zeros_like(rows), ties="scrambled")


def select(method: str, ft_rows, k: int, *, base_rows=None, ties: str = "positions",
           seed=0, salt=0, row_offset: int = 0, out=None) -> np.ndarray:
    """Keep-mask of ``ft_rows`` [rows, cols] (bool, same shape) by ``method``.

    - ``ken``: the KEN rule per row; ``ties`` as in :func:`.ken.select_mask` (``scrambled``
      draws each row's order from ``(seed, salt, row_offset + row)``).
    - ``delta`` / ``magnitude``: exactly ``min(k, cols)`` per row (more with
      ``ties="values"``), equal keys by ``ties`` (``scrambled``: from a column drawn from
      ``(seed, salt, row_offset + row)``, wrapping around); ``delta`` needs ``base_rows``
      of the same shape.
    - ``random``: exactly ``min(k, cols)`` per row (``ties`` has no effect), depending only
      on ``(seed, salt, row_offset + row)``.

    ``row_offset`` is the tensor row of ``ft_rows[0]``: error rows are reported as
    ``row_offset + i`` whatever the rule. Inputs may be read-only memory maps (never
    copied whole). Rows run on the current numba thread count (see :func:`threads`).
    Raises SelectionError, NonFiniteError, MismatchError. Cost: the rule's, O(rows * cols)
    for the baselines, about O(rows * cols * 11) for KEN.
    """
    if method not in METHODS:
        raise SelectionError(f"unknown selection method {method!r}",
                             hint=f"choose one of {', '.join(METHODS)}")
    check_ties(ties)
    row_offset = check_row_offset(row_offset)
    ft, kind = as_array(ft_rows, "fine-tune rows")
    if ft.ndim != 2:
        raise SelectionError(f"select takes rows as a 2-D array, got shape {ft.shape}")
    k = check_k(k)
    out = check_out(out, ft.shape)
    if method == "ken":
        from .ken import mask_matrix

        return mask_matrix(ft, kind, k, ties, out, row_offset, seed, salt)
    from .baselines import mask_matrix

    base, base_kind = ft, kind  # read by delta only
    if method == "delta":
        if base_rows is None:
            raise SelectionError("method 'delta' needs the base rows")
        base, base_kind = as_array(base_rows, "base rows")
        if base.shape != ft.shape:
            raise MismatchError(f"base rows {base.shape} differ from fine-tune rows {ft.shape}")
    return mask_matrix(method, ft, kind, base, base_kind, k, out, ties=ties, seed=seed,
                       salt=salt, row_offset=row_offset)
