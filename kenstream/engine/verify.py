"""Verify a diff against its inputs, streaming row blocks like rebuild.

Memory stays near a few row blocks whatever the model's size: every tensor is rebuilt
block by block and compared, bit for bit, with the same rows of the fine-tune (at kept
positions) and of the base (elsewhere); the reconstruction error is accumulated per
block. Without a fine-tune every frame is still decoded, so its checks and checksum run.
Blocks are checked on a pool of threads, one tensor after another with no wait between
them; under ``executor="ray"`` each diff shard's tensors are a Ray task (:mod:`.executor`).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

from .. import kernels
from ..errors import VerifyError
from ..format import spec
from ..io.checkpoint import Checkpoint
from ..io.diff_reader import DiffReader
from ..io.rows import TensorRows
from ..kernels.compare import (DIFFERS, KEPT_DIFFERS, RESET_DIFFERS, compare_block,
                                first_rows)
from ..progress import bar, say
from ..text import natural_key
from .blocks import TensorBlocks, ThreadBuffers, check_shapes, compile_first
from .executor import Source, VerifyJob, check_executor, executor_ready, run_shards


def verify(diff, base, finetuned=None, *, force=False, quiet=False, threads=None,
           block_elems: int = spec.DEFAULT_BLOCK_ELEMS, executor="local",
           ray_address=None) -> dict:
    """Check shard hashes, the base's identity and that every tensor decodes (every frame's
    checks and checksum); with ``finetuned``, also every value against it.

    Returns ``{"ok", "problems", "tensors": {name: {"encoding", "kept_fraction",
    "rel_error"}}}`` (tensors in numeric order of their names, as `info` lists them;
    ``rel_error`` None where it is no finite number, and without ``finetuned``) and raises VerifyError (exit 1)
    listing the first problem when anything mismatches. Blocks are checked on ``threads``
    threads (default: every core). ``executor="ray"`` checks the tensors of each diff
    shard in a Ray task (``threads`` CPUs each); the report is the same. Cost: reads
    every input once; memory a few row blocks a thread.
    """
    check_executor(executor)
    with kernels.threads(threads), DiffReader(diff) as d, \
            Checkpoint.open(d.base_ref(base, quiet)) as b, \
            executor_ready(executor, ray_address=ray_address, quiet=quiet,
                           threads=kernels.get_threads(),
                           groups=len(groups := _groups(d.records))):
        d.check_hashes(threads=kernels.get_threads())
        d.companions()  # the files a rebuild copies are there, as listed
        diffs = d.check_base(b, force=force)
        if diffs:  # a warning under --force; else a note, which -q silences
            say(d.base_note(diffs), quiet and d.content_checked)
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
            if ft is not None:
                # Rebuilding this diff gives no such tensor, so it is not that fine-tune.
                problems += [f"{name}: in the fine-tune, not in the diff"
                             for name in ft.names() if name not in d.records]
        finally:
            if ft is not None:
                ft.close()
    # Tensors as `info` and the table list them (layers.2 before layers.10); problems in
    # the order they were found.
    tensors = dict(sorted(tensors.items(), key=lambda kv: natural_key(kv[0])))
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
    fine-tune ``ft``, every value is compared; without, every block is decoded.

    Tensors follow one another on the pool with no wait between them: the next tensors'
    blocks are queued while one's last block is checked (most tensors are one block, which
    alone would keep one thread busy), at most a few blocks a thread ahead; results are
    gathered tensor by tensor, in order."""
    rows, problems = OrderedDict(), []
    buffers = ThreadBuffers()  # each pool thread's block buffers, kept across tensors
    threads = kernels.get_threads()
    ahead = 2 * threads + 2  # blocks queued beyond the tensor being gathered
    window = deque()
    # On an error the pool's exit waits for the few blocks already queued (at most `ahead`
    # beyond the tensor that failed); their results are not looked at.
    with kernels.frame_pool(threads, "kenstream-verify") as pool:
        for name in names:
            window.append(_Checking(name, d, b, ft, pool, buffers, block_elems))
            while len(window) > 1 and sum(len(c.futures) for c in window) > ahead:
                window.popleft().finish(rows, problems, progress)
        while window:
            window.popleft().finish(rows, problems, progress)
    return rows, problems


class _Checking:
    """One tensor's blocks, submitted to the pool: checked against the fine-tune where it
    has the tensor, else decoded; `finish` gathers them."""

    def __init__(self, name, d, b, ft, pool, buffers, block_elems):
        rec = d.records[name]
        self.name, self.rec = name, rec
        self.row = {"encoding": rec.encoding,
                    "kept_fraction": 0.0 if rec.encoding == "unchanged"
                    else rec.kept / max(1, rec.params), "rel_error": None}
        self.problems, self.futures, self.compared = [], [], False
        self.blocks = blocks = TensorBlocks(name, d, b, block_elems)
        count = len(blocks.ranges)
        if ft is not None and name in ft:
            info = ft.info(name)
            if tuple(info.shape) != tuple(rec.shape) or info.dtype != rec.dtype:
                self.problems.append(f"{name}: fine-tune has {info.dtype}{list(info.shape)}, "
                                     f"diff has {rec.dtype}{list(rec.shape)}")
                return
            ft_rows = TensorRows(ft, name, rec.rows, rec.cols)
            self.compared = True
            self.futures = [pool.submit(_check_block, blocks, ft_rows, i, buffers)
                            for i in range(count)]
            return
        if ft is not None:
            self.problems.append(f"{name}: not in the fine-tune")
        self.futures = [pool.submit(_decode_block, blocks, i, buffers) for i in range(count)]

    def finish(self, rows, problems, progress) -> None:
        """Wait for the blocks, then add the tensor's row and problems."""
        found, change, error = {}, 0.0, 0.0
        for future in self.futures:
            got = future.result()
            if self.compared:
                for what, row in got[0].items():
                    found[what] = min(row, found.get(what, row))
                change += got[1]
                error += got[2]
        self.futures = []
        self.blocks.release()
        problems.extend(self.problems)
        problems.extend(f"{self.name}: {what} (first in row {found[what]})"
                        for what in sorted(found))
        if self.compared:
            rec = self.rec
            if rec.encoding == "dense" or rec.base_name is None:
                self.row["rel_error"] = 0.0
            else:
                # None (JSON null) where the ratio is no finite number: the rebuilt
                # tensor differs where the fine-tune equals the base, or an inf is involved.
                change, error = math.sqrt(change), math.sqrt(error)
                ratio = 0.0 if error == 0 else (error / change if change > 0 else math.inf)
                self.row["rel_error"] = ratio if math.isfinite(ratio) else None
        progress.update(self.rec.params)
        rows[self.name] = self.row


def _decode_block(blocks: TensorBlocks, i: int, buffers) -> None:
    """Decode block ``i`` (the content checks and checksums of every frame) and drop it."""
    blocks.build(i, buffers.get("built", blocks.shape(i), blocks.dtype))


def _check_block(blocks: TensorBlocks, ft_rows: TensorRows, i: int, buffers):
    """(problems found, ||ft - base||^2, ||rebuilt - ft||^2) of block ``i``, compared by
    :func:`.kernels.compare.compare_block` in the calling thread's ``buffers``."""
    rec = blocks.rec
    r0, r1 = blocks.ranges[i]
    if rec.params == 0:  # nothing to compare, however many (empty) rows
        return {}, 0.0, 0.0
    shape, dtype = blocks.shape(i), blocks.dtype
    base_rows = blocks.base_rows(i, buffers.get("base", shape, dtype))
    kept = blocks.kept(i)  # before build, which releases the diff's pages it read
    built = buffers.get("built", shape, dtype)
    blocks.build(i, built, base_rows)
    want = ft_rows.read_into(r0, r1, buffers.get("finetuned", shape, dtype))
    flags, change, error = compare_block(built, want, base_rows, kept, rec.dtype)
    found = {}  # what -> the first row where it holds
    if flags:
        first = first_rows(built, want, base_rows, kept)
        if flags & KEPT_DIFFERS:
            found["a kept value differs from the fine-tune"] = r0 + first[KEPT_DIFFERS]
        if flags & RESET_DIFFERS:
            found["a reset value differs from the base"] = r0 + first[RESET_DIFFERS]
        if rec.encoding == "unchanged" and flags & DIFFERS:
            found["recorded unchanged but the fine-tune differs from the base"] = \
                r0 + first[DIFFERS]
    # The fine-tune's pages, where its reader copies through the map (.bin); the base's and
    # the diff's were dropped by build, and the comparison reads only the buffers.
    ft_rows.release(r0, r1)
    return found, change, error


