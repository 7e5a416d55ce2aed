"""Compress: prune a fine-tune against its base into a sharded sparse diff, streaming.

The engine's entry point for compress (with `stream`, its per-shard loop): it opens both
checkpoints, aligns and plans, prepares the output (or resumes it), writes each planned
shard, then the config files, the card and, last, the index.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__, kernels
from ..errors import DiffError, OutputError
from ..format import spec
from ..format.records import (CompressPlan, DiffIndex, Identity, Selection, ShardInfo, Totals,
                              parse_shard_metadata)
from ..io.checkpoint import Checkpoint
from ..io.fingerprint import sha256_file
from ..io.jsonfile import read_json_file, read_plan, write_json_atomic, write_text_atomic
from ..io.outputs import copy_files, prepare_output
from ..io.safetensors_file import SafetensorsFile
from ..progress import bar, say
from ..settings import DEFAULT_TIES, DIFF_SHARD_SIZE, Settings, parse_size
from .align import align
from .cards import diff_card
from .plan import make_items, plan_shards
from .stream import write_shard

_REDO = "delete it and rerun with --resume"


def read_shard_records(path: Path, expected) -> dict:
    """Records stored in a finished shard's metadata (used by --resume).

    A shard holding other tensors than ``expected`` (the planned names), or entries its
    records do not account for, is refused: it is not this run's.
    """
    with SafetensorsFile(path) as sf:
        meta = sf.metadata
        owners = {spec.entry_owner(e) for e in sf.names()}
    try:
        records = parse_shard_metadata(meta)
    except DiffError as exc:
        raise DiffError(exc.message, file=path, tensor=exc.tensor, hint=_REDO) from None
    if set(records) != set(expected):
        raise DiffError("shard does not hold the tensors the plan puts in it", file=path,
                        hint=_REDO)
    if not owners <= set(expected):
        raise DiffError("shard holds entries of tensors the plan does not put in it",
                        file=path, hint=_REDO)
    return records


def _resumed_plan(plan: CompressPlan, partial: Path) -> CompressPlan:
    """The interrupted run's plan, after checking that this run would make the same one.

    The identities and command line are taken from the interrupted run, so that the
    finished diff is byte-identical to an uninterrupted one however the paths are spelled.
    """
    try:
        previous = CompressPlan.from_json(read_plan(partial))
    except DiffError as exc:
        raise OutputError(f"--resume: {exc.message}", file=partial,
                          hint="delete the output directory and start again") from None
    checks = (("settings", "selection settings"), ("shard_size", "--shard-size values"),
              ("base", "base files"), ("finetuned", "fine-tune files"), ("shards", "shard plans"))
    for key, what in checks:
        was, now = getattr(previous, key), getattr(plan, key)
        if key in ("base", "finetuned"):  # the same files, however the path is spelled
            was, now = was.get("files"), now.get("files")
        if was != now:
            raise OutputError(f"--resume: the {what} differ from the interrupted run's",
                              file=partial, hint="repeat the original command with --resume")
    return CompressPlan(plan.settings, plan.shard_size, previous.base, previous.finetuned,
                        plan.shards, previous.command, plan.format_version)


def compress(base, finetuned, out, *, k=None, keep=None, ties=DEFAULT_TIES, method="ken",
             include=None, exclude=None, seed=0, threads=None, shard_size=DIFF_SHARD_SIZE,
             block_elems=spec.DEFAULT_BLOCK_ELEMS, resume=False, overwrite=False, quiet=False,
             command=None) -> dict:
    """Prune ``finetuned`` against ``base`` and write the diff directory ``out``.

    Returns the index (also written as ``out/kenstream-diff.json``) as JSON. ``threads``
    numba threads select (the caller's count is restored after); tensors stream in row
    blocks of about ``block_elems`` values. Peak memory is a few row blocks plus the
    packed mask of the tensor in hand (1 bit a parameter).
    """
    settings = Settings(method=method, k=k, keep=keep, ties=ties, include=include,
                        exclude=exclude, seed=seed)
    limit = parse_size(shard_size)
    out = Path(out)
    with kernels.threads(threads), Checkpoint.open(str(base)) as b, \
            Checkpoint.open(str(finetuned)) as f:
        # Planned before the output is touched, so unrelated models leave nothing behind and
        # the plan file follows the directory's creation at once.
        alignment = align(f.names(), b.names())
        items = make_items(f, b, alignment, settings)
        shards = plan_shards(out, items, limit)
        plan = CompressPlan(settings.to_json(), limit, b.identity(), f.identity(),
                            {n: [i.name for i in g] for n, g in shards},
                            list(command) if command is not None else None)
        state = prepare_output(out, inputs=[b, f], resume=resume, overwrite=overwrite,
                               marker=spec.PARTIAL_NAME, index=spec.INDEX_NAME)
        if state == "complete":
            say(f"{out} is already a complete diff; nothing to resume", quiet)
            return read_json_file(out / spec.INDEX_NAME)
        partial = out / spec.PARTIAL_NAME
        if state == "resume":
            plan = _resumed_plan(plan, partial)
        else:
            write_json_atomic(partial, plan.to_json())
        say(f"aligned {len(alignment.pairs)} tensors ({alignment.exact} by exact name"
            + (f", prefix {alignment.finetuned_prefix or alignment.base_prefix!r}"
               if alignment.finetuned_prefix or alignment.base_prefix else "")
            + f"); {len(alignment.new)} new, {len(alignment.dropped)} only in the base", quiet)

        records = {}
        with bar(sum(i.params for i in items), "compress", quiet) as progress:
            for name, group in shards:
                path = shards.path(name)
                if state == "resume" and path.exists():
                    records.update(read_shard_records(path, [i.name for i in group]))
                    progress.update(sum(i.params for i in group))
                    continue
                records.update(write_shard(shards, name, group, f, b, settings, progress,
                                           block_elems))
        copy_files(f.extra_files(), out)
        write_text_atomic(out / "README.md", diff_card(plan.base, plan.command))
        index = build_index(plan, alignment, items, records, shards)
        shards.write_index(spec.INDEX_NAME, index.to_json())
        partial.unlink(missing_ok=True)
    return index.to_json()


def build_index(plan: CompressPlan, alignment, items, records, shards) -> DiffIndex:
    """The index of a finished diff: every shard's size and hash, every record, totals."""
    table = {n: ShardInfo(shards.path(n).stat().st_size, sha256_file(shards.path(n)))
             for n, _ in shards}
    tensors = {i.name: records[i.name] for i in items}
    selected = [r for r in tensors.values() if r.selected]
    totals = Totals(params=sum(i.params for i in items),
                    selected=sum(r.params for r in selected),
                    kept=sum(r.kept for r in selected),
                    reset=sum(r.params - r.kept for r in selected),
                    finetuned_bytes=sum(r.params * r.itemsize for r in tensors.values()),
                    diff_bytes=sum(s.size for s in table.values()))
    return DiffIndex(spec.FORMAT_VERSION, __version__, plan.command,
                     Selection.from_json(plan.settings), plan.shard_size,
                     Identity.from_json(plan.base, "base"),
                     Identity.from_json(plan.finetuned, "finetuned"), alignment.summary(),
                     table, tensors, totals)
