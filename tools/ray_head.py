"""A local Ray instance for `bench_e2e.py --executor ray`, and the memory of its workers.

A helper process owns the instance (so this script never stops Ray processes it did not
start): it prints the address to join and the token mode ray.init chose, and shuts the
instance down when its stdin closes. The worker processes a timed run adds under it are
found by parentage in /proc, and their peak resident memory is read from the kernel's
high-water mark (VmHWM), sampled every 0.1 s while the run lasts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

# Prints the address and the token mode ray.init chose, which a driver joining needs too.
_RAY_HEAD = ("import logging, os, sys, ray; ray.init(num_cpus=int(sys.argv[1]), "
             "include_dashboard=False, logging_level=logging.ERROR); "
             "print(ray.get_runtime_context().gcs_address, os.environ.get('RAY_AUTH_MODE', ''), "
             "flush=True); sys.stdin.read(); ray.shutdown()")


class RayHead:
    """A local Ray instance with ``cpus`` CPUs owned by a helper process: ``address`` to
    join, `timed` to run a driver and measure it and the workers it adds, `close` to shut
    the instance down."""

    def __init__(self, cpus: int, timed_child):
        self.timed_child = timed_child
        self.proc = subprocess.Popen([sys.executable, "-c", _RAY_HEAD, str(cpus)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.address, _, auth = self.proc.stdout.readline().strip().partition(" ")
        if not self.address:
            self.close()
            sys.exit("could not start a local Ray instance (is kenstream[ray] installed?)")
        if auth:
            os.environ["RAY_AUTH_MODE"] = auth  # for the drivers this script starts

    def descendants(self) -> set:
        """Pids of every process below the helper (the instance's daemons and workers)."""
        parent = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(stat.parent.name)] = int(fields[1])
        found, todo = set(), [self.proc.pid]
        while todo:
            pid = todo.pop()
            kids = [p for p, pp in parent.items() if pp == pid]
            found.update(kids)
            todo.extend(kids)
        return found

    def timed(self, cmd, cwd=None) -> tuple:
        """(seconds, driver peak RSS, workers' largest peak RSS, their sum, how many) of
        ``cmd`` (timed by ``timed_child(cmd, cwd)``): processes that appear under the
        instance while it runs are its job's workers."""
        before, peaks, done = self.descendants(), {}, threading.Event()

        def sample():
            while not done.is_set():
                for pid in self.descendants() - before:
                    try:
                        status = Path(f"/proc/{pid}/status").read_text()
                    except OSError:
                        continue
                    hwm = [int(line.split()[1]) * 1024 for line in status.splitlines()
                           if line.startswith("VmHWM:")]
                    if hwm:
                        peaks[pid] = max(peaks.get(pid, 0), hwm[0])
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            secs, rss = self.timed_child(cmd, cwd)
        finally:
            done.set()
            sampler.join()
        return secs, rss, max(peaks.values(), default=0), sum(peaks.values()), len(peaks)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # only the helper this script started
            self.proc.wait()
