"""Rebuild: base + diff -> the pruned fine-tune, as a standard model directory or in memory."""

from __future__ import annotations

import os
from pathlib import Path

from .. import __version__, dtypes, kernels
from ..errors import CheckpointError, OutputError
from ..format import spec
from ..format.plans import RebuildPlan
from ..io import direct, safetensors_file
from ..io.checkpoint import Checkpoint
from ..io.diff_reader import DiffReader
from ..io.extras import copy_files, copy_stale
from ..io.fingerprint import sha256_file
from ..io.jsonfile import read_json_file, read_plan, write_json_atomic, write_text_atomic
from ..io.outputs import claim_output
from ..io.safetensors_file import SafetensorsFile
from ..io.writer import (BufferRing, ShardSet, WriteBehind, entry_cost, header_budget,
                         header_bytes)
from ..progress import bar, say
from ..settings import MODEL_SHARD_SIZE, parse_size
from ..text import printable
from .blocks import TensorBlocks, check_base_content, check_shapes, compile_first
from .cards import FINETUNED_CARD, rebuilt_card
from .executor import RebuildJob, Source, check_executor, executor_ready, run_shards

PARTIAL_NAME = "kenstream-rebuild.partial.json"
INDEX_NAME = "model.safetensors.index.json"
PROVENANCE_BOUND = {"format": "pt", "kenstream_version": "x" * 32,
                    "kenstream_diff_sha256": "0" * 64}
"""At least as long as the metadata every rebuilt shard carries (for header budgets)."""


def load(base, diff, *, force: bool = False, verify_hashes: bool = True,
         block_elems: int = spec.DEFAULT_BLOCK_ELEMS):
    """Yield ``(name, torch.Tensor)`` for every tensor of the rebuilt model, one at a time.

    Each tensor is a fresh CPU tensor in the fine-tune's dtype, ready for
    ``model.load_state_dict(dict(kenstream.load(base, diff)))`` or per-tensor copies.
    """
    with DiffReader(diff) as d, Checkpoint.open(d.base_ref(base, quiet=True)) as b:
        if verify_hashes:
            d.check_hashes()
        d.check_base(b, force=force)
        check_shapes(d, b)
        for name, rec in d.records.items():
            blocks = TensorBlocks(name, d, b, block_elems)
            arr = blocks.rebuilt()
            blocks.release()
            yield name, dtypes.to_torch(arr, rec.dtype)


def _model_file(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _check_reused(path: Path, names, prefix: str = "",
                  hint: str = "delete it and rerun with --resume") -> dict:
    """A finished output shard kept by --resume must hold exactly the planned tensors;
    returns its metadata. Errors start with ``prefix`` and end with ``hint``."""
    try:
        with SafetensorsFile(path) as sf:
            found, metadata = set(sf.names()), sf.metadata
    except CheckpointError as exc:  # this run's own output: not a download to fetch again
        raise OutputError(prefix + exc.message, file=path, hint=hint) from None
    if found != set(names):
        raise OutputError(prefix + "holds other tensors than the plan puts in it", file=path,
                          hint=hint)
    return metadata


def rebuild(base, diff, out, *, shard_size=MODEL_SHARD_SIZE, force=False, overwrite=False,
            resume=False, quiet=False, threads=None,
            block_elems: int = spec.DEFAULT_BLOCK_ELEMS,
            header_limit: int | None = None, executor="local", ray_address=None) -> dict:
    """Write the rebuilt model to ``out`` (safetensors shards + standard index + config files).

    ``threads`` blocks are decoded at once (default: every core numba sees). Returns the
    written ``model.safetensors.index.json`` content. No output file's header exceeds
    ``header_limit`` bytes (default: the reader's ``MAX_HEADER_BYTES``). ``executor="ray"``
    writes the files as Ray tasks, byte-identical (see :mod:`.executor`).
    """
    check_executor(executor)
    limit = parse_size(shard_size)
    out = Path(out)
    with DiffReader(diff) as d, Checkpoint.open(d.base_ref(base, quiet)) as b:
        records = d.records
        shards = _plan_files(out, records, limit, header_limit)
        extras = [n for n in d.companions() if n not in ("README.md", FINETUNED_CARD)]
        files = [*shards.names, INDEX_NAME, PARTIAL_NAME, "README.md", *extras]
        total_size = sum(r.params * r.itemsize for r in records.values())
        workers = kernels.get_threads() if threads is None else kernels.thread_count(threads)
        with executor_ready(executor, ray_address=ray_address, quiet=quiet, threads=workers,
                            groups=len(shards.names)), \
                claim_output(out, inputs=[b, _DiffInput(d.path)], resume=resume,
                             overwrite=overwrite, plan=PARTIAL_NAME, index=INDEX_NAME,
                             files=files, run="rebuild") as claim:
            if claim.state == "complete":
                index = _check_finished(out, d, b, shards, total_size, force)
                # Loaders need the config and tokenizer beside the weights: lost or edited
                # since, they are copied out of the diff again.
                lost = copy_stale(d.path, extras, out)
                done = (f"; copied again from the diff: {', '.join(lost)}" if lost
                        else "; nothing to resume")
                say(f"{printable(out)} is already rebuilt{done}", quiet)
                return index
            say("checking diff shard hashes", quiet)
            d.check_hashes(threads=workers)
            diffs = d.check_base(b, force=force)
            if diffs:  # a warning under --force; else a note, which -q silences
                say(d.base_note(diffs), quiet and d.content_checked)
            check_shapes(d, b)
            plan = RebuildPlan({n: s.to_json() for n, s in d.index.shards.items()}, limit,
                               list(shards.names), b.identity()["files"], bool(force))
            partial = out / PARTIAL_NAME
            if claim.state == "resume":
                differs = RebuildPlan.from_json(read_plan(partial)).differs(plan)
                if differs:
                    raise OutputError(f"--resume: the {differs} differ from the interrupted "
                                      "run's", file=partial,
                                      hint="repeat the original command with --resume, or "
                                           "start again with --overwrite")
                claim.record(files)
            else:
                write_json_atomic(partial, plan.to_json())
            # Config, tokenizer and card first: a run killed after the last shard's rename
            # still leaves a loadable, complete model directory.
            copy_files(d.path, extras, out)
            diff_sha = sha256_file(d.path / spec.INDEX_NAME)
            original = d.path / FINETUNED_CARD
            write_text_atomic(out / "README.md", rebuilt_card(
                d.index.to_json(), diff_sha, original.read_text(encoding="utf-8", errors="replace")
                if original.is_file() else None))
            metadata = {"format": "pt", "kenstream_version": __version__,
                        "kenstream_diff_sha256": diff_sha}
            largest = max((_first_block_bytes(r, d.index, block_elems)
                           for r in records.values()), default=0)
            counts = {n: r.params for n, r in records.items()}
            job = RebuildJob(shards, str(d.path), Source.of(b), counts, largest, block_elems,
                             workers, d.forced_base, metadata,
                             _read_past_cache(b.files, total_size))
            compile_first(records, executor, quiet)
            with bar(sum(counts.values()), "rebuild", quiet) as progress:
                weight_map = run_shards(job, list(shards), progress, executor=executor,
                                        handles=(d, b), resume=claim.state == "resume",
                                        ray_address=ray_address, quiet=quiet)
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            shards.write_index(INDEX_NAME, index)
            partial.unlink(missing_ok=True)
    return index


def _check_finished(out: Path, d, b, shards: ShardSet, total_size: int, force: bool) -> dict:
    """The index of a finished model that ``--resume`` met, after checking that this run
    would write it: its shards are the ones this ``--shard-size`` plans, each made from this
    diff (the diff index's sha256 in its metadata), over a base the diff accepts."""
    index = read_json_file(out / INDEX_NAME)
    hint = "to replace it, run the command with --overwrite instead of --resume"
    planned = {"metadata": {"total_size": total_size},
               "weight_map": {t: name for name, group in shards for t in group}}
    if index != planned:  # the index this command writes, byte for byte in content
        raise OutputError("--resume: the finished model is not the one this command writes "
                          "(its index differs: another --shard-size, diff or edit)",
                          file=out / INDEX_NAME, hint=hint)
    diff_sha = sha256_file(d.path / spec.INDEX_NAME)
    for name, group in shards:
        metadata = _check_reused(out / name, group, "--resume: ", hint)
        if metadata.get("kenstream_diff_sha256") != diff_sha:
            raise OutputError("--resume: the finished model was rebuilt from another diff",
                              file=out / name, hint=hint)
    diffs = d.check_base(b, force=force)
    check_shapes(d, b)
    if diffs and d.content_checked:  # this base's files are not those it was made over
        check_base_content(d, b)
    return index


def _read_past_cache(base_files, out_bytes: int) -> bool:
    """Whether the base is read with ``O_DIRECT`` (:mod:`kenstream.io.direct`): when the
    base and the model being written together exceed the machine's memory. The page cache
    then cannot keep the base's pages until anything reads them again, and filling and
    reclaiming them costs more system time than the rest of the rebuild; a smaller pair
    keeps buffered reads, with the kernel's read-ahead and a base left warm for the next
    run (docs/benchmarks.md)."""
    return direct.exceeds_memory(sum(os.stat(f).st_size for f in base_files) + out_bytes)


def _plan_files(out, records, limit, header_limit) -> ShardSet:
    """Output shards by bytes, and by header bytes (at most ``header_limit``)."""
    if header_limit is None:
        header_limit = safetensors_file.MAX_HEADER_BYTES
    cost, budget = header_budget(header_limit, len(header_bytes({}, PROVENANCE_BOUND)),
                                 lambda n: n,
                                 lambda n: entry_cost(n, records[n].dtype, records[n].shape))
    return ShardSet.plan(out, records, lambda n: records[n].params * records[n].itemsize,
                         limit, _model_file, cost, budget)


def _first_block_bytes(rec, index, block_elems: int) -> int:
    """Bytes of the largest row block `TensorBlocks` builds for ``rec`` (its first)."""
    if rec.version >= 2:
        r0, r1 = spec.frame_ranges(rec.rows, rec.cols, index.coding.frame_elems)[0]
    else:
        r0, r1 = next(spec.row_blocks(rec.rows, rec.cols, block_elems))
    return (r1 - r0) * rec.cols * rec.itemsize


def _write_group(writer, group: list, d: DiffReader, b, progress, ring: BufferRing,
                 block_elems: int, pool, metadata: dict) -> None:
    """Write the rebuilt tensors ``group`` into one safetensors file, streaming.

    Three things overlap: the disk reads the next blocks' diff bytes (prefetch, across
    tensor ends too), the ``pool``'s threads build the current ones (each reads its base
    rows straight into its output buffer, then decodes the kept values over them), and a
    helper thread writes the finished ones in order (`WriteBehind`). Memory is the ring's
    block buffers plus the pages being read.
    """
    with WriteBehind(writer, ring) as behind:
        def opened(pos):  # the tensor at ``pos``, its first block already asked for
            t = TensorBlocks(group[pos], d, b, block_elems)
            t.prefetch(0)  # every tensor has at least one block
            return t

        following = opened(0) if group else None
        for pos in range(len(group)):
            t = following
            behind.begin(t.name, t.rec.dtype)
            for i in range(len(t.ranges)):
                if i + 1 < len(t.ranges):
                    t.prefetch(i + 1)
                elif pos + 1 < len(group):
                    following = opened(pos + 1)
                behind.put(t.dtype, t.shape(i), lambda out, t=t, i=i: t.build(i, out), pool)
            behind.end(t.rec.shape)
            behind.after(t.release)
            behind.after(progress.update, t.rec.params)
        behind.finish(metadata)


class _DiffInput:
    """Lets claim_output treat the diff directory as an input that must not be touched."""

    def __init__(self, path):
        self.root = Path(path)
        self.files = []

