"""The compress plan: what happens to every fine-tune tensor, and which shard holds it.

The plan is a pure function of the two checkpoints' headers, the alignment and the
settings, so an interrupted run and its ``--resume`` agree on every shard's contents.
"""

from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass

from .. import dtypes
from ..errors import CheckpointError, MismatchError, NonFiniteError, SelectionError
from ..format import spec
from ..format.layout import EMPTY_HEADER, encoded_sizes, header_cost
from ..io import safetensors_file
from ..io.rows import TensorRows
from ..io.writer import ShardSet, header_budget
from ..text import counted

# Float dtypes the selection kernels read; F8 tensors are compared and stored whole.
SELECTABLE = ("F64", "F32", "F16", "BF16")


def tensor_salt(name: str) -> int:
    """Per-tensor salt of the rules that draw: tensors of one shape get different masks."""
    return zlib.crc32(name.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class Item:
    """One fine-tune tensor. ``action``: ``select`` or ``store`` (whole, if it changed);
    ``estimate``: the most bytes its entries take (the raw size of a stored tensor)."""

    name: str
    base_name: str | None
    action: str
    reason: str
    dtype: str
    shape: tuple
    k: int | None
    estimate: int
    rows: int
    cols: int
    frames: int = 0
    base_rows: int | None = None  # a resized matrix: rows from here on have no base

    @property
    def params(self) -> int:
        return self.rows * self.cols

    @property
    def with_base(self) -> int:
        """How many leading rows have a base."""
        if self.base_name is None:
            return 0
        return self.rows if self.base_rows is None else self.base_rows


def selection_error(exc, item, rows, brows):
    """A rule's error on rows of ``item``, located: on the base's file when it is about
    the base (a NaN or inf there), and where the base is finite as stored but not in the
    fine-tune's dtype that the rule compares in, said so."""
    if not (isinstance(exc, NonFiniteError) and exc.in_base and brows is not None):
        return exc.located(file=rows.info.file, tensor=item.name)
    if brows.stored != brows.dtype and exc.row is not None:
        over = dtypes.cast_overflows(brows.raw(exc.row, exc.row + 1), brows.stored, brows.dtype)
        if over.any():
            return cast_overflow_error(item, brows, exc.row, int(over.argmax()),
                                       "which the rule compares in: it would be inf")
    return exc.located(file=brows.info.file, tensor=item.name)


def cast_overflow_error(item, brows, row: int, col: int, consequence: str) -> CheckpointError:
    """A base value at ``row``, ``col`` of ``item`` that is finite as stored and inf in the
    fine-tune's dtype, and what that would do (``consequence``)."""
    return CheckpointError(
        f"base value at column {col} does not fit {brows.dtype}, the fine-tune's dtype, "
        + consequence, file=brows.info.file, tensor=item.name, row=row,
        hint=f"--exclude '^{re.escape(item.name)}$' stores the tensor whole")


def base_rows(base, item) -> TensorRows:
    """The base tensor of ``item`` (which has one) as rows in the fine-tune's dtype: all the
    base's rows, which for a resized tensor are fewer than the fine-tune's."""
    total = base.info(item.base_name).shape[0] if item.base_rows is not None else item.rows
    return TensorRows(base, item.base_name, total, item.cols, item.dtype)


QUANTIZED_WEIGHTS = ("weight", "qweight")
"""Last name parts of a module's weight: stored as F8 or integers, the module is quantized."""


def quantized_modules(ft) -> set:
    """Module prefixes (``model.layers.0.mlp.down_proj.``) whose weight is quantized: an F8
    or integer ``weight`` / ``qweight``. Every tensor under such a prefix (the weight, its
    scales, zeros, group indices, bias, ``weight.absmax`` ...) is one unit: dequantising
    needs all of them together, so none may be split from the others."""
    out = set()
    for name in ft.names():
        head, _, last = name.rpartition(".")
        if last in QUANTIZED_WEIGHTS and ft.info(name).dtype not in SELECTABLE:
            out.add(head + ".")
    return out


def _resized(shape, bshape) -> bool:
    """A matrix whose base has other rows but the same columns (a resized vocabulary)."""
    return len(shape) == 2 and len(bshape) == 2 and shape[1] == bshape[1] \
        and shape[0] != bshape[0]


def make_items(ft, base, alignment, settings, *, version: int = spec.FORMAT_VERSION,
               frame_elems: int = spec.DEFAULT_FRAME_ELEMS) -> list:
    """Decide every fine-tune tensor's fate; raises MismatchError for unrelated models.

    Format 2 cuts stacked tensors into rows by `spec.rows_cols_v2`, every stored tensor
    into frames of about ``frame_elems`` values, keeps quantized units whole (reason
    ``quantized``) and codes a resized matrix against the rows it shares with its base.
    """
    items = []
    reshaped = []  # warned about only once the pair is known to be one model
    stacked = []  # format 1's rows of a stack of matrices: a whole matrix each
    quantized = quantized_modules(ft)
    for name in ft.names():
        info = ft.info(name)
        shape = tuple(int(d) for d in info.shape)
        rows, cols = spec.rows_cols(shape) if version == 1 else spec.rows_cols_v2(name, shape)
        base_name = alignment.pairs.get(name)
        nbytes = int(info.nbytes)
        base_rows = None
        if base_name is not None and version >= 2:
            bshape = tuple(base.info(base_name).shape)
            if _resized(shape, bshape):
                base_rows = min(rows, bshape[0])
        frames = 0 if version == 1 else len(spec.frame_ranges(rows, cols, frame_elems,
                                                                base_rows))

        def item(action, reason, k, estimate, base_name=base_name):
            items.append(Item(name, base_name, action, reason, info.dtype, shape, k, estimate,
                              rows, cols, frames, base_rows if base_name else None))

        if base_name is None:
            item("store", "new", None, nbytes)
            continue
        binfo = base.info(base_name)
        if tuple(binfo.shape) != shape and base_rows is None:
            reshaped.append(f"{name}: shape {list(shape)} differs from the base's "
                            f"{list(binfo.shape)}; stored whole")
            item("store", "reshaped", None, nbytes, None)
        elif any(name.startswith(prefix) for prefix in quantized):
            if version == 1:
                raise SelectionError(
                    "is part of a quantized unit (its weight is stored as F8 or integers); "
                    "format 1 cannot keep a unit whole, and pruning its float scales alone "
                    "would rebuild a wrong model", file=info.file, tensor=name,
                    hint="drop --format-version 1: format 2 stores such units whole")
            item("store", "quantized", None, nbytes)
        elif info.dtype not in SELECTABLE or binfo.dtype not in SELECTABLE:
            item("store", "non-float", None, nbytes)
        elif not settings.wants(name):
            item("store", "excluded", None, nbytes)
        else:
            if version == 1 and (rows, cols) != spec.rows_cols_v2(name, shape):
                stacked.append(f"'{name}' {list(shape)}")
            k = settings.k_for(cols)
            kept = rows * min(k, cols)
            est = min(encoded_sizes(rows, cols, kept, dtypes.itemsize(info.dtype), False))
            item("select", "selected", k, est)
    matched = len(alignment.pairs)
    if matched == len(alignment.tied):
        # A head paired with the base's embedding by shape alone says nothing of the pair:
        # a BERT base and a Llama fine-tune of one vocabulary width met that way.
        raise MismatchError("no tensor name of the fine-tune matches the base", file=ft.root)
    if len(reshaped) * 2 > matched:
        raise MismatchError(f"{len(reshaped)} of {matched} matching tensors differ in shape",
                            file=ft.root)
    for message in reshaped:
        warnings.warn(message, stacklevel=2)
    total = sum(i.params for i in items)
    based = sum(i.params for i in items if i.base_name is not None)
    if based * 2 < total:
        warnings.warn(f"only {based / total:.0%} of the fine-tune's parameters have a base "
                      f"tensor ({len(alignment.new)} of {len(items)} tensors are new): is the "
                      "base the model it was fine-tuned from?", stacklevel=2)
    if stacked:
        warnings.warn(f"format 1 cuts {len(stacked)} stacked tensor(s) ({stacked[0]} first) "
                      "into one row per matrix, not one per output unit, so a row's k is "
                      "spread over whole matrices; format 2 (the default) selects them as "
                      "their unfused matrices", stacklevel=2)
    for message in _setting_warnings(items, settings):
        warnings.warn(message, stacklevel=2)
    return items


def _setting_warnings(items, settings) -> list:
    """Lines for settings that do not do what they seem to ask: a ``--k`` or ``--keep``
    that keeps whole rows or a single value a row, an ``--include`` that selects nothing."""
    selected = [i for i in items if i.action == "select"]
    out = []
    if settings.include is not None and not selected:
        out.append(f"--include {settings.include!r} selects no tensor: every changed tensor "
                   "is stored whole")
    if settings.budget != "row":  # k per row is not what a tensor or global budget keeps
        return out
    asked_whole = settings.keep is not None and settings.keep >= 1
    whole = [i for i in selected if i.k >= i.cols and i.cols > 1 and not asked_whole]
    if whole:
        what = f"--k {settings.k}" if settings.k is not None else f"--keep {settings.keep}"
        out.append(f"{what} keeps every value of {len(whole)} of {len(selected)} selected "
                   f"tensors (rows of at most {max(i.cols for i in whole):,} values, e.g. "
                   f"{whole[0].name}): they are stored whole")
    if settings.keep is not None:
        single = [i for i in selected if i.k == 1 and i.cols > 1]
        if single:
            # round() takes 0.5 to 0 (half to even), so from keep * cols <= 0.5 up the
            # floor of one value keeps more than the keep asked
            over = [i for i in single if settings.keep * i.cols <= 0.5]
            extra = (f"; {len(over)} of them keep more than the {settings.keep:g} asked"
                     if over else "")
            out.append(f"--keep {settings.keep:g} keeps one value a row in "
                       f"{counted(len(single), 'tensor')} (e.g. {single[0].name}, rows of "
                       f"{single[0].cols:,})" + extra)
    return out


def plan_shards(out, items, shard_size: int, ties: str = "positions",
                header_limit: int | None = None, version: int = spec.FORMAT_VERSION) -> ShardSet:
    """Diff shards: plan items in fine-tune order, filled by estimated size and by header
    size, so that no shard's header passes ``header_limit`` (default: the reader's
    ``MAX_HEADER_BYTES``; a shard of ~276k tensors would). Cost O(len(items))."""
    if header_limit is None:
        header_limit = safetensors_file.MAX_HEADER_BYTES  # looked up now: tests lower it
    cost, budget = header_budget(header_limit, EMPTY_HEADER, lambda item: item.name,
                                 lambda item: header_cost(item, ties, version))
    return ShardSet.plan(out, items, lambda item: item.estimate, shard_size,
                         lambda i, n: spec.shard_name(i + 1, n), cost, budget)
