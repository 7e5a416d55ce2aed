"""The work of one output shard, and the executors that run it: a loop here, or Ray tasks.

compress, rebuild and verify plan exactly as they always have and hand the plan (a list of
``(name, group)``) to :func:`run` with a *job*: a frozen, picklable dataclass that says how
to open the inputs by path (`session`), write one group (`write`), recognise a group that a
killed run finished (`finished`, for ``--resume``) and merge the groups' results in plan
order (`merge`). Results are plain JSON-able data, so they cross a process boundary as
they are. The local executor calls `write` in a loop on the inputs the driver has open,
handing it a helper thread (``later``) on which a job may finish a group's last step
(compress hashes its shard there) while the next group starts; the Ray executor
(:mod:`.distributed`, imported only when asked for) calls the very same functions in
tasks. Nothing written depends on which executor ran it, or on the order in
which groups finish, so the outputs are byte-identical.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from .. import kernels
from ..errors import ExecutorError
from ..format.index import ShardInfo
from ..format.records import TensorRecord
from ..io.checkpoint import Checkpoint
from ..io.diff_reader import DiffReader
from ..io.fingerprint import sized_sha256
from ..io.writer import BufferRing, ShardSet, header_bytes
from ..settings import Settings
from .stream import write_shard

EXECUTORS = ("local", "ray")


def check_executor(executor: str) -> None:
    """Refuse an unknown executor, or ``ray`` without the package, before any work."""
    if executor not in EXECUTORS:
        raise ExecutorError(f"unknown executor {executor!r}; choose local or ray")
    if executor == "ray":
        from .distributed import import_ray

        import_ray()


@contextmanager
def executor_ready(executor: str, *, ray_address=None, quiet=False, threads: int = 1,
                   groups: int = 0):
    """The body (the driver's checks, the output's claim, `run_shards`) with the executor
    made ready first: for ``ray``, the cluster joined and up to ``groups`` workers of
    ``threads`` CPUs starting while the driver works (:func:`.distributed.joined`).
    ``executor`` has passed `check_executor`, which its callers run before any work."""
    if executor != "ray":
        yield
        return
    from .distributed import joined

    with joined(ray_address, quiet, threads=threads, groups=groups):
        yield


def run_shards(job, groups: list, progress, *, executor: str = "local", handles=None,
        resume: bool = False, ray_address: str | None = None, quiet: bool = False):
    """Write every group of ``groups`` with ``job`` and return ``job.merge`` of the results,
    in plan order.

    ``handles``: the inputs the driver has open, used by the local executor. With
    ``resume``, a group the job finds finished is kept (and counted on ``progress``)
    instead of written again, under either executor. The process that writes (this one,
    or each Ray task) keeps the memory its frames free (`kernels.keep_freed_memory`).
    """
    check_executor(executor)
    kernels.keep_freed_memory()
    results = [None] * len(groups)
    todo = []
    for pos, (name, group) in enumerate(groups):
        done = job.finished(name, group) if resume else None
        if done is None:
            todo.append(pos)
        else:
            results[pos] = done
            progress.update(job.params(group))
    if executor == "ray":
        from .distributed import run_ray

        run_ray(job, groups, todo, results, progress, address=ray_address, quiet=quiet)
    elif todo:
        with job.session(handles) as ctx, \
                ThreadPoolExecutor(1, thread_name_prefix="kenstream-finish") as later:
            for pos in todo:
                results[pos] = job.write(ctx, *groups[pos], progress, later=later)
            results = [r.result() if isinstance(r, Future) else r for r in results]
    return job.merge(results)


@dataclass(frozen=True)
class Source:
    """How a worker opens an input the driver opened: the reference as the driver spelled
    it (paths are read from the driver's working directory), a hub model pinned to the
    snapshot the driver resolved."""

    ref: str

    @classmethod
    def of(cls, ckpt: Checkpoint) -> "Source":
        if ckpt.kind == "hub" and ckpt.revision:
            return cls(f"{ckpt.repo_id}@{ckpt.revision}")
        return cls(str(ckpt.source))

    def open(self) -> Checkpoint:
        return Checkpoint.open(self.ref)


@dataclass(frozen=True)
class CompressJob:
    """Diff shards: `stream.write_shard` for each planned group of items."""

    shards: ShardSet
    finetuned: Source
    base: Source
    settings: Settings
    version: int
    block_elems: int
    level: int
    frame_elems: int
    threads: int
    cuts: dict | None = None  # a tensor or global budget's cuts, from the plan

    def params(self, group) -> int:
        return sum(i.params for i in group)

    def finished(self, name, group):
        from .compress import read_shard_records  # compress imports this module

        path = self.shards.path(name)
        if not path.exists():
            return None
        return _shard_result(path, read_shard_records(path, [i.name for i in group]))

    @contextmanager
    def session(self, handles=None):
        """(fine-tune, base): the driver's, or opened here by path. Both are read once,
        a block ahead of the kernel: each block not already in the page cache is staged
        past it where the system allows (:mod:`kenstream.io.direct`; at 1B and 7B
        0.72-0.94 of the time of buffered reads from a cold page cache:
        docs/benchmarks.md)."""
        with ExitStack() as stack:
            if handles is None:
                stack.enter_context(kernels.threads(self.threads))
                ft = stack.enter_context(self.finetuned.open())
                base = stack.enter_context(self.base.open())
            else:
                ft, base = handles
            ft.read_directly()
            base.read_directly()
            yield ft, base

    def write(self, ctx, name, group, progress, later=None):
        """Write diff shard ``name``; returns its records, size and hash (`_shard_result`),
        or with ``later`` (an executor) the future of them: the shard is then hashed there
        (sha256 reads about 1.6 GB/s on one core) while the caller writes the next one."""
        ft, base = ctx
        records = write_shard(
            self.shards, name, group, ft, base, self.settings, progress, version=self.version,
            block_elems=self.block_elems, level=self.level, frame_elems=self.frame_elems,
            threads=self.threads, cuts=self.cuts)
        if later is None:
            return _shard_result(self.shards.path(name), records)
        return later.submit(_shard_result, self.shards.path(name), records)

    def merge(self, results) -> tuple:
        """(tensor name -> TensorRecord, parsed by the one record parser; shard name ->
        ShardInfo), for the index."""
        records = {name: TensorRecord.from_json(rec, version=self.version)
                   for part in results for name, rec in part["records"].items()}
        table = {name: ShardInfo(part["size"], part["sha256"])
                 for name, part in zip(self.shards.names, results)}
        return records, table


def _shard_result(path, records: dict) -> dict:
    """A written diff shard as a task returns it: its records (JSON), size and sha256. The
    file is hashed where it was written, while its pages are still cached there, and on a
    cluster by each worker at once, not read back in turn by the driver."""
    size, sha256 = sized_sha256(path)
    return {"records": {name: rec.to_json() for name, rec in records.items()},
            "size": size, "sha256": sha256}


@dataclass(frozen=True)
class RebuildJob:
    """Model shards: each group of tensor names rebuilt into one safetensors file."""

    shards: ShardSet
    diff: str
    base: Source
    counts: dict  # tensor name -> parameters, for progress
    largest: int  # bytes of the largest block, the size of the ring's buffers
    block_elems: int
    threads: int
    forced: bool  # the base was let through by --force (decode errors say so)
    metadata: dict  # every file's __metadata__: the format and where the weights came from
    direct: bool = False  # read the base past the page cache (rebuild._read_past_cache)

    def params(self, group) -> int:
        return sum(self.counts[n] for n in group)

    def finished(self, name, group):
        from .rebuild import _check_reused  # rebuild imports this module

        path = self.shards.path(name)
        if not path.exists():
            return None
        _check_reused(path, group)
        return {tensor: name for tensor in group}

    @contextmanager
    def session(self, handles=None):
        """(diff, base, block buffers, decoding threads); one ring serves every file."""
        with ExitStack() as stack:
            if handles is None:
                stack.enter_context(kernels.threads(self.threads))
                d = stack.enter_context(DiffReader(self.diff))
                d.forced_base = self.forced
                b = stack.enter_context(self.base.open())
            else:
                d, b = handles
            if self.direct:
                b.read_directly()
            ring = BufferRing(self.threads + 2, self.largest)
            pool = stack.enter_context(kernels.frame_pool(self.threads, "kenstream-build"))
            yield d, b, ring, pool

    def write(self, ctx, name, group, progress, later=None) -> dict:
        """Write model file ``name``; returns its part of the weight map (``later`` is
        not used)."""
        from .rebuild import _write_group

        d, b, ring, pool = ctx
        entries, offset = {}, 0
        for tensor in group:
            rec = d.records[tensor]
            size = rec.params * rec.itemsize
            entries[tensor] = (rec.dtype, rec.shape, offset, offset + size)
            offset += size
        reserve = len(header_bytes(entries, self.metadata))
        with self.shards.open(name, reserve, drop_behind=True) as writer:
            _write_group(writer, group, d, b, progress, ring, self.block_elems, pool,
                         self.metadata)
        return {tensor: name for tensor in group}

    def merge(self, results) -> dict:
        return {tensor: name for part in results for tensor, name in part.items()}


@dataclass(frozen=True)
class VerifyJob:
    """Verify rows: every tensor of a group rebuilt and compared, nothing written."""

    diff: str
    base: Source
    finetuned: Source | None
    counts: dict  # tensor name -> parameters, for progress
    block_elems: int
    threads: int
    forced: bool

    def params(self, group) -> int:
        return sum(self.counts[n] for n in group)

    def finished(self, name, group):
        return None

    @contextmanager
    def session(self, handles=None):
        """(diff, base, fine-tune or None)."""
        if handles is not None:
            yield handles
            return
        with ExitStack() as stack:
            stack.enter_context(kernels.threads(self.threads))
            d = stack.enter_context(DiffReader(self.diff))
            d.forced_base = self.forced
            b = stack.enter_context(self.base.open())
            ft = None if self.finetuned is None else stack.enter_context(self.finetuned.open())
            yield d, b, ft

    def write(self, ctx, name, group, progress, later=None) -> dict:
        """Check the tensors of ``group``; returns their report rows and problems
        (``later`` is not used)."""
        from .verify import check_tensors  # verify imports this module

        rows, problems = check_tensors(*ctx, group, progress, self.block_elems)
        return {"rows": list(rows.items()), "problems": problems}

    def merge(self, results) -> tuple:
        """(name -> report row in diff order, every problem in that order)."""
        rows, problems = OrderedDict(), []
        for part in results:
            rows.update(part["rows"])
            problems.extend(part["problems"])
        return rows, problems
