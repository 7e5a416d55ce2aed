"""Verify a diff against its inputs, streaming row blocks like rebuild.

Memory stays near a few row blocks whatever the model's size: every tensor is rebuilt
block by block and compared, bit for bit, with the same rows of the fine-tune (at kept
positions) and of the base (elsewhere); the reconstruction error is accumulated per
block in float64.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from .. import dtypes, kernels
from ..errors import VerifyError
from ..format import spec
from ..io.checkpoint import Checkpoint
from ..io.diff_reader import DiffReader
from ..io.rows import TensorRows
from ..progress import bar
from .blocks import TensorBlocks
from .executor import Source, VerifyJob, check_executor, run_shards


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of ``a`` as unsigned integers of its width, same shape."""
    return np.ascontiguousarray(a).view(np.dtype(f"u{a.itemsize}"))


def _as_f64(arr, code) -> np.ndarray:
    """Values of ``arr`` (storage dtype of ``code``) as float64, for error norms."""
    if code == "F64" or not dtypes.is_float(code):
        return np.asarray(arr, dtype=np.float64)
    return dtypes.widen_to_f32(np.ascontiguousarray(arr), code).astype(np.float64)


def verify(diff, base, finetuned=None, *, force=False, quiet=False,
           block_elems: int = spec.DEFAULT_BLOCK_ELEMS, threads=None, executor="local",
           ray_address=None) -> dict:
    """Check shard hashes and the base's identity; with ``finetuned``, every value.

    Returns ``{"ok", "problems", "tensors": {name: {"encoding", "kept_fraction",
    "rel_error"}}}`` and raises VerifyError (exit 1) listing the first problem when
    anything mismatches. Cost: reads every input once; memory a few row blocks.
    ``executor="ray"`` checks the tensors of each diff shard in a Ray task (``threads``
    CPUs each); the report is the same.
    """
    check_executor(executor)
    with kernels.threads(threads), DiffReader(diff) as d, Checkpoint.open(str(base)) as b:
        d.check_hashes()
        d.check_base(b, force=force)
        ft = Checkpoint.open(str(finetuned)) if finetuned is not None else None
        try:
            counts = {n: r.params for n, r in d.records.items()}
            job = VerifyJob(str(d.path), Source.of(b), None if ft is None else Source.of(ft),
                            counts, block_elems, kernels.get_threads(), d.forced_base)
            total = sum(counts.values())
            with bar(total if ft else 0, "verify", quiet or ft is None) as progress:
                tensors, problems = run_shards(job, _groups(d.records), progress,
                                               executor=executor, handles=(d, b, ft),
                                               ray_address=ray_address, quiet=quiet)
        finally:
            if ft is not None:
                ft.close()
    report = {"ok": not problems, "problems": problems, "tensors": tensors}
    if problems:
        err = VerifyError(f"{len(problems)} mismatch(es); first: {problems[0]}", file=diff)
        err.report = report
        raise err
    return report


def _groups(records) -> list:
    """(diff shard, tensor names): runs of tensors in diff order by the shard holding them
    (an unchanged tensor joins the run it stands in); one Ray task each."""
    groups, key = [], None
    for name, rec in records.items():
        key = rec.shard or key
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append(name)
    return groups


def check_tensors(d, b, ft, names, progress, block_elems) -> tuple:
    """(name -> report row, problems) of tensors ``names`` of diff ``d`` over base ``b``;
    with a fine-tune ``ft``, every value is compared and counted on ``progress``."""
    rows, problems = OrderedDict(), []
    for name in names:
        rec = d.records[name]
        row = {"encoding": rec.encoding,
               "kept_fraction": 0.0 if rec.encoding == "unchanged"
               else rec.kept / max(1, rec.params)}
        blocks = TensorBlocks(name, d, b, block_elems)
        if ft is not None and name in ft:
            row.update(_compare(name, blocks, ft, problems))
        else:
            if ft is not None:
                problems.append(f"{name}: not in the fine-tune")
            blocks.release()
        if ft is not None:
            progress.update(rec.params)
        rows[name] = row
    return rows, problems


def _compare(name, blocks: TensorBlocks, ft, problems) -> dict:
    """Kept positions equal the fine-tune and the rest equal the base, bit for bit;
    returns the tensor's relative reconstruction error ||rebuilt - ft|| / ||ft - base||."""
    rec = blocks.rec
    info = ft.info(name)
    if tuple(info.shape) != tuple(rec.shape) or info.dtype != rec.dtype:
        problems.append(f"{name}: fine-tune has {info.dtype}{list(info.shape)}, diff has "
                        f"{rec.dtype}{list(rec.shape)}")
        blocks.release()
        return {}
    ft_rows = TensorRows(ft, name, rec.rows, rec.cols)
    found = set()
    change = error = 0.0
    out = np.empty(blocks.shape(0), dtype=blocks.dtype)
    for i, (r0, r1) in enumerate(blocks.ranges):
        if i + 1 < len(blocks.ranges):
            blocks.prefetch(i + 1)
            ft_rows.prefetch(*blocks.ranges[i + 1])
        base_rows = blocks.base_rows(i)
        built = out[:r1 - r0]
        blocks.build(i, built, base_rows)
        kept = blocks.kept(i)
        got, want = _bits(built), _bits(ft_rows.raw(r0, r1))
        if not np.array_equal(got[kept], want[kept]):
            found.add("a kept value differs from the fine-tune")
        if rec.encoding == "unchanged" and not np.array_equal(got, want):
            found.add("recorded unchanged but the fine-tune differs from the base")
        if base_rows is not None:
            reset = ~kept
            if not np.array_equal(got[reset], _bits(base_rows)[reset]):
                found.add("a reset value differs from the base")
            ftf = _as_f64(ft_rows.raw(r0, r1), rec.dtype)
            change += float(np.sum(np.square(ftf - _as_f64(base_rows, rec.dtype))))
            error += float(np.sum(np.square(_as_f64(built, rec.dtype) - ftf)))
        ft_rows.release(r0, r1)
    blocks.release()
    problems.extend(f"{name}: {what}" for what in sorted(found))
    if rec.encoding == "dense":
        return {"rel_error": 0.0}
    change, error = math.sqrt(change), math.sqrt(error)
    return {"rel_error": error / change if change > 0 else (0.0 if error == 0 else math.inf)}
