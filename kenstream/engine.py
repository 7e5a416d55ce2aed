"""Compress: prune a fine-tune against its base into a sharded sparse diff, streaming.

This is the engine (with `stream`, its per-shard loop): the one place that joins checkpoint
I/O and the selection kernels. Inputs are memory-mapped and worked through in row blocks
whose pages are released as soon as they are encoded, so memory stays flat in model size.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__, dtypes, format as fmt
from ._jit import set_threads
from .align import align
from .errors import DiffError, OutputError
from .io.checkpoint import Checkpoint
from .io.fingerprint import sha256_file
from .outputs import prepare_output, copy_extra_files, read_json, write_json_atomic
from .plan import assign_shards, make_items, shard_names
from .progress import bar, say
from .settings import Settings, parse_size
from .stream import write_shard

DEFAULT_SHARD_SIZE = "2GB"


def read_shard_records(path: Path, expected=None) -> dict:
    """Records stored in a finished shard's metadata (used by --resume).

    With ``expected`` (the planned tensor names), a shard holding other tensors, or entries
    its records do not account for, is refused: it is not this run's.
    """
    from .io.safetensors_file import SafetensorsFile

    redo = "delete it and rerun with --resume"
    with SafetensorsFile(path) as sf:
        meta = sf.metadata or {}
        entries = set(sf.names())
    if meta.get("format") != "kenstream-diff" or "records" not in meta:
        raise DiffError("not a kenstream diff shard", file=path, hint=redo)
    try:
        records = json.loads(meta["records"])
    except ValueError:
        raise DiffError("shard metadata records are not valid JSON", file=path, hint=redo) from None
    if expected is not None:
        if not isinstance(records, dict) or set(records) != set(expected):
            raise DiffError("shard does not hold the tensors the plan puts in it", file=path,
                            hint=redo)
        owners = {e.split("::", 1)[0] for e in entries}
        if not owners <= set(expected):
            raise DiffError("shard holds entries of tensors the plan does not put in it",
                            file=path, hint=redo)
    return records


def _resumed_plan(plan: dict, partial: Path) -> dict:
    """The interrupted run's plan, after checking that this run would make the same one.

    The identities and command line are taken from the interrupted run, so that the
    finished diff is byte-identical to an uninterrupted one however the paths are spelled.
    """
    previous = read_json(partial)
    if not isinstance(previous, dict):
        previous = {}
    for key, what in (("settings", "selection settings"), ("shard_size", "--shard-size values"),
                      ("base", "base files"), ("finetuned", "fine-tune files"),
                      ("shards", "shard plans")):
        was, now = previous.get(key), plan[key]
        if key in ("base", "finetuned"):  # the same files, however the path is spelled
            was, now = (was if isinstance(was, dict) else {}).get("files"), now.get("files")
        if was != now:
            raise OutputError(f"--resume: the {what} differ from the interrupted run's",
                              file=partial, hint="repeat the original command with --resume")
    return dict(plan, base=previous["base"], finetuned=previous["finetuned"],
                command=previous.get("command"))


def compress(base, finetuned, out, *, k=None, keep=None, ties="positions", method="ken",
             include=None, exclude=None, seed=0, threads=None, shard_size=DEFAULT_SHARD_SIZE,
             resume=False, overwrite=False, quiet=False, command=None) -> dict:
    """Prune ``finetuned`` against ``base`` and write the diff directory ``out``.

    Returns the index (also written as ``out/kenstream-diff.json``). Peak memory is a few
    row blocks plus the packed mask of the tensor in hand (1 bit a parameter).
    """
    settings = Settings(method=method, k=k, keep=keep, ties=ties, include=include,
                        exclude=exclude, seed=seed)
    limit = parse_size(shard_size)
    set_threads(threads)
    out = Path(out)
    with Checkpoint.open(str(base)) as b, Checkpoint.open(str(finetuned)) as f:
        # Planned before the output is touched, so unrelated models leave nothing behind and
        # the plan file follows the directory's creation at once.
        alignment = align(f.names(), b.names())
        items = make_items(f, b, alignment, settings)
        groups = assign_shards(items, limit)
        names = shard_names(len(groups))
        plan = {
            "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION,
            "settings": settings.to_json(), "shard_size": limit,
            "base": b.identity(), "finetuned": f.identity(),
            "shards": {n: [i.name for i in g] for n, g in zip(names, groups)},
            "command": list(command) if command is not None else None,
        }
        state = prepare_output(out, inputs=[b, f], resume=resume, overwrite=overwrite,
                               marker=fmt.PARTIAL_NAME, index=fmt.INDEX_NAME)
        if state == "complete":
            say(f"{out} is already a complete diff; nothing to resume", quiet)
            return read_json(out / fmt.INDEX_NAME)
        resume = state == "resume"
        partial = out / fmt.PARTIAL_NAME
        if resume:
            plan = _resumed_plan(plan, partial)
        else:
            write_json_atomic(partial, plan)
        say(f"aligned {len(alignment.pairs)} tensors ({alignment.exact} by exact name"
            + (f", prefix {alignment.finetuned_prefix or alignment.base_prefix!r}"
               if alignment.finetuned_prefix or alignment.base_prefix else "")
            + f"); {len(alignment.new)} new, {len(alignment.dropped)} only in the base", quiet)

        records = {}
        total = sum(i.rows * i.cols for i in items)
        with bar(total, "compress", quiet) as progress:
            for shard, group in zip(names, groups):
                path = out / shard
                if resume and path.exists():
                    records.update(read_shard_records(path, [i.name for i in group]))
                    progress.update(sum(i.rows * i.cols for i in group))
                    continue
                records.update(write_shard(path, group, f, b, settings, progress))
        copy_extra_files(f, out, base_model=plan["base"], command=plan["command"])
        index = build_index(plan, alignment, items, records, out, names)
        write_json_atomic(out / fmt.INDEX_NAME, index)
        partial.unlink(missing_ok=True)
    return index


def build_index(plan, alignment, items, records, out: Path, names) -> dict:
    shards = {n: {"size": (out / n).stat().st_size, "sha256": sha256_file(out / n)} for n in names}
    tensors = {i.name: records[i.name] for i in items}
    params = sum(i.rows * i.cols for i in items)
    kept = sum(r["kept"] for r in tensors.values() if r["encoding"] in ("bitmask", "indices"))
    selected = sum(r["rows"] * r["cols"] for r in tensors.values()
                   if r["encoding"] in ("bitmask", "indices"))
    ft_bytes = sum(i.rows * i.cols * dtypes.itemsize(i.dtype) for i in items)
    return {
        "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "complete": True,
        "kenstream_version": __version__, "command": plan["command"],
        "selection": plan["settings"], "shard_size": plan["shard_size"],
        "base": plan["base"], "finetuned": plan["finetuned"],
        "alignment": alignment.summary(), "shards": shards, "tensors": tensors,
        "totals": {"params": params, "selected": selected, "kept": kept,
                   "reset": selected - kept, "finetuned_bytes": ft_bytes,
                   "diff_bytes": sum(s["size"] for s in shards.values())},
    }
