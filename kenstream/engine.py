"""Compress: prune a fine-tune against its base into a sharded sparse diff, streaming.

This is the engine: the one module that joins checkpoint I/O and the selection kernels.
Memory holds one tensor's mask and kept values at a time; inputs are memory-mapped and
their pages released after each tensor.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
import zlib
from pathlib import Path

import numpy as np

from . import __version__, dtypes, format as fmt
from ._jit import set_threads
from .align import align
from .errors import DiffError, KenstreamError, OutputError
from .io.checkpoint import Checkpoint
from .io.writer import ShardWriter, sha256_of
from .outputs import prepare_output, copy_extra_files, read_json, write_json_atomic
from .plan import assign_shards, header_reserve, make_items, shard_metadata, shard_names
from .progress import bar, say
from .settings import Settings, parse_size

DEFAULT_SHARD_SIZE = "2GB"


def _select(item, ft2d, base2d, settings):
    """Bool mask [rows, cols] of kept positions for one tensor."""
    if settings.method == "ken":
        from .select import select_mask

        return select_mask(ft2d, item.k, ties=settings.ties)
    from .methods import select_mask_method

    salt = zlib.crc32(item.name.encode("utf-8"))
    return select_mask_method(settings.method, ft2d, base2d, item.k, seed=settings.seed,
                              salt=salt)


def _as_dtype(array, src: str, dst: str):
    """``array`` (storage of dtype ``src``) converted to dtype ``dst``'s storage."""
    if src == dst:
        return array
    return dtypes.convert(array, src, dst)


def _identical(a, b) -> bool:
    """Bitwise equality of two same-shape arrays, in blocks so no big temporary is made."""
    a = a.reshape(-1).view(np.uint8) if a.size else a.reshape(-1)
    b = b.reshape(-1).view(np.uint8) if b.size else b.reshape(-1)
    if a.size != b.size:
        return False
    # Blocks grow from 64 KiB: a changed tensor almost always differs in its first rows,
    # so only a few pages of the base are read, not megabytes per tensor.
    start, step = 0, 1 << 16
    while start < a.size:
        if not np.array_equal(a[start:start + step], b[start:start + step]):
            return False
        start += step
        step = min(step * 4, 1 << 24)
    return True


def select_item(item, ft, base, settings):
    """The selection step of one plan item: ``(reason, Encoded or (mask, ft rows))``.

    Whole-tensor outcomes (dense, unchanged) come back encoded; a selection comes back as
    its mask, to be packed by `encode_later` while the next tensor is being selected.
    """
    ft_arr = ft.array(item.name)
    if item.base_name is None:
        return item.reason, fmt.dense(ft_arr, item.dtype, item.shape)
    binfo = base.info(item.base_name)
    base_arr = _as_dtype(base.array(item.base_name), binfo.dtype, item.dtype)
    if _identical(ft_arr, base_arr):
        return "identical", fmt.unchanged()
    if item.action == "store":
        return item.reason, fmt.dense(ft_arr, item.dtype, item.shape)
    ft2d = ft_arr.reshape(item.rows, item.cols)
    base2d = base_arr.reshape(item.rows, item.cols)
    try:
        mask = _select(item, ft2d, base2d, settings)
    except KenstreamError as exc:
        raise exc.located(file=ft.info(item.name).file, tensor=item.name)
    return item.reason, (mask, ft2d)


def encode_later(item, selected) -> fmt.Encoded:
    """Finish `select_item`'s result; serial packing, as it runs beside the parallel kernel."""
    if isinstance(selected, fmt.Encoded):
        return selected
    mask, ft2d = selected
    return fmt.encode(mask, ft2d, item.dtype, parallel=False)


def _record(item, enc, reason, shard) -> dict:
    return {"base_name": item.base_name, "encoding": enc.encoding, "reason": reason,
            "dtype": item.dtype, "shape": list(item.shape), "rows": item.rows, "cols": item.cols,
            "k": item.k if enc.encoding in ("bitmask", "indices") else None,
            "kept": enc.kept, "row_kept": enc.row_kept, "shard": shard if enc.entries else None,
            "nbytes": enc.nbytes}


def write_shard(path: Path, items, ft, base, settings, progress) -> dict:
    """Write one diff shard; returns the records of its items."""
    records = {}
    writer = ShardWriter(path, header_reserve(items, path.name, settings.ties))
    def store(item, reason, selected):
        enc = encode_later(item, selected)
        for e in enc.entries:
            writer.append(f"{item.name}::{e.role}", e.dtype, e.shape, e.data)
        records[item.name] = _record(item, enc, reason, path.name)
        ft.release(item.name)
        progress.update(item.rows * item.cols)

    # One encoder thread packs and writes tensor i while the kernel selects tensor i + 1;
    # waiting for it before handing over the next keeps at most two masks in memory.
    with writer, ThreadPoolExecutor(max_workers=1) as encoder:
        pending = None
        for pos, item in enumerate(items):
            if pos + 1 < len(items):  # the disk reads the next tensor while this one computes
                following = items[pos + 1]
                ft.prefetch(following.name)
                if following.base_name is not None:  # enough for the identical-tensor check
                    base.prefetch(following.base_name, limit=1 << 18)
            reason, selected = select_item(item, ft, base, settings)
            if item.base_name is not None:
                base.release(item.base_name)
            if pending is not None:
                pending.result()
            pending = encoder.submit(store, item, reason, selected)
        if pending is not None:
            pending.result()
        writer.finish(shard_metadata(records))
    return records


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

    Returns the index (also written as ``out/kenstream-diff.json``). Peak memory is about
    one tensor's mask (1 byte a parameter) plus its kept values, independent of model size.
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
    shards = {n: {"size": (out / n).stat().st_size, "sha256": sha256_of(out / n)} for n in names}
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
