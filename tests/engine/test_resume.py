"""Interrupted runs: a real ``python -m kenstream`` process is killed with SIGKILL at several
points, the directory it leaves must read as unfinished, and ``--resume`` must finish it into
files byte-identical to an uninterrupted run's (every file: shards, index, README, config).

The reference and the interrupted runs use the same command line, each in its own working
directory with the output given as the relative path ``diff`` / ``rebuilt``, so that the
recorded command (in the index and README) is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kenstream.cli import main
from kenstream.io.diff_reader import DiffReader
from kenstream.io.outputs import write_marker
from kenstream.errors import DiffError
from tests.ckpt import float_pair

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
COMPRESS = ["--keep", "0.5", "--shard-size", "1500kB"]
REBUILD = ["--shard-size", "2MB"]


def tree(directory: Path) -> dict:
    """file name -> sha256 of every file in ``directory`` (flat)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def inputs_state(*dirs) -> dict:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for d in dirs for p in sorted(Path(d).iterdir())}


def command(kind: str, pair, diff=None) -> list:
    base, ft = pair
    if kind == "compress":
        return ["compress", str(base), str(ft), "-o", "diff", *COMPRESS, "-q"]
    return ["rebuild", str(base), str(diff), "-o", "rebuilt", *REBUILD, "-q"]


def start(argv, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kenstream", *argv], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kenstream", *argv], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def kill_when(proc: subprocess.Popen, ready, timeout=120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` is true; returns whether it was still running."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return proc.returncode == -signal.SIGKILL
        time.sleep(0.0005)
    proc.wait(timeout=timeout)
    return False


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A ~25 MB float32 base / fine-tune pair with a prefix, a new head, an int buffer and
    config + tokenizer files; written by the safetensors library."""
    return float_pair(tmp_path_factory.mktemp("pair"), layers=24, shape=(256, 1024))


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """Uninterrupted runs: (diff file hashes, rebuilt file hashes, diff dir, seconds taken)."""
    warm = tmp_path_factory.mktemp("warm-up")  # fills the numba cache; times only a warm run
    assert run(command("compress", pair), warm).returncode == 0
    cwd = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    proc = run(command("compress", pair), cwd)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    diff = cwd / "diff"
    assert tree(diff) == tree(warm / "diff")  # two whole runs agree byte for byte
    proc = run(command("rebuild", pair, diff), cwd)
    assert proc.returncode == 0, proc.stderr
    d, r = tree(diff), tree(cwd / "rebuilt")
    assert len([n for n in d if n.endswith(".kdiff")]) >= 5
    assert len([n for n in r if n.endswith(".safetensors")]) >= 5
    assert {"README.md", "config.json", "tokenizer.json", "kenstream-diff.json"} <= set(d)
    return d, r, diff, seconds


def assert_reads_unfinished(out: Path, pair, capsys) -> None:
    """Every reader of an interrupted diff says it is unfinished and how to finish it."""
    with pytest.raises(DiffError) as caught:
        DiffReader(out)
    assert "unfinished" in str(caught.value) and "--resume" in str(caught.value)
    base, ft = pair
    for argv in (["info", out], ["verify", out, "--base", base],
                 ["rebuild", base, out, "-o", out.parent / "elsewhere"]):
        assert main([str(a) for a in argv] + ["-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "unfinished" in err and "--resume" in err and "Traceback" not in err
    assert not (out.parent / "elsewhere" / "model.safetensors.index.json").exists()


def _exists(path: Path):
    return lambda: path.exists()


def _shard(n: int, suffix=""):
    return lambda out: next(iter(out.glob(f"kendiff-{n:05d}-of-*.kdiff{suffix}")), None) is not None


COMPRESS_KILLS = {
    "plan-written": [lambda out: (out / "kenstream-diff.partial.json").exists()],
    "first-shard": [_shard(1)],
    "inside-shard-3": [_shard(3, ".partial")],
    "twice": [_shard(2), _shard(5, ".partial")],
}


@pytest.mark.parametrize("case", sorted(COMPRESS_KILLS))
def test_compress_killed_then_resumed(pair, reference, tmp_path, capsys, case):
    ref_diff = reference[0]
    before = inputs_state(*pair)
    out = tmp_path / "diff"
    for trigger in COMPRESS_KILLS[case]:
        argv = command("compress", pair) + (["--resume"] if out.exists() else [])
        proc = start(argv, tmp_path)
        assert kill_when(proc, lambda: out.exists() and trigger(out)), "finished before the kill"
        assert not (out / "kenstream-diff.json").exists()
        assert (out / "kenstream-diff.partial.json").exists()
        assert_reads_unfinished(out, pair, capsys)
    proc = run(command("compress", pair) + ["--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tree(out) == ref_diff
    assert inputs_state(*pair) == before


def _half_written(n: int, reference_dir: Path):
    """Shard ``n``'s temporary file holds at least half of its final bytes."""
    final = next(reference_dir.glob(f"kendiff-{n:05d}-of-*.kdiff")).stat().st_size

    def ready(out):
        part = next(iter(out.glob(f"kendiff-{n:05d}-of-*.kdiff.partial")), None)
        try:
            return part is not None and part.stat().st_size >= final // 2
        except FileNotFoundError:  # renamed between the glob and the stat
            return False
    return ready


def _last_shard_done(reference_tree: dict):
    """Every shard is in place: the run is hashing them, copying files or writing the index."""
    shards = [n for n in reference_tree if n.endswith(".kdiff")]
    return lambda out: all((out / n).exists() for n in shards)


@pytest.mark.parametrize("moment", ["half-written-shard", "after-the-last-shard"])
def test_compress_killed_at_a_late_moment(pair, reference, tmp_path, moment):
    """Kill mid-write of a shard's data, or after the last shard while the index is being
    made; --resume must end in the reference bytes."""
    ref_diff = reference[0]
    ready = (_half_written(4, reference[2]) if moment == "half-written-shard"
             else _last_shard_done(ref_diff))
    out = tmp_path / "diff"
    proc = start(command("compress", pair), tmp_path)
    assert kill_when(proc, lambda: out.exists() and ready(out)), "finished before the kill"
    assert not (out / "kenstream-diff.json").exists()
    proc = run(command("compress", pair) + ["--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tree(out) == ref_diff


def _search_in_pass(n: int):
    """The ``--size`` search is inside pass ``n``: its record names n - 1 finished passes
    and the pass's plan file is there (for the whole pass: the widest window to kill in)."""
    def ready(out):
        try:
            record = json.loads((out / ".kenstream-size").read_text())
        except (FileNotFoundError, ValueError):
            return False
        return len(record["passes"]) == n - 1 and (out / "kenstream-diff.partial.json").exists()
    return ready


def test_size_search_killed_then_resumed(pair, tmp_path):
    """A --size search SIGKILLed inside its second pass resumes with --resume into the files
    of an uninterrupted search, the record of its passes included."""
    argv = command("compress", pair)
    argv[argv.index("--keep"):argv.index("--keep") + 2] = ["--size", "4MB"]
    whole = tmp_path / "whole"
    whole.mkdir()
    proc = run(argv, whole)
    assert proc.returncode == 0, proc.stderr
    ref = tree(whole / "diff")
    out = tmp_path / "diff"
    proc = start(argv, tmp_path)
    assert kill_when(proc, lambda: out.exists() and _search_in_pass(2)(out)), \
        "finished before the kill"
    assert not (out / "kenstream-diff.json").exists()
    proc = run(argv + ["--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tree(out) == ref


def test_resume_with_other_settings_is_refused(pair, reference, tmp_path):
    out = tmp_path / "diff"
    proc = start(command("compress", pair), tmp_path)
    assert kill_when(proc, lambda: out.exists() and _shard(2)(out))
    before = tree(out)
    argv = command("compress", pair) + ["--resume"]
    argv[argv.index("0.5")] = "0.25"
    proc = run(argv, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "selection setting keep is 0.25 here but 0.5 in the interrupted run" in proc.stderr
    assert "kenstream-diff.partial.json" in proc.stderr
    assert tree(out) == before


def test_resume_refuses_a_foreign_shard(pair, reference, tmp_path):
    """A finished shard is reused only if it holds exactly the tensors the plan puts in it."""
    out = tmp_path / "diff"
    proc = start(command("compress", pair), tmp_path)
    assert kill_when(proc, lambda: out.exists() and _shard(3)(out))
    first = next(out.glob("kendiff-00001-*.kdiff"))
    second = next(out.glob("kendiff-00002-*.kdiff"))
    first.write_bytes(second.read_bytes())
    proc = run(command("compress", pair) + ["--resume"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert first.name in proc.stderr and "plan" in proc.stderr
    assert not (out / "kenstream-diff.json").exists()


def test_resume_of_finished_and_of_foreign_directories(pair, reference, tmp_path, capsys):
    diff = reference[2]
    before = tree(diff)
    base, ft = pair
    argv = ["compress", str(base), str(ft), "-o", str(diff), *COMPRESS, "--resume", "-q"]
    assert main(argv) == 0
    assert tree(diff) == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("x")
    argv[argv.index(str(diff))] = str(foreign)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing to resume" in err and str(foreign) in err
    assert tree(foreign) == {"todo.txt": hashlib.sha256(b"x").hexdigest()}


def test_resume_after_kill_before_the_plan_was_renamed(pair, reference, tmp_path):
    """Killed while the plan itself was being written: only a temp file is left, and
    --resume starts afresh."""
    out = tmp_path / "diff"
    out.mkdir()
    write_marker(out, ["kenstream-diff.partial.json"])  # the first file a run makes
    (out / "kenstream-diff.partial.json.partial").write_text('{"format": "kensk')
    proc = run(command("compress", pair) + ["--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tree(out) == reference[0]


REBUILD_KILLS = {
    "plan-written": [lambda out: (out / "kenstream-rebuild.partial.json").exists()],
    "first-shard": [lambda out: any(out.glob("model-00001-of-*.safetensors"))],
    "inside-shard-4": [lambda out: any(out.glob("model-00004-of-*.safetensors.partial"))],
    "twice": [lambda out: any(out.glob("model-00002-of-*.safetensors")),
              lambda out: any(out.glob("model-00006-of-*.safetensors.partial"))],
}


@pytest.mark.parametrize("case", sorted(REBUILD_KILLS))
def test_rebuild_killed_then_resumed(pair, reference, tmp_path, case):
    ref_rebuilt, diff = reference[1], reference[2]
    before = inputs_state(*pair, diff)
    out = tmp_path / "rebuilt"
    for trigger in REBUILD_KILLS[case]:
        argv = command("rebuild", pair, diff) + (["--resume"] if out.exists() else [])
        proc = start(argv, tmp_path)
        assert kill_when(proc, lambda: out.exists() and trigger(out)), "finished before the kill"
        assert not (out / "model.safetensors.index.json").exists()
        assert (out / "kenstream-rebuild.partial.json").exists()
    proc = run(command("rebuild", pair, diff) + ["--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tree(out) == ref_rebuilt
    assert inputs_state(*pair, diff) == before


def test_rebuild_resume_refuses_a_foreign_output_shard(pair, reference, tmp_path):
    diff = reference[2]
    out = tmp_path / "rebuilt"
    proc = start(command("rebuild", pair, diff), tmp_path)
    assert kill_when(proc, lambda: out.exists() and any(out.glob("model-00003-of-*.safetensors")))
    first = next(out.glob("model-00001-of-*.safetensors"))
    first.write_bytes(next(out.glob("model-00002-of-*.safetensors")).read_bytes())
    proc = run(command("rebuild", pair, diff) + ["--resume"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert first.name in proc.stderr and "plan" in proc.stderr
    assert not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("kind", ["compress", "rebuild"])
def test_resume_with_a_damaged_plan_file(pair, reference, tmp_path, capsys, kind):
    base, ft = pair
    out = tmp_path / "out"
    out.mkdir()
    marker = "kenstream-diff.partial.json" if kind == "compress" else "kenstream-rebuild.partial.json"
    write_marker(out, [marker])
    (out / marker).write_text('{"format": "kenstream-diff", "sett')
    argv = (["compress", base, ft, "-o", out, *COMPRESS] if kind == "compress"
            else ["rebuild", base, reference[2], "-o", out])
    assert main([str(a) for a in argv] + ["--resume", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert marker in err and "JSON" in err


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_leaves_a_resumable_diff(pair, reference, tmp_path, sig, code, word):
    """SIGINT (Ctrl-C) or SIGTERM in the middle of a run: exit 130 / 143, one line saying
    how to go on, no temporary file left, and --resume ends in the reference bytes."""
    out = tmp_path / "diff"
    proc = start(command("compress", pair), tmp_path)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and _shard(2)(out):
            proc.send_signal(sig)
            break
        time.sleep(0.0005)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = err.decode().strip().splitlines()
    assert lines == [f"error: {word}; rerun with --resume to continue"]
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert not (out / "kenstream-diff.json").exists()
    proc = run(command("compress", pair) + ["--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tree(out) == reference[0]
