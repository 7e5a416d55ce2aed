"""Verify a diff against its inputs, streaming row blocks like rebuild.

Memory stays near a few row blocks whatever the model's size: every tensor is rebuilt
block by block and compared, bit for bit, with the same rows of the fine-tune (at kept
positions) and of the base (elsewhere); the reconstruction error is accumulated per
block. Without a fine-tune every frame is still decoded, so its checks and checksum run.
Blocks are checked on a pool of threads; under ``executor="ray"`` each diff shard's
tensors are a Ray task (:mod:`.executor`).
"""

from __future__ import annotations

import math
from collections import OrderedDict

from .. import kernels
from ..errors import VerifyError
from ..format import spec
from ..io.checkpoint import Checkpoint
from ..io.diff_reader import DiffReader
from ..io.rows import TensorRows
from ..kernels.compare import DIFFERS, KEPT_DIFFERS, RESET_DIFFERS, compare_block
from ..progress import bar
from .blocks import TensorBlocks, ThreadBuffers, check_shapes, compile_first
from .executor import Source, VerifyJob, check_executor, executor_ready, run_shards


def verify(diff, base, finetuned=None, *, force=False, quiet=False, threads=None,
           block_elems: int = spec.DEFAULT_BLOCK_ELEMS, executor="local",
           ray_address=None) -> dict:
    """Check shard hashes, the base's identity and that every tensor decodes (every frame's
    checks and checksum); with ``finetuned``, also every value against it.

    Returns ``{"ok", "problems", "tensors": {name: {"encoding", "kept_fraction",
    "rel_error"}}}`` and raises VerifyError (exit 1) listing the first problem when
    anything mismatches. Blocks are checked on ``threads`` threads (default: every core).
    ``executor="ray"`` checks the tensors of each diff shard in a Ray task (``threads``
    CPUs each); the report is the same. Cost: reads every input once; memory a few row
    blocks a thread.
    """
    check_executor(executor)
    with kernels.threads(threads), DiffReader(diff) as d, Checkpoint.open(str(base)) as b, \
            executor_ready(executor, ray_address=ray_address, quiet=quiet,
                           threads=kernels.get_threads(),
                           groups=len(groups := _groups(d.records))):
        d.check_hashes(threads=kernels.get_threads())
        d.check_base(b, force=force)
        check_shapes(d, b)
        ft = Checkpoint.open(str(finetuned)) if finetuned is not None else None
        try:
            counts = {n: r.params for n, r in d.records.items()}
            job = VerifyJob(str(d.path), Source.of(b), None if ft is None else Source.of(ft),
                            counts, block_elems, kernels.get_threads(), d.forced_base)
            total = sum(counts.values())
            compile_first(d.records, executor, quiet, compare=ft is not None)
            with bar(total, "verify", quiet) as progress:
                tensors, problems = run_shards(job, groups, progress,
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
    """(name -> report row, problems) of tensors ``names`` of diff ``d`` over base ``b``,
    on a pool of the current thread count, each counted on ``progress`` when done; with a
    fine-tune ``ft``, every value is compared; without, every block is decoded."""
    rows, problems = OrderedDict(), []
    buffers = ThreadBuffers()  # each pool thread's block buffers, kept across tensors
    with kernels.frame_pool(kernels.get_threads(), "kenstream-verify") as pool:
        for name in names:
            rec = d.records[name]
            row = {"encoding": rec.encoding,
                   "kept_fraction": 0.0 if rec.encoding == "unchanged"
                   else rec.kept / max(1, rec.params)}
            blocks = TensorBlocks(name, d, b, block_elems)
            if ft is not None and name in ft:
                row.update(_compare(name, blocks, ft, problems, pool, buffers))
            else:
                if ft is not None:
                    problems.append(f"{name}: not in the fine-tune")
                _decode_all(blocks, pool, buffers)
            progress.update(rec.params)
            rows[name] = row
    return rows, problems


def _decode_all(blocks: TensorBlocks, pool, buffers) -> None:
    """Decode every block (the content checks and checksums of every frame) and drop it."""
    def build(i):
        blocks.build(i, buffers.get("built", blocks.shape(i), blocks.dtype))

    for _ in pool.map(build, range(len(blocks.ranges))):
        pass
    blocks.release()


def _check_block(blocks: TensorBlocks, ft_rows: TensorRows, i: int, buffers):
    """(problems found, ||ft - base||^2, ||rebuilt - ft||^2) of block ``i``, compared by
    :func:`.kernels.compare.compare_block` in the calling thread's ``buffers``."""
    rec = blocks.rec
    r0, r1 = blocks.ranges[i]
    if rec.params == 0:  # nothing to compare, however many (empty) rows
        return set(), 0.0, 0.0
    shape, dtype = blocks.shape(i), blocks.dtype
    base_rows = blocks.base_rows(i, buffers.get("base", shape, dtype))
    kept = blocks.kept(i)  # before build, which releases the diff's pages it read
    built = buffers.get("built", shape, dtype)
    blocks.build(i, built, base_rows)
    want = ft_rows.read_into(r0, r1, buffers.get("finetuned", shape, dtype))
    flags, change, error = compare_block(built, want, base_rows, kept, rec.dtype)
    found = set()
    if flags & KEPT_DIFFERS:
        found.add("a kept value differs from the fine-tune")
    if flags & RESET_DIFFERS:
        found.add("a reset value differs from the base")
    if rec.encoding == "unchanged" and flags & DIFFERS:
        found.add("recorded unchanged but the fine-tune differs from the base")
    # The fine-tune's pages, where its reader copies through the map (.bin); the base's and
    # the diff's were dropped by build, and the comparison reads only the buffers.
    ft_rows.release(r0, r1)
    return found, change, error


def _compare(name, blocks: TensorBlocks, ft, problems, pool, buffers) -> dict:
    """Kept positions equal the fine-tune and the rest equal the base, bit for bit, block
    by block on the pool's threads; returns the tensor's relative reconstruction error
    ||rebuilt - ft|| / ||ft - base||."""
    rec = blocks.rec
    info = ft.info(name)
    if tuple(info.shape) != tuple(rec.shape) or info.dtype != rec.dtype:
        problems.append(f"{name}: fine-tune has {info.dtype}{list(info.shape)}, diff has "
                        f"{rec.dtype}{list(rec.shape)}")
        blocks.release()
        return {}
    ft_rows = TensorRows(ft, name, rec.rows, rec.cols)
    found, change, error = set(), 0.0, 0.0
    for got in pool.map(lambda i: _check_block(blocks, ft_rows, i, buffers),
                        range(len(blocks.ranges))):
        found |= got[0]
        change += got[1]
        error += got[2]
    blocks.release()
    problems.extend(f"{name}: {what}" for what in sorted(found))
    if rec.encoding == "dense" or rec.base_name is None:
        return {"rel_error": 0.0}
    change, error = math.sqrt(change), math.sqrt(error)
    return {"rel_error": error / change if change > 0 else (0.0 if error == 0 else math.inf)}
