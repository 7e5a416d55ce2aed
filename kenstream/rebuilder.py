"""Rebuild: base + diff -> the KEN-optimised model, as a standard model directory or in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import dtypes, format as fmt
from .diff import DiffReader
from .errors import DiffError, OutputError
from .io.checkpoint import Checkpoint
from .io.safetensors_file import SafetensorsFile
from .io.writer import ShardWriter, header_bytes
from .plan import fill_greedy
from .outputs import copy_files, is_extra, prepare_output, read_json, write_json_atomic
from .progress import bar, say
from .settings import parse_size

PARTIAL_NAME = "kenstream-rebuild.partial.json"
INDEX_NAME = "model.safetensors.index.json"


def _check_entries(name: str, rec: dict, entries: dict, where) -> None:
    """Refuse entries whose sizes contradict the record, before any array is indexed."""
    rows, cols = int(rec["rows"]), int(rec["cols"])
    enc = rec["encoding"]
    expected = {"unchanged": {}, "dense": {"values": rows * cols}}.get(enc)
    if enc == "bitmask":
        expected = {"mask": rows * ((cols + 7) // 8), "values": rec["kept"]}
    elif enc == "indices":
        expected = {"index": rec["kept"], "values": rec["kept"]}
        if "counts" in entries:
            expected["counts"] = rows
    for role, size in expected.items():
        got = entries.get(role)
        if got is None or got.size != size:
            raise DiffError(f"entry {role!r} has {None if got is None else got.size} elements, "
                            f"record says {size}", file=where, tensor=name)
    if enc == "indices":
        if entries["index"].size and int(entries["index"].max()) >= cols:
            raise DiffError("a column index is out of range", file=where, tensor=name)
        if "counts" in entries:
            if int(entries["counts"].astype(np.int64).sum()) != rec["kept"]:
                raise DiffError("row counts do not add up to the kept count", file=where,
                                tensor=name)
        elif rec.get("row_kept") is None or rec["row_kept"] * rows != rec["kept"]:
            raise DiffError("row_kept does not match the kept count", file=where, tensor=name)
    if enc == "bitmask":
        if fmt.count_bits(entries["mask"]) != rec["kept"]:
            raise DiffError("mask bit count does not match the kept count", file=where,
                            tensor=name)


def rebuilt_blocks(name: str, rec: dict, diff: DiffReader, base):
    """Yield the rebuilt tensor ``name`` as consecutive [r1 - r0, cols] row blocks (new
    arrays in storage dtype), releasing each block's base pages once it is built."""
    entries = diff.entries(name)
    _check_entries(name, rec, entries, diff.path)
    dtype = rec["dtype"]
    rows, cols = int(rec["rows"]), int(rec["cols"])
    if "mask" in entries:
        entries = dict(entries, mask=entries["mask"].reshape(rows, -1))
    if rec["encoding"] == "dense":
        values = entries["values"].reshape(rows, cols)
        for r0, r1 in fmt.row_blocks(rows, cols):
            yield np.array(values[r0:r1])
        return
    if rec.get("base_name") is None:
        raise DiffError("record has no base tensor", file=diff.path, tensor=name)
    bname = rec["base_name"]
    binfo = base.info(bname)
    if list(binfo.shape) != list(rec["shape"]):
        raise DiffError(f"base tensor {bname!r} has shape {list(binfo.shape)}, "
                        f"diff expects {rec['shape']}", file=diff.path, tensor=name)
    src = base.array(bname).reshape(rows, cols)
    row_bytes = cols * dtypes.itemsize(binfo.dtype)
    value_bytes = dtypes.itemsize(dtype)
    start = 0
    for r0, r1 in fmt.row_blocks(rows, cols):
        if binfo.dtype == dtype:
            out = np.array(src[r0:r1])
        else:
            out = np.ascontiguousarray(dtypes.convert(src[r0:r1], binfo.dtype, dtype))
        done = fmt.apply_block(out, rec, entries, r0, start)
        base.release(bname, r0 * row_bytes, r1 * row_bytes)
        diff.release(name, "values", start * value_bytes, done * value_bytes)
        start = done
        yield out


def rebuilt_tensor(name: str, rec: dict, diff: DiffReader, base) -> np.ndarray:
    """The rebuilt tensor ``name`` as a new array in storage dtype with the record's shape."""
    rows, cols = int(rec["rows"]), int(rec["cols"])
    out = np.empty((rows, cols), dtype=dtypes.storage_dtype(rec["dtype"]))
    r0 = 0
    for block in rebuilt_blocks(name, rec, diff, base):
        out[r0:r0 + len(block)] = block
        r0 += len(block)
    return out.reshape(rec["shape"])


def load(base, diff, *, force: bool = False, verify_hashes: bool = True):
    """Yield ``(name, torch.Tensor)`` for every tensor of the rebuilt model, one at a time.

    Each tensor is a fresh CPU tensor in the fine-tune's dtype, ready for
    ``model.load_state_dict(dict(kenstream.load(base, diff)))`` or per-tensor copies.
    """
    with DiffReader(diff) as d, Checkpoint.open(str(base)) as b:
        if verify_hashes:
            d.check_hashes()
        d.check_base(b, force=force)
        for name, rec in d.records.items():
            arr = rebuilt_tensor(name, rec, d, b)
            yield name, dtypes.to_torch(arr, rec["dtype"])
            d.release(name)
            if rec.get("base_name"):
                b.release(rec["base_name"])


def _params(rec: dict) -> int:
    return int(rec["rows"]) * int(rec["cols"])


def _nbytes(rec: dict) -> int:
    return _params(rec) * dtypes.itemsize(rec["dtype"])


def _plan_output(records: dict, limit: int) -> list:
    """Group tensors into output shards of at most ``limit`` bytes, in diff order."""
    return fill_greedy(records, lambda name: _nbytes(records[name]), limit)


def _shard_file(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _check_reused(path: Path, names) -> None:
    """A finished output shard kept by --resume must hold exactly the planned tensors."""
    with SafetensorsFile(path) as sf:
        found = set(sf.names())
    if found != set(names):
        raise OutputError("holds other tensors than the plan puts in it", file=path,
                          hint="delete it and rerun with --resume")


def rebuild(base, diff, out, *, shard_size="5GB", force=False, overwrite=False, resume=False,
            quiet=False) -> dict:
    """Write the rebuilt model to ``out`` (safetensors shards + standard index + config files).

    Returns the written ``model.safetensors.index.json`` content.
    """
    limit = parse_size(shard_size)
    out = Path(out)
    with DiffReader(diff) as d, Checkpoint.open(str(base)) as b:
        state = prepare_output(out, inputs=[b, _DiffInput(d.path)], resume=resume,
                               overwrite=overwrite, marker=PARTIAL_NAME, index=INDEX_NAME)
        if state == "complete":
            say(f"{out} is already rebuilt; nothing to resume", quiet)
            return read_json(out / INDEX_NAME)
        say("checking diff shard hashes", quiet)
        d.check_hashes()
        diffs = d.check_base(b, force=force)
        if diffs:
            say(f"warning: --force: base differs from the recorded one in {len(diffs)} file(s)",
                False)
        groups = _plan_output(d.records, limit)
        files = [_shard_file(i, len(groups)) for i in range(len(groups))]
        plan = {"diff": d.index["shards"], "shard_size": limit, "files": files}
        partial = out / PARTIAL_NAME
        if state == "resume":
            previous = read_json(partial)
            if previous != plan:
                raise DiffError("--resume: the diff or --shard-size differ from the interrupted run",
                                file=partial)
        else:
            write_json_atomic(partial, plan)
        # Config and tokenizer first: a run killed after the last shard's rename still
        # leaves a loadable, complete model directory.
        copy_files(sorted(p for p in d.path.iterdir() if p.is_file() and is_extra(p.name)), out)
        weight_map = {}
        total = sum(_params(r) for r in d.records.values())
        with bar(total, "rebuild", quiet) as progress:
            for file, group in zip(files, groups):
                for name in group:
                    weight_map[name] = file
                path = out / file
                if state == "resume" and path.exists():
                    _check_reused(path, group)
                    progress.update(sum(_params(d.records[n]) for n in group))
                    continue
                entries, offset = {}, 0
                for name in group:
                    rec = d.records[name]
                    size = _nbytes(rec)
                    entries[name] = (rec["dtype"], rec["shape"], offset, offset + size)
                    offset += size
                reserve = len(header_bytes(entries, {"format": "pt"}))
                with ShardWriter(path, reserve) as writer:
                    for name in group:
                        rec = d.records[name]
                        writer.begin(name, rec["dtype"])
                        for block in rebuilt_blocks(name, rec, d, b):
                            writer.write(block)
                        writer.end(rec["shape"])
                        d.release(name)
                        if rec.get("base_name"):
                            b.release(rec["base_name"])
                        progress.update(_params(rec))
                    writer.finish({"format": "pt"})
        total_size = sum(_nbytes(r) for r in d.records.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        write_json_atomic(out / INDEX_NAME, index)
        partial.unlink(missing_ok=True)
    return index


class _DiffInput:
    """Lets prepare_output treat the diff directory as an input that must not be touched."""

    def __init__(self, path):
        self.root = Path(path)
        self.files = []
