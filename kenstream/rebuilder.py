"""Rebuild: base + diff -> the KEN-optimised model, as a standard model directory or in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import dtypes, format as fmt
from .diff import DiffReader
from .errors import DiffError, OutputError
from .io.checkpoint import Checkpoint
from .io.safetensors_file import SafetensorsFile
from .io.writer import BufferRing, ShardWriter, WriteBehind, header_bytes
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


class _TensorBlocks:
    """One tensor of the rebuilt model, built row block by row block, in order.

    `build` writes block ``i`` (rows ``ranges[i]``) into a caller's [n, cols] array of the
    storage dtype: the base rows, converted to the fine-tune's dtype, with the kept values
    written over them; then it releases the pages it read. `prefetch` starts the disk on a
    block before it is needed. Entries are checked against the record when this is made.
    """

    def __init__(self, name: str, rec: dict, diff: DiffReader, base):
        self.name, self.rec, self.diff, self.base = name, rec, diff, base
        entries = diff.entries(name)
        _check_entries(name, rec, entries, diff.path)
        self.rows, self.cols = int(rec["rows"]), int(rec["cols"])
        if "mask" in entries:
            # The check read the whole mask (1 bit a parameter, 16 MB for a 7B embedding);
            # let it go until each block needs its rows, so memory stays flat in model size.
            diff.release(name, "mask")
            entries = dict(entries, mask=entries["mask"].reshape(self.rows, -1))
        self.entries = entries
        self.dtype = dtypes.storage_dtype(rec["dtype"])
        self.ranges = list(fmt.row_blocks(self.rows, self.cols))
        self.value_bytes = dtypes.itemsize(rec["dtype"])
        self._start = 0  # index in values of the next block's first kept value
        self.src = None
        if rec["encoding"] == "dense":
            return
        if rec.get("base_name") is None:
            raise DiffError("record has no base tensor", file=diff.path, tensor=name)
        self.bname = rec["base_name"]
        self.binfo = base.info(self.bname)
        if list(self.binfo.shape) != list(rec["shape"]):
            raise DiffError(f"base tensor {self.bname!r} has shape {list(self.binfo.shape)}, "
                            f"diff expects {rec['shape']}", file=diff.path, tensor=name)
        self.src = base.array(self.bname).reshape(self.rows, self.cols)
        self.row_bytes = self.cols * dtypes.itemsize(self.binfo.dtype)

    def shape(self, i: int) -> tuple:
        r0, r1 = self.ranges[i]
        return (r1 - r0, self.cols)

    def prefetch(self, i: int) -> None:
        """Ask for block ``i``'s base rows, mask rows and (at most) its values."""
        r0, r1 = self.ranges[i]
        if self.src is None:
            span = self.cols * self.value_bytes
            self.diff.prefetch(self.name, "values", r0 * span, r1 * span)
            return
        self.base.prefetch(self.bname, r0 * self.row_bytes, r1 * self.row_bytes)
        if "mask" in self.entries:
            width = self.entries["mask"].shape[1]
            self.diff.prefetch(self.name, "mask", r0 * width, r1 * width)
        if self.rec["encoding"] != "unchanged":
            # Not more values than positions in the block; reading ahead is harmless.
            first = self._start * self.value_bytes
            self.diff.prefetch(self.name, "values", first,
                               first + (r1 - r0) * self.cols * self.value_bytes)

    def build(self, i: int, out: np.ndarray) -> None:
        r0, r1 = self.ranges[i]
        if self.src is None:
            np.copyto(out, self.entries["values"].reshape(self.rows, self.cols)[r0:r1])
            span = self.cols * self.value_bytes
            self.diff.release(self.name, "values", r0 * span, r1 * span)
            return
        rows = self.src[r0:r1]
        if self.binfo.dtype != self.rec["dtype"]:
            rows = dtypes.convert(rows, self.binfo.dtype, self.rec["dtype"])
        done = fmt.build_block(out, rows, self.rec, self.entries, r0, self._start)
        self.base.release(self.bname, r0 * self.row_bytes, r1 * self.row_bytes)
        self.diff.release(self.name, "values", self._start * self.value_bytes,
                          done * self.value_bytes)
        if "mask" in self.entries:
            width = self.entries["mask"].shape[1]
            self.diff.release(self.name, "mask", r0 * width, r1 * width)
        self._start = done

    def release(self) -> None:
        """Drop every page of this tensor's diff entries and base tensor."""
        self.diff.release(self.name)
        if self.src is not None:
            self.base.release(self.bname)


def rebuilt_blocks(name: str, rec: dict, diff: DiffReader, base):
    """Yield the rebuilt tensor ``name`` as consecutive [r1 - r0, cols] row blocks (new
    arrays in storage dtype), releasing each block's pages once it is built."""
    t = _TensorBlocks(name, rec, diff, base)
    for i in range(len(t.ranges)):
        if i + 1 < len(t.ranges):
            t.prefetch(i + 1)
        out = np.empty(t.shape(i), dtype=t.dtype)
        t.build(i, out)
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


def _block_bytes(rec: dict) -> int:
    """Bytes of the largest row block `_TensorBlocks` builds for ``rec``."""
    rows, cols = int(rec["rows"]), int(rec["cols"])
    r0, r1 = next(fmt.row_blocks(rows, cols))
    return (r1 - r0) * cols * dtypes.itemsize(rec["dtype"])


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
        ring = BufferRing(2, max((_block_bytes(r) for r in d.records.values()), default=0))
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
                _write_group(path, reserve, group, d, b, progress, ring)
        total_size = sum(_nbytes(r) for r in d.records.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        write_json_atomic(out / INDEX_NAME, index)
        partial.unlink(missing_ok=True)
    return index


def _write_group(path: Path, reserve: int, group: list, d: DiffReader, b, progress,
                 ring: BufferRing) -> None:
    """Write the rebuilt tensors ``group`` as one safetensors file, streaming.

    Three things overlap: the disk reads the next block (prefetch, across tensor ends
    too), this thread builds the current one, and a helper thread writes the previous
    one (`WriteBehind`). Memory is the ring's two block buffers plus the pages being read.
    """
    with ShardWriter(path, reserve, drop_behind=True) as writer, \
            WriteBehind(writer, ring) as behind:
        def opened(pos):  # the tensor at ``pos``, its first block already asked for
            t = _TensorBlocks(group[pos], d.records[group[pos]], d, b)
            t.prefetch(0)  # every tensor has at least one block (format.row_blocks)
            return t

        following = opened(0) if group else None
        for pos in range(len(group)):
            t = following
            behind.begin(t.name, t.rec["dtype"])
            for i in range(len(t.ranges)):
                if i + 1 < len(t.ranges):
                    t.prefetch(i + 1)
                elif pos + 1 < len(group):
                    following = opened(pos + 1)
                behind.put(t.dtype, t.shape(i), lambda out, i=i: t.build(i, out))
            behind.end(t.rec["shape"])
            t.release()
            progress.update(_params(t.rec))
        behind.finish({"format": "pt"})


class _DiffInput:
    """Lets prepare_output treat the diff directory as an input that must not be touched."""

    def __init__(self, path):
        self.root = Path(path)
        self.files = []
