"""The Ray executor: each group of a job's plan as one Ray task, the driver merging.

Imported only for ``--executor ray``. The driver connects (to ``address``, else the running
cluster, else a new local instance) before its own checks and asks for the workers the run
will use, so that they start while it works (`joined`). It puts the job in the object store
once and keeps a bounded number of tasks in flight with ``ray.wait``. A task reserves
``threads`` CPUs, opens the inputs by path (a file system every node sees; hub models from
each node's cache, offline) in the driver's working directory, writes its file through a
``.partial`` name as the local loop does, and returns its group's result. Ray retries a task
whose worker died (``max_retries``); the retry rewrites the same ``.partial`` from its
start, so the result is the same bytes. A task that meets a bad input returns the
KenstreamError as a value (pickled whole: class, message, file, tensor, row); the driver
cancels the other tasks, waits for them to delete their ``.partial`` files, and raises it,
so the run ends with the local run's one line. Progress reaches the driver's one bar through
a small actor.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace

from .. import __version__, kernels
from ..errors import ExecutorError, KenstreamError

MAX_RETRIES = 3
"""Times Ray runs a task again after its worker died (killed, out of memory, node lost)."""
_POLL = 0.25  # seconds between progress refreshes while waiting for tasks
_CANCEL_WAIT = 60.0  # seconds the driver waits for cancelled tasks to clean up
_SETTLE = 0.2  # seconds tasks just ending get before the others are cancelled
_REGISTER_WAIT = 30.0  # seconds a task waits for the progress tally to come up
_PROBE_WAIT = 10.0  # seconds to wait for a TCP connection to --ray-address


def import_ray():
    """The ray module, or ExecutorError (exit 2) saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs the ray package, which is not installed",
                            hint="pip install 'kenstream[ray]'") from None
    return ray


def run_ray(job, groups: list, todo: list, results: list, progress, *, address, quiet) -> None:
    """Fill ``results[pos]`` for every ``pos`` in ``todo`` by running ``job.write`` on
    ``groups[pos]`` in Ray tasks; see the module's docstring."""
    with joined(address, quiet) as ray:
        if todo:
            _drive(ray, job, groups, todo, results, progress)


@contextmanager
def joined(address, quiet, *, threads: int = 1, groups: int = 0):
    """The ray module, joined to a cluster for the body (left at the end if joined here).

    With ``groups``, as many workers as the run can use at once (at most ``groups``, one per
    ``threads`` CPUs of the cluster) are started at once by a task that imports kenstream
    and returns, so they start while the driver goes on with its checks and planning: the
    first tasks find them warm, the same job's workers being reused.
    """
    ray = import_ray()
    started = _connect(ray, address, quiet)
    try:
        if groups:
            threads, slots = _slots(ray, threads)
            task = ray.remote(warm).options(num_cpus=threads)
            _WARMING[:] = [task.remote() for _ in range(min(groups, slots))]
        yield ray
    finally:
        _WARMING.clear()
        if started:
            ray.shutdown()


_WARMING: list = []
"""The warm-up tasks of the run in progress (kept referenced while it lasts)."""


def warm() -> int:
    """A warm-up task: its worker has imported kenstream (to unpickle this function) and
    the libraries a shard's bytes depend on; returns the worker's pid."""
    versions()
    return os.getpid()


def _slots(ray, threads: int) -> tuple:
    """(CPUs a task reserves: ``threads``, but no more than the largest node has; how many
    such tasks the cluster runs at once)."""
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    threads = max(1, min(threads, int(max(cpus, default=1))))
    return threads, max(1, int(sum(cpus) // threads))


def _connect(ray, address, quiet) -> bool:
    """Join a cluster unless this process already has; returns whether it joined here.
    The process's SIGTERM handler is kept (ray.init installs its own in the main thread)."""
    if ray.is_initialized():
        return False
    _probe(address)
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, include_dashboard=False,
                 logging_level=logging.ERROR if quiet else logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExecutorError(f"cannot start or reach a Ray cluster at {address or 'auto'}: "
                            f"{first}", hint="check --ray-address and `ray status`") from None
    finally:
        if threading.current_thread() is threading.main_thread() and on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    return True


def _probe(address) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) address where nothing accepts a TCP
    connection. ray.init retries such an address for minutes, printing warnings, in C code
    that no signal interrupts; a typo should be one error line. Other forms (``auto``,
    none) are left to ray.init."""
    if not address:
        return
    host, sep, port = str(address).split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_WAIT):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ExecutorError(f"cannot reach a Ray cluster at {address}: {reason}",
                            hint="check --ray-address (the head node's address and GCS port, "
                                 "6379 by default) and `ray status` there") from None


def versions() -> dict:
    """What the bytes of a shard depend on besides the inputs and the settings."""
    import numba
    import numpy
    import zstandard

    return {"kenstream": __version__, "zstandard": zstandard.__version__,
            "numpy": numpy.__version__, "numba": numba.__version__}


def _drive(ray, job, groups, todo, results, progress) -> None:
    threads, slots = _slots(ray, job.threads)
    job = replace(job, threads=threads)
    limit = 2 * slots  # keeps every worker fed, bounds the queue
    task = ray.remote(run_group).options(num_cpus=threads, max_retries=MAX_RETRIES,
                                         retry_exceptions=False)
    # No bar on screen (--quiet, or stderr not a terminal): no tally, one process fewer.
    tally = None if progress.disable else ray.remote(num_cpus=0)(Tally).remote()
    shared = ray.put(job)
    context = (os.getcwd(), versions())
    waiting, running, shown, counted = deque(todo), {}, 0, 0
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                pos = waiting.popleft()
                running[task.remote(shared, pos, *groups[pos], tally, *context)] = pos
            ready, _ = ray.wait(list(running), num_returns=1, timeout=_POLL)
            for ref in ready:
                pos = running.pop(ref)
                results[pos] = _result(ray, ref, groups[pos][0])
                counted += job.params(groups[pos][1])
            if tally is not None:
                partial = ray.get(tally.snapshot.remote())
                now = counted + sum(v for pos, v in partial.items() if pos in running.values())
                if now > shown:
                    progress.update(now - shown)
                    shown = now
    except BaseException:
        _cancel(ray, running)
        raise
    finally:
        if tally is not None:
            ray.kill(tally)


def _result(ray, ref, name):
    """The task's result; its KenstreamError, or the error that ended it, raised here."""
    try:
        out = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # not a KenstreamError: OSError, or a bug
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from exc
        raise
    except ray.exceptions.RayError as exc:  # the worker or its node died MAX_RETRIES + 1 times
        raise ExecutorError(f"the Ray task writing {name} failed {MAX_RETRIES + 1} times "
                            f"({type(exc).__name__})",
                            hint="see the Ray logs; rerun with --resume") from None
    if isinstance(out, Failed):
        raise out.error
    return out


def _cancel(ray, running: dict) -> None:
    """Cancel the tasks still running and wait (a while) until each has ended, so that
    none is left writing, and every ``.partial`` a cancelled writer held is deleted.

    Tasks about to end are given `_SETTLE` seconds first, and only those not done are
    cancelled: Ray 2.60 can abort the driver ("Tried to complete task that was not
    pending") when a cancel crosses the reply of a task that has just finished."""
    refs = list(running)
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=_SETTLE) if refs else ([], [])
    for ref in set(refs) - set(done):
        ray.cancel(ref)
    deadline = time.monotonic() + _CANCEL_WAIT
    for ref in refs:
        try:
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # cancelled, failed, or still ending: nothing more to do here
            pass


@dataclass(frozen=True)
class Failed:
    """A task's KenstreamError, returned as a value: it is not retried, and reaches the
    driver whole."""

    error: KenstreamError


def run_group(job, pos: int, name, group, tally, cwd: str, driver: dict):
    """In a Ray worker: ``job.write`` for group ``pos`` (``name``, ``group``) of the plan.

    Runs in the driver's working directory ``cwd`` (when this node has it), resolves hub
    models offline, and refuses to write when this node's versions differ from the
    driver's (``driver``), since bytes could then differ.
    """
    try:
        mine = versions()
        if mine != driver:
            wrong = next(k for k in driver if mine.get(k) != driver[k])
            raise ExecutorError(f"a Ray worker has {wrong} {mine.get(wrong)}, the driver "
                                f"{driver[wrong]}; outputs would not be byte-identical",
                                hint="install the same versions on every node")
        kernels.keep_freed_memory()
        with _working_dir(cwd), _offline(), job.session() as ctx:
            return job.write(ctx, name, group, _Silent() if tally is None else Feed(tally, pos))
    except KenstreamError as exc:
        return Failed(exc)


@contextmanager
def _working_dir(cwd: str):
    before = os.getcwd()
    if os.path.isdir(cwd):
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


@contextmanager
def _offline():
    """Hub references resolve from this node's cache only: a worker never downloads."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


class Tally:
    """A Ray actor (no CPU) the tasks report to: parameters done per group (a retried
    group's count never goes back) and the workers, as (node, pid), that ran it."""

    def __init__(self):
        self.done, self.workers = {}, {}

    def report(self, pos: int, worker: tuple, done: int) -> None:
        self.done[pos] = max(self.done.get(pos, 0), done)
        seen = self.workers.setdefault(pos, [])
        if worker not in seen:
            seen.append(worker)

    def snapshot(self) -> dict:
        return dict(self.done)


class _Silent:
    """The progress of a task whose driver shows no bar."""

    def update(self, n: int = 1) -> None:
        pass


class Feed:
    """The progress object a task's work updates. It registers the task's worker with the
    tally before the work starts (waiting for it, so that the tally knows which worker
    holds which group while it runs), then sends the running count the first time and at
    most every ``every`` seconds (any thread may call). Progress is best effort: a tally
    that cannot be reached never stops the work."""

    def __init__(self, tally, pos: int, every: float = 0.2):
        import ray

        self.tally, self.pos, self.every = tally, pos, every
        self.worker = (ray.get_runtime_context().get_node_id(), os.getpid())
        self.done, self.sent = 0, None
        self._lock = threading.Lock()
        try:
            ray.get(tally.report.remote(pos, self.worker, 0), timeout=_REGISTER_WAIT)
        except (ray.exceptions.RayError, TimeoutError):
            pass

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += int(n)
            now = time.monotonic()
            if self.sent is None or now - self.sent >= self.every:
                self.sent = now
                self.tally.report.remote(self.pos, self.worker, self.done)
