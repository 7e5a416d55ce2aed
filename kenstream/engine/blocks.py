"""The diff side of the streaming block layer: one tensor of base + diff, block by block.

Rebuild, verify, viz and ``load`` all open a diff tensor through :class:`TensorBlocks`,
so all of them run the same checks (the reader's dtype and shape checks, then the
encoding's content checks) before any array is indexed, and all walk the same row blocks.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import dtypes
from ..errors import DiffError, IdentityError, KenstreamError
from ..format import spec, v2
from ..format.records import digest_text
from ..format.v1 import V1Tensor
from ..format.v2_tensor import V2Tensor, check_frame_size
from ..io.rows import TensorRows
from ..kernels import digest
from ..progress import say
from ..text import printable


class TensorBlocks:
    """Tensor ``name`` of ``diff`` (a DiffReader) over ``base`` (a Checkpoint, or None when
    only the kept positions are wanted), in row blocks of about ``block_elems`` values.

    `build` writes block ``i`` of the rebuilt tensor (the base rows in the fine-tune's
    dtype, kept values written over them) into a caller's array; `kept` gives the block's
    kept mask; `prefetch` asks the disk for a block's diff bytes before they are needed. Pages are
    released as blocks are built.
    """

    def __init__(self, name: str, diff, base=None, block_elems: int = spec.DEFAULT_BLOCK_ELEMS):
        self.name, self.diff = name, diff
        rec = self.rec = diff.records[name]
        entries = diff.entries(name)
        try:
            if rec.version >= 2:
                self.codec = V2Tensor(name, rec, entries, diff.index.coding.frame_elems)
            else:
                self.codec = V1Tensor(name, rec, entries)
        except KenstreamError as exc:
            raise exc.located(file=diff.path)
        if "mask" in entries:
            # The check read the whole mask (1 bit a parameter, 16 MB for a 7B embedding);
            # let it go until each block needs its rows, so memory stays flat in model size.
            diff.release(name, "mask")
        self.rows, self.cols = rec.rows, rec.cols
        self.dtype = dtypes.storage_dtype(rec.dtype)
        # Format 2 is decoded frame by frame; format 1 in row blocks of block_elems.
        self.ranges = (self.codec.ranges if rec.version >= 2
                       else list(spec.row_blocks(self.rows, self.cols, block_elems)))
        self.base = None
        self._digest = None
        if base is not None and rec.base_name is not None and rec.encoding != "dense":
            shape = tuple(base.info(rec.base_name).shape)
            _check_base_shape(diff, name, rec, shape)
            base_rows = shape[0] if rec.base_rows is not None else self.rows
            self.base = TensorRows(base, rec.base_name, base_rows, self.cols, rec.dtype)
            if rec.base_digest is not None:
                self._digest = _BaseCheck(self, [r for r in self.ranges if r[0] < rec.with_base])

    def shape(self, i: int) -> tuple:
        r0, r1 = self.ranges[i]
        return (r1 - r0, self.cols)

    def prefetch(self, i: int) -> None:
        """Ask for block ``i``'s diff entries. Not its base rows: `build` reads those itself
        with ``pread``, which the kernel reads ahead on its own, and reading them ahead here
        too would copy every base byte once more (2-3 CPU-s at 7B)."""
        r0, r1 = self.ranges[i]
        for role in self.codec.roles:
            self.diff.prefetch(self.name, role, *self.codec.byte_span(role, r0, r1))

    def base_rows(self, i: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Block ``i`` of the base in the fine-tune's dtype (None when the tensor is stored
        without a base): read into ``out`` when given, else a view of the map."""
        return self._base_range(*self.ranges[i], out)

    def _base_range(self, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Base rows r0..r1 in the fine-tune's dtype (read into ``out`` when given). A
        tensor of no rows has one empty block, with an (empty) base when it has one."""
        if self.rec.encoding == "dense" or (r0 >= self.rec.with_base and r1 > r0):
            return None
        if r1 <= r0:  # nothing to read, with or without a base checkpoint
            return np.empty((0, self.cols), self.dtype) if out is None else out
        if self.base is None:
            raise DiffError("needs the base to be decoded", tensor=self.name,
                            hint="pass the base checkpoint")
        rows = self.base.read(r0, r1) if out is None else self.base.read_into(r0, r1, out)
        if self._digest is not None:
            self._digest.seen(rows, r0, r1)
        return rows

    def build(self, i: int, out: np.ndarray, base_rows: np.ndarray | None = None) -> None:
        """Write block ``i`` of the rebuilt tensor into ``out`` ([n, cols], storage dtype,
        C-contiguous); ``base_rows`` saves reading the base again when the caller has the
        block. Without it the base rows are read into ``out`` and rebuilt there."""
        r0, r1 = self.ranges[i]
        if base_rows is None:
            base_rows = self._base_range(r0, r1, out)
        try:
            if self.rec.version >= 2:
                self.codec.build_frame(i, out, base_rows)
            else:
                self.codec.build(out, base_rows, r0)
        except DiffError as exc:
            raise self._explained(exc)
        self.release_block(i)

    def release_block(self, i: int) -> None:
        """Drop the pages block ``i`` read: its base rows and diff bytes (again, if a
        caller read them after `build`)."""
        r0, r1 = self.ranges[i]
        if self.base is not None:
            self.base.release(r0, r1)
        for role in self.codec.roles:
            self.diff.release(self.name, role, *self.codec.byte_span(role, r0, r1))

    def kept(self, i: int) -> np.ndarray:
        """Bool [n, cols]: the positions of block ``i`` that come from the diff (safe to
        call for several blocks at once)."""
        if self.rec.version >= 2:
            try:
                return self.codec.frame_mask(i)
            except DiffError as exc:
                raise self._explained(exc)
        return self.codec.kept_rows(*self.ranges[i])

    def kept_rows(self, r0: int, r1: int) -> np.ndarray:
        """Bool [r1 - r0, cols] for any row range (clipped to the tensor)."""
        return self.codec.kept_rows(r0, r1)

    def kept_values(self, r0: int, r1: int) -> np.ndarray:
        """The kept fine-tuned values of rows r0..r1, row-major, in the storage dtype
        (format 2 needs the base to decode them)."""
        if self.rec.version >= 2:
            try:
                return self.codec.kept_values(r0, r1, self._base_range)
            except DiffError as exc:
                raise self._explained(exc)
        return self.codec.kept_values(r0, r1)

    def _explained(self, exc: DiffError) -> DiffError:
        """A decode error, located; when the base is not the recorded one (its digest, read
        now in full, differs), that error instead; when the base was let through by
        --force, say why it most likely failed."""
        self.check_base()  # raises when the base is to blame
        exc = exc.located(file=self.diff.path, tensor=self.name)
        if self.diff.forced_base and self.rec.version >= 2:
            exc.hint = ("format 2 codes kept values against the base the diff was made from; "
                        "with --force the base must hold the same values")
            exc.args = (str(exc),)
        return exc

    def check_base(self) -> None:
        """Read and digest the base rows no block has read yet, and compare the record's
        digest (a no-op without one): IdentityError when the base's content differs."""
        if self._digest is not None:
            self._digest.check_all()

    def release(self) -> None:
        """Drop every page of this tensor's diff entries and base tensor."""
        self.diff.release(self.name)
        if self.base is not None:
            self.base.release()

    def rebuilt(self) -> np.ndarray:
        """The whole rebuilt tensor as a new array (storage dtype, the record's shape)."""
        out = np.empty((self.rows, self.cols), dtype=self.dtype)
        for i, (r0, r1) in enumerate(self.ranges):
            if i + 1 < len(self.ranges):
                self.prefetch(i + 1)
            self.build(i, out[r0:r1])
        return out.reshape(self.rec.shape)


class _BaseCheck:
    """The record's base digest (docs/format.md 6.7) against the base rows a
    `TensorBlocks` reads: each frame's rows are digested as they are first read, by
    whichever thread reads them, and once every frame with a base is in, the sum must be
    the recorded one. Costs one pass of the digest kernel over rows already in memory."""

    def __init__(self, blocks: TensorBlocks, ranges: list):
        self.blocks = blocks
        self.wanted = dict(ranges)  # first row -> last row of each frame with a base
        self.done = {}
        self.lock = threading.Lock()

    def seen(self, rows, r0: int, r1: int) -> None:
        if self.wanted.get(r0) != r1 or r0 in self.done:
            return  # not a whole frame (a caller's own range), or digested already
        d = digest.rows_digest(rows, r0)
        with self.lock:
            self.done.setdefault(r0, d)
            finished = len(self.done) == len(self.wanted)
        if finished:
            self._compare()

    def check_all(self) -> None:
        """Digest the frames not read yet (after a decode error), then compare."""
        for r0, r1 in self.wanted.items():
            if r0 not in self.done:
                self.blocks._base_range(r0, r1)  # reads and digests it
        self._compare()

    def _compare(self) -> None:
        total = 0
        for d in self.done.values():
            total = digest.add(total, d)
        rec = self.blocks.rec
        if digest_text(total) != rec.base_digest:
            base = self.blocks.base
            recorded = self.blocks.diff.index.base.named
            raise IdentityError(
                f"base tensor {rec.base_name!r} is not the one this diff was made from: its "
                "content differs (another revision, a damaged copy, or a dtype that does not "
                "hold its values)", file=base.info.file, tensor=self.blocks.name,
                hint=f"pass the base the diff was made from: {printable(recorded)}")


def check_base_content(d, b) -> None:
    """Every base tensor against its record's digest, read in full (for a base whose files
    are not the recorded ones, where nothing else will read it). Cost: one read of the
    base tensors the diff takes values from."""
    for name, rec in d.records.items():
        if rec.base_digest is not None:
            blocks = TensorBlocks(name, d, b)
            blocks.check_base()
            blocks.release()


def check_shapes(d, b) -> None:
    """Every record that takes values from the base names a base tensor of its shape.

    Run before anything is allocated: sizes then come from bytes that exist (the base's
    tensors), never from a record alone (a forged shape ``[1, 2**58]``). Cost O(tensors),
    headers only."""
    for name, rec in d.records.items():
        if d.index.coding is not None:
            try:
                check_frame_size(name, rec, d.index.coding.frame_elems)
            except DiffError as exc:
                raise exc.located(file=d.path)
        if rec.encoding == "dense" or rec.base_name is None:
            continue
        try:
            binfo = b.info(rec.base_name)
        except KenstreamError:
            raise DiffError(f"its base tensor {rec.base_name!r} is not in the base",
                            file=d.path, tensor=name) from None
        _check_base_shape(d, name, rec, tuple(binfo.shape))


def _check_base_shape(d, name, rec, shape) -> None:
    """The base tensor's shape is the record's (or, for a resized one, the same columns and
    at least the rows the record takes from it)."""
    want = tuple(rec.shape)
    resized = rec.base_rows is not None
    if (shape[1:] != want[1:] or shape[0] < rec.with_base) if resized else shape != want:
        raise DiffError(f"base tensor {rec.base_name!r} has shape {list(shape)}, diff expects "
                        f"{list(want)}" + (f" with {rec.base_rows} rows from the base"
                                           if resized else ""), file=d.path, tensor=name)


class ThreadBuffers:
    """Arrays reused by each thread of a pool, one per name: a block's buffers are
    allocated once a thread, not once a block (a fresh 16 MB array costs 4096 page faults
    each time it is first written)."""

    def __init__(self):
        self._local = threading.local()

    def get(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` (contents undefined), private to
        the calling thread until its next ``get`` of ``name``."""
        mine = self._local.__dict__
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        held = mine.get(name)
        if held is None or held.size < nbytes:
            held = mine[name] = np.empty(max(nbytes, 1), np.uint8)
        return held[:nbytes].view(dtype).reshape(shape)


def compile_first(records, executor: str, quiet: bool, compare: bool = False) -> None:
    """On a machine whose numba cache lacks the decoder (with ``compare``, or verify's
    comparison), say that the first blocks wait on the compiler. Unlike compress's
    kernels it is not compiled here first: frames to decode would have to be coded, which
    compiles the coder as well (17 s for bf16 and float32 together, against the decoder's
    4 s). Ray's workers compile on their own nodes."""
    from ..kernels.compare import compiled as comparison_compiled

    coded = any(r.version >= 2 and r.encoding == "coded" and r.base_name is not None
                for r in records.values())
    missing = [what for what, done in (("decoder", not coded or v2.decoder_compiled()),
                                       ("comparison kernel", not compare or comparison_compiled()))
               if not done]
    if quiet or executor != "local" or not missing:
        return
    say(f"compiling kenstream's {' and '.join(missing)} for this machine (the first run "
        "only: a few seconds; numba caches it)")
