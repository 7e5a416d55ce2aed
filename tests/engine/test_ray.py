"""The Ray executor: compress, rebuild and verify as Ray tasks end in the local run's bytes.

One local Ray instance (2 CPUs, no dashboard) serves the module and is shut down after it.
Every Ray run is compared, file by file, with a local run of the same command line: each
run works in its own directory with the output given as the relative path ``diff`` /
``rebuilt``, so the recorded command is the same (the executor flags are not recorded).
Faults: a worker killed with SIGKILL in the middle of a shard (found through the pid the
task reports from its Ray worker, not by name), a bad input, and a killed driver resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from kenstream.cli import main  # noqa: E402
from kenstream.engine import distributed  # noqa: E402
from tests.ckpt import float_pair  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPRESS = ["--keep", "0.5", "--shard-size", "2500kB", "-j", "1", "-q"]
REBUILD = ["--shard-size", "5MB", "-j", "1", "-q"]


def tree(directory: Path) -> dict:
    """file name -> sha256 of every file in ``directory`` (flat)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for this module: its GCS address."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def write_pair(root: Path, nan_at=None) -> tuple:
    """A 2 x 32 MB float32 pair (16 matrices of 512 x 1024 and odd tensors; see
    ``float_pair``): shards of 2500 kB hold 2 of its matrices, of 9 MB 8."""
    return float_pair(root, layers=16, shape=(512, 1024), nan_at=nan_at)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"))


def cli(argv, cwd: Path, monkeypatch, capsys) -> tuple:
    """(exit code, stdout, stderr) of ``kenstream ARGV`` run in ``cwd``."""
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def compress_argv(pair, *extra) -> list:
    return ["compress", *pair, "-o", "diff", *COMPRESS, *extra]


@pytest.fixture(scope="module")
def local(pair, tmp_path_factory):
    """The local executor's diff and rebuilt model (made with the same command lines)."""
    cwd = tmp_path_factory.mktemp("local")
    os.chdir(cwd)  # a module fixture cannot use monkeypatch; every test chdirs again
    try:
        assert main([str(a) for a in compress_argv(pair)]) == 0
        assert main(["rebuild", str(pair[0]), "diff", "-o", "rebuilt", *REBUILD]) == 0
    finally:
        os.chdir(ROOT)
    diff, rebuilt = tree(cwd / "diff"), tree(cwd / "rebuilt")
    assert len([n for n in diff if n.endswith(".kdiff")]) >= 6
    assert len([n for n in rebuilt if n.endswith(".safetensors")]) >= 6
    return cwd, diff, rebuilt


class Recorder:
    """Stands in for the tqdm bar: records every update the driver makes."""

    disable = False

    def __init__(self, total, *args, **kwargs):
        self.total, self.updates = total, []
        Recorder.last = self

    def update(self, n=1):
        self.updates.append(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_compress_rebuild_verify_under_ray_are_byte_identical(cluster, pair, local, tmp_path,
                                                              monkeypatch, capsys):
    ref_cwd, ref_diff, ref_rebuilt = local
    monkeypatch.setattr(sys.modules["kenstream.engine.compress"], "bar", Recorder)
    hashed = []  # files the driver hashes: the diff shards are hashed by the tasks
    for module, name in (("kenstream.engine.compress", "sha256_file"),
                         ("kenstream.engine.compress", "sized_sha256"),
                         ("kenstream.engine.executor", "sized_sha256")):
        real = getattr(sys.modules[module], name)
        monkeypatch.setattr(sys.modules[module], name,
                            lambda path, real=real: hashed.append(Path(path).name) or real(path))
    code, _, err = cli(compress_argv(pair, "--executor", "ray"), tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert tree(tmp_path / "diff") == ref_diff  # the index's hashes included
    assert not [n for n in hashed if n.endswith(".kdiff")]
    bar = Recorder.last  # fed while tasks ran, and ends at the total
    assert sum(bar.updates) == bar.total and len(bar.updates) > 1

    argv = ["rebuild", pair[0], "diff", "-o", "rebuilt", *REBUILD, "--executor", "ray"]
    code, _, err = cli(argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert tree(tmp_path / "rebuilt") == ref_rebuilt

    argv = ["verify", "diff", "--base", pair[0], "--finetuned", pair[1], "--json", "-j", "1"]
    code, want, err = cli(argv, ref_cwd, monkeypatch, capsys)
    assert code == 0, err
    code, got, err = cli(argv + ["--executor", "ray"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert got == want and len(json.loads(got)["tensors"]) == 19


def killing_tally(target: int, log: Path):
    """A progress tally that SIGKILLs the worker running group ``target`` the first time
    that worker reports progress (its pid comes from inside the task), and logs every
    worker that reported on the group."""

    class KillingTally(distributed.Tally):
        def report(self, pos, worker, done):
            super().report(pos, worker, done)
            if pos != target:
                return
            if done > 0 and not getattr(self, "killed", None):
                self.killed = worker[1]
                os.kill(worker[1], signal.SIGKILL)
            log.write_text(json.dumps({"killed": getattr(self, "killed", None),
                                       "workers": [w[1] for w in self.workers[pos]]}))

    return KillingTally


def test_worker_killed_mid_shard_is_retried_into_the_same_bytes(cluster, pair, tmp_path,
                                                                 monkeypatch, capsys):
    """Shards of 8 tensors: the first shard's worker is killed once it has written its
    first tensor; Ray runs the task again, which rewrites the same ``.partial``."""
    argv = ["compress", *pair, "-o", "diff", "--keep", "0.5", "--shard-size", "9MB",
            "-j", "1", "-q"]
    code, _, err = cli(argv, tmp_path / "local", monkeypatch, capsys)
    assert code == 0, err
    log = tmp_path / "kills.json"
    monkeypatch.setattr(distributed, "Tally", killing_tally(0, log))
    monkeypatch.setattr(sys.modules["kenstream.engine.compress"], "bar", Recorder)  # a tally
    code, _, err = cli(argv + ["--executor", "ray"], tmp_path / "ray", monkeypatch, capsys)
    assert code == 0, err
    seen = json.loads(log.read_text())
    assert seen["killed"] == seen["workers"][0]
    assert len(seen["workers"]) == 2, "the shard finished before the kill reached its worker"
    assert tree(tmp_path / "ray" / "diff") == tree(tmp_path / "local" / "diff")


def test_bad_input_under_ray_gives_the_local_one_line_error(cluster, tmp_path, monkeypatch,
                                                            capsys):
    base, ft = write_pair(tmp_path / "bad", nan_at=("model.layers.1.weight", 5))
    argv = ["compress", base, ft, "-o", "diff", *COMPRESS]
    code, _, want = cli(argv, tmp_path / "local", monkeypatch, capsys)
    assert code == 2 and want.startswith("error: ") and want.count("\n") == 1, want
    assert "tensor 'model.layers.1.weight'" in want and "row 5" in want
    code, _, got = cli(argv + ["--executor", "ray"], tmp_path / "ray", monkeypatch, capsys)
    assert code == 2
    assert got == want
    out = tmp_path / "ray" / "diff"
    names = [p.name for p in out.iterdir()]
    assert not [n for n in names if n.endswith(".partial")]  # cancelled tasks cleaned up
    assert "kenstream-diff.json" not in names and "kenstream-diff.partial.json" in names
    assert len([n for n in names if n.endswith(".kdiff")]) < 8  # the rest was cancelled


def settled(directory: Path, quiet_for: float = 1.0, timeout: float = 30.0) -> None:
    """Wait until no file in ``directory`` appears, vanishes or changes size for
    ``quiet_for`` seconds: the workers of a killed driver have stopped."""
    def state():
        return sorted((p.name, p.stat().st_size) for p in directory.iterdir())

    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            now = state()
        except FileNotFoundError:
            now = None
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            return
        time.sleep(0.05)
    raise AssertionError(f"{directory} still changing after {timeout} s")


def signalled_driver(pair, cluster, cwd: Path, sig) -> subprocess.Popen:
    """A Ray compress driver in its own process, writing ``cwd/diff``, sent ``sig`` once
    two of its shards are in place (or left to run if it ends first)."""
    out = cwd / "diff"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [str(a) for a in compress_argv(pair, "--executor", "ray", "--ray-address", cluster)]
    proc = subprocess.Popen([sys.executable, "-m", "kenstream", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and len(list(out.glob("*.kdiff"))) >= 2:
            proc.send_signal(sig)
            break
        time.sleep(0.0005)
    return proc


def test_resume_after_a_killed_ray_driver_keeps_finished_shards(cluster, pair, local,
                                                                tmp_path, monkeypatch,
                                                                capsys):
    """A driver in its own process, on this module's cluster, is killed with SIGKILL after
    two shards are in place; ``--resume`` under Ray keeps them and ends in the local
    bytes."""
    out = tmp_path / "diff"
    proc = signalled_driver(pair, cluster, tmp_path, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "finished before the kill"
    settled(out)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.kdiff")}
    assert kept and not (out / "kenstream-diff.json").exists()
    code, _, err = cli(compress_argv(pair, "--executor", "ray", "--resume"), tmp_path,
                       monkeypatch, capsys)
    assert code == 0, err
    assert tree(out) == local[1]
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept


def test_global_budget_under_ray_is_byte_identical(cluster, pair, tmp_path, monkeypatch,
                                                   capsys):
    """The budget's first pass runs once, in the driver; its cuts travel in the job, so
    Ray's tasks keep the local run's positions."""
    argv = compress_argv(pair, "--method", "delta", "--budget", "global")
    code, _, err = cli(argv, tmp_path / "local", monkeypatch, capsys)
    assert code == 0, err
    code, _, err = cli([*argv, "--executor", "ray"], tmp_path / "ray", monkeypatch, capsys)
    assert code == 0, err
    assert tree(tmp_path / "ray" / "diff") == tree(tmp_path / "local" / "diff")


def test_a_ray_driver_compiles_the_scores_kernel_it_runs_and_no_coder(cluster, pair, tmp_path,
                                                                       monkeypatch, capsys):
    """On a cold numba cache a budget's driver compiles the scores kernel, which its first
    pass runs, and says so; the value coder it would never run (the workers code) it
    leaves alone. The workers are other processes: the stand-ins below are the driver's."""
    import importlib

    kernels = importlib.import_module("kenstream.kernels")
    v2 = importlib.import_module("kenstream.format.v2")
    warmed = []
    monkeypatch.setattr(kernels, "compiled", lambda method, budget: False)
    monkeypatch.setattr(v2, "coder_compiled", lambda: False)
    monkeypatch.setattr(kernels, "warm_up", lambda method, budget: warmed.append(budget))
    monkeypatch.setattr(v2, "warm_up", lambda code: warmed.append(code))
    argv = [a for a in compress_argv(pair, "--method", "delta", "--budget", "global",
                                     "--executor", "ray") if a != "-q"]
    code, _, err = cli(argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert warmed == ["global"] and err.count("compiling kenstream's kernels") == 1


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_to_a_ray_driver_leaves_a_resumable_diff(cluster, pair, local,
                                                                   tmp_path, monkeypatch,
                                                                   capsys, sig, code, word):
    """ray.init puts in a SIGTERM handler of its own; the driver keeps kenstream's, so a
    Ray run stopped by either signal ends as a local one does: exit 130 / 143, one line,
    the running tasks cancelled (no temporary file left), and --resume ends in the local
    bytes."""
    out = tmp_path / "diff"
    proc = signalled_driver(pair, cluster, tmp_path, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()
    assert err.decode().strip().splitlines() == [f"error: {word}; rerun with --resume to continue"]
    settled(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert not (out / "kenstream-diff.json").exists()
    code, _, err = cli(compress_argv(pair, "--executor", "ray", "--resume"), tmp_path,
                       monkeypatch, capsys)
    assert code == 0, err
    assert tree(out) == local[1]


def test_workers_are_started_before_the_driver_claims_the_output(cluster, pair, local,
                                                                 tmp_path, monkeypatch,
                                                                 capsys):
    """The workers a run can use at once (2 CPUs, -j 1: two; the plan has more files) are
    asked for before the driver's own checks, so that they start while it works."""
    seen = []
    claim = sys.modules["kenstream.engine.rebuild"].claim_output

    def watched(*args, **kwargs):
        seen.append(list(distributed._WARMING))
        return claim(*args, **kwargs)

    monkeypatch.setattr(sys.modules["kenstream.engine.rebuild"], "claim_output", watched)
    argv = ["rebuild", pair[0], local[0] / "diff", "-o", "rebuilt", *REBUILD, "--executor", "ray"]
    code, _, err = cli(argv, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert len(seen) == 1 and len(seen[0]) == 2
    assert all(isinstance(pid, int) and pid != os.getpid() for pid in ray.get(seen[0]))
    assert tree(tmp_path / "rebuilt") == local[2]
    assert distributed._WARMING == []


def test_a_ray_address_where_nothing_listens_is_one_error_line(pair, tmp_path):
    """ray.init retries such an address for minutes in C code that no signal reaches; the
    driver refuses it at once instead (run in its own process, so a hang fails the test
    after a minute rather than holding the suite)."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(a) for a in compress_argv(pair, "--executor", "ray", "--ray-address",
                                          f"127.0.0.1:{port}")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "kenstream", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach a Ray cluster at "
                                                    f"127.0.0.1:{port}"), done.stderr
    assert not (tmp_path / "diff").exists()
