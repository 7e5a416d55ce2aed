"""What kenstream may write, and where: --overwrite replaces only folders it proves it wrote,
temporary files are never written through planted links, copied files never leak what a
link points at, a second writer is locked out, and odd paths still make a readable card.

Every case goes through ``kenstream.cli.main`` (or real processes where two must run at
once) and checks the files around the output, not only the exit code.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kenstream.cli import main
from tests.ckpt import save_dir
from tests.test_reliability import (ROOT, assert_one_error, cli, compress_argv, diff, nudged,  # noqa: F401
                                    pair, snapshot, tensors)

MARKER = ".kenstream-output"
# The modules themselves (kenstream.engine re-exports functions of the same names).
rebuild_module = importlib.import_module("kenstream.engine.rebuild")
executor_module = importlib.import_module("kenstream.engine.executor")  # runs write_shard


def interrupt_after(monkeypatch, module, name: str, calls: int) -> None:
    """Make ``module.name`` raise KeyboardInterrupt on call number ``calls + 1`` (Ctrl-C)."""
    real = getattr(module, name)
    seen = []

    def wrapper(*args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.fixture
def model_folder(tmp_path):
    """A downloaded model folder: sharded weights, index, config, tokenizer, card."""
    folder = save_dir(tmp_path / "my-model", nudged(tensors()), shards=2)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text("# my model\n")
    return folder


# -- 3. --overwrite replaces only what kenstream wrote ---------------------------------------

def test_overwrite_refuses_a_model_folder(pair, model_folder, capsys):
    """`compress -o MY_MODEL --overwrite` and `rebuild -o MY_MODEL --overwrite` on a folder
    kenstream did not write delete nothing, even though its files have kenstream's names."""
    b, f, _ = pair
    before = snapshot(model_folder)
    code, err = cli(capsys, compress_argv(b, f, model_folder, "--overwrite"), [b, f])
    assert code == 2
    assert_one_error(err, str(model_folder), "not written by kenstream")
    d = b.parent / "diff"
    assert cli(capsys, compress_argv(b, f, d), [b, f])[0] == 0
    code, err = cli(capsys, ["rebuild", b, d, "-o", model_folder, "--overwrite"], [b, f, d])
    assert code == 2
    assert_one_error(err, str(model_folder), "not written by kenstream")
    assert snapshot(model_folder) == before
    assert sorted(p.name for p in model_folder.iterdir()) == sorted(Path(p).name for p in before)


def test_overwrite_deletes_only_the_files_the_marker_lists(diff, capsys):
    """A rebuilt folder is replaced by --overwrite; a file someone added (even one named
    like kenstream's output) stays, and the marker lists exactly what the run wrote."""
    b, f, d = diff
    out = d.parent / "rebuilt"
    assert cli(capsys, ["rebuild", b, d, "-o", out], [b, f, d])[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["files"] == sorted(["README.md", "config.json",
                                      "kenstream-rebuild.partial.json", "model.safetensors",
                                      "model.safetensors.index.json"])
    (out / "model-00001-of-00002.safetensors").write_bytes(b"mine")
    (out / "notes.txt").write_text("mine")
    code, err = cli(capsys, ["rebuild", b, d, "-o", out, "--overwrite", "--shard-size", "300B"],
                    [b, f, d])
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and "model.safetensors" not in names
    assert (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # the new plan, not the old one
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"mine"
    # a file of someone else's that the next run would replace stops it, before anything
    (out / "model.safetensors").write_bytes(b"mine too")
    before = snapshot(out)
    code, err = cli(capsys, ["rebuild", b, d, "-o", out, "--overwrite"], [b, f, d])
    assert code == 2
    assert_one_error(err, str(out), "holds model.safetensors", "did not write")
    assert snapshot(out) == before


def test_marker_that_is_a_link_or_damaged_is_refused(diff, capsys, tmp_path):
    b, f, d = diff
    (d / MARKER).write_text('{"format": "kenstream-output", "files": ["../../etc/passwd"]}')
    before = snapshot(d)
    code, err = cli(capsys, compress_argv(b, f, d, "--overwrite"), [b, f])
    assert code == 2
    assert_one_error(err, MARKER, "damaged")
    assert snapshot(d) == before


# -- 4. links among the copied files --------------------------------------------------------

def test_links_out_of_the_input_folder_are_not_copied(pair, capsys, tmp_path):
    b, f, out = pair
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "hunter2"}')
    secret.chmod(0o600)
    (f / "config.json").unlink()
    (f / "config.json").symlink_to(secret)
    (f / "vocab.txt").symlink_to("/etc/passwd")
    (f / "tokenizer.json").write_text('{"private": true}')
    (f / "tokenizer.json").chmod(0o600)
    (f / "merges.txt").symlink_to("tokenizer.json")  # a link inside the folder is fine
    code, err = cli(capsys, compress_argv(b, f, out), [b, f])
    assert code == 0, err
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings), err
    assert "config.json" in err and "vocab.txt" in err and "outside" in err
    names = {p.name for p in out.iterdir()}
    assert "config.json" not in names and "vocab.txt" not in names
    assert (out / "merges.txt").read_text() == '{"private": true}'
    mode = stat.S_IMODE((out / "tokenizer.json").stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)  # a 0600 source does not become world-readable
    assert "hunter2" not in "".join(p.read_text(errors="replace") for p in out.iterdir()
                                    if p.is_file())
    # at rebuild, a config linking out of the diff folder: the index does not list it (the
    # diff was made without one), so it is not copied; a diff that lists no files (made
    # before the list) is scanned, and the link skipped with a warning
    (out / "config.json").symlink_to(secret)
    rebuilt = tmp_path / "rebuilt"
    code, err = cli(capsys, ["rebuild", b, out, "-o", rebuilt], [b, f])
    assert code == 0 and err == "", err
    assert not (rebuilt / "config.json").exists()
    index = json.loads((out / "kenstream-diff.json").read_text())
    del index["files"]
    (out / "kenstream-diff.json").write_text(json.dumps(index))
    code, err = cli(capsys, ["rebuild", b, out, "-o", tmp_path / "rebuilt-2"], [b, f])
    assert code == 0, err
    assert "config.json" in err and not (tmp_path / "rebuilt-2" / "config.json").exists()


def test_a_config_that_cannot_be_copied_stops_compress_before_any_shard(pair, capsys,
                                                                         monkeypatch):
    """The fine-tune's extra files are copied before the shards are written: a file that
    cannot be read (here a CheckpointError from the copy) is one error line, with no shard
    written first. It came after every shard, which for a large model is hours later."""
    from kenstream.errors import CheckpointError

    b, f, out = pair
    compress_mod = importlib.import_module("kenstream.engine.compress")

    def unreadable(folder, names, *args, **kwargs):
        raise CheckpointError("file cannot be opened: Permission denied",
                              file=Path(folder) / "config.json")

    monkeypatch.setattr(compress_mod, "copy_files", unreadable)
    code, err = cli(capsys, compress_argv(b, f, out), [b, f])
    assert code == 2
    assert_one_error(err, "config.json", "Permission denied")
    assert not list(out.glob("*.kdiff")) and not list(out.glob("*.partial"))


def test_hub_cache_snapshot_links_keep_working(pair, capsys, tmp_path):
    """A hub cache snapshot's files are links to ../../blobs/...: they are copied."""
    b, f, out = pair
    repo = tmp_path / "hub" / "models--org--tuned"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(("model.safetensors", "config.json")):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes((f / name).read_bytes())
        (snap / name).symlink_to(Path("../../blobs") / blob.name)
    code, err = cli(capsys, compress_argv(b, snap, out), [b, repo])
    assert code == 0, err
    assert "warning" not in err
    assert (out / "config.json").read_bytes() == (f / "config.json").read_bytes()


def test_interrupt_between_a_files_creation_and_its_cleanup_leaves_no_temporary(
        pair, capsys, monkeypatch):
    """Ctrl-C right after a shard's temporary file is created, before the code that would
    delete it on the way out has started: the run still leaves no temporary file."""
    b, f, out = pair
    argv = compress_argv(b, f, out, "--shard-size", "300B")
    writer_module = importlib.import_module("kenstream.io.writer")
    real = writer_module.ShardWriter.__init__
    made = []

    def created_then_interrupted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self.temp)
        if len(made) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.ShardWriter, "__init__", created_then_interrupted)
    assert cli(capsys, argv, [b, f])[0] == 130
    assert len(made) == 2 and made[1].parent == out
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]
    monkeypatch.undo()
    code, err = cli(capsys, argv + ["--resume"], [b, f])
    assert code == 0, err


def test_a_refused_resume_leaves_a_killed_runs_temporary_file(pair, capsys, monkeypatch):
    """A run killed outright (no cleanup) leaves a shard's temporary file; a --resume refused
    for other settings must change nothing in the folder, that file included."""
    b, f, out = pair
    argv = compress_argv(b, f, out, "--shard-size", "300B")
    interrupt_after(monkeypatch, executor_module, "write_shard", 2)
    assert cli(capsys, argv, [b, f])[0] == 130
    monkeypatch.undo()
    listed = json.loads((out / MARKER).read_text())["files"]
    unwritten = next(n for n in listed if not (out / n).exists() and n.endswith(".kdiff"))
    stale = out / (unwritten + ".partial")
    stale.write_bytes(b"left by a run killed with SIGKILL")
    before = snapshot(out)
    other = list(argv)
    other[other.index("--keep") + 1] = "0.25"
    code, err = cli(capsys, other + ["--resume"], [b, f])
    assert code == 2 and "but 0.5 in the interrupted run" in err, err
    assert snapshot(out) == before


def test_rerun_into_an_interrupted_run_says_resume_finishes_it(diff, capsys, tmp_path,
                                                               monkeypatch):
    """The same command again, into the folder an interrupted compress or rebuild left,
    said 'exists and is not empty (pass --overwrite to replace it, or --resume)': it names
    the interrupted run, and --resume then finishes it. A finished one is as it was."""
    b, f, d = diff
    runs = (("compress", compress_argv(b, f, tmp_path / "d2", "--shard-size", "300B"),
             executor_module, "write_shard", "kenstream-diff.partial.json"),
            ("rebuild", ["rebuild", b, d, "-o", tmp_path / "m2", "--shard-size", "300B"],
             rebuild_module, "_write_group", "kenstream-rebuild.partial.json"))
    for run, argv, module, name, plan in runs:
        out = argv[argv.index("-o") + 1]
        interrupt_after(monkeypatch, module, name, 1)
        assert cli(capsys, argv, [b, f, d])[0] == 130
        monkeypatch.undo()
        before = snapshot(out)
        code, err = cli(capsys, argv, [b, f, d])
        assert code == 2 and snapshot(out) == before
        assert_one_error(err, f"{out}: holds an interrupted {run} (its plan {plan} is here) "
                              "(rerun with --resume to finish it, or --overwrite to start "
                              "again)")
        code, err = cli(capsys, argv + ["--resume"], [b, f, d])
        assert code == 0, err
        code, err = cli(capsys, argv, [b, f, d])
        assert code == 2
        assert_one_error(err, f"{out}: exists and is not empty (pass --overwrite")


# -- 5. temporary files are created, never opened through a link ------------------------------

def test_resume_never_writes_through_links_at_temporary_names(pair, capsys, tmp_path,
                                                              monkeypatch):
    b, f, out = pair
    (f / "tokenizer.json").write_text("{}")
    argv = compress_argv(b, f, out, "--shard-size", "300B")
    interrupt_after(monkeypatch, executor_module, "write_shard", 1)
    assert cli(capsys, argv, [b, f])[0] == 130
    monkeypatch.undo()
    shards = json.loads((out / "kenstream-diff.partial.json").read_text())["shards"]
    victims = {}
    for name in ("README.md", "config.json", "kenstream-diff.json", sorted(shards)[1],
                 "tokenizer.json"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (out / (name + ".partial")).symlink_to(victim)
        victims[victim] = "precious"
    code, err = cli(capsys, argv + ["--resume"], [b, f])
    assert code == 0, err
    for victim, text in victims.items():
        assert victim.read_text() == text, victim
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    code, err = cli(capsys, ["verify", out, "--base", b, "--finetuned", f], [b, f, out])
    assert code == 0, err


def test_rebuild_resume_never_writes_through_links(diff, capsys, tmp_path, monkeypatch):
    b, f, d = diff
    out = tmp_path / "rebuilt"
    argv = ["rebuild", b, d, "-o", out, "--shard-size", "300B"]
    interrupt_after(monkeypatch, rebuild_module, "_write_group", 1)
    assert cli(capsys, argv, [b, f, d])[0] == 130
    monkeypatch.undo()
    files = json.loads((out / "kenstream-rebuild.partial.json").read_text())["files"]
    victims = []
    for name in ("model.safetensors.index.json", files[1], files[-1]):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (out / (name + ".partial")).symlink_to(victim)
        victims.append(victim)
    code, err = cli(capsys, argv + ["--resume"], [b, f, d])
    assert code == 0, err
    assert all(v.read_text() == "precious" for v in victims)


@pytest.mark.parametrize("extra", [[], ["--resume"], ["--overwrite"]])
def test_an_output_that_is_a_link_is_refused_before_anything_is_written(diff, capsys,
                                                                       tmp_path, extra):
    """`-o LINK` would put the marker, lock and plan behind the link and then fail at the
    first file written without following links: refused up front, naming the folder to
    pass. A link above the output is no link out of it, and works."""
    b, f, d = diff
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    for argv in (["rebuild", b, d, "-o", link], compress_argv(b, f, link),
                 compress_argv(b, f, link)[:-2] + ["--size", "50%"]):
        code, err = cli(capsys, argv + extra, [b, f, d])
        assert code == 2
        assert_one_error(err, str(link), "symbolic link", f"pass the folder it points to, "
                                                          f"{target.resolve()}")
        assert list(target.iterdir()) == [] and link.is_symlink()
    code, err = cli(capsys, ["rebuild", b, d, "-o", link / "rebuilt"], [b, f, d])
    assert code == 0, err
    assert (target / "rebuilt" / "model.safetensors").is_file()


# -- 6. one writer at a time ------------------------------------------------------------------

_HELD = """
import os, sys, time
import importlib
c = importlib.import_module("kenstream.engine.executor")  # where shards are written
go = sys.argv[1]
real = c.write_shard
def waiting(*args, **kwargs):
    while not os.path.exists(go):
        time.sleep(0.01)
    return real(*args, **kwargs)
c.write_shard = waiting
from kenstream.cli import entry
sys.argv = ["kenstream", *sys.argv[2:]]
entry()
"""


def _python(args, cwd, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(path: Path, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_second_writer_is_refused_and_a_killed_one_releases(pair, tmp_path):
    b, f, out = pair
    argv = [str(a) for a in compress_argv(b, f, out, "-q")]
    go = tmp_path / "go"
    first = _python(["-c", _HELD, str(go), *argv], tmp_path)
    _wait_for(out / "kenstream-diff.partial.json", first)
    for extra in (["--overwrite"], ["--resume"]):
        second = _python(["-m", "kenstream", *argv, *extra], tmp_path)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert_one_error(err, str(out), "another kenstream run is writing here")
    go.touch()
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [
        MARKER, ".kenstream.lock"]
    done = subprocess.run([sys.executable, "-m", "kenstream", "verify", str(out), "--base",
                           str(b), "--finetuned", str(f), "-q"], env=dict(
                               os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # a writer killed while holding the lock leaves it free for the next run
    go.unlink()
    killed = _python(["-c", _HELD, str(go), *argv, "--overwrite"], tmp_path)
    _wait_for(out / "kenstream-diff.partial.json", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _python(["-m", "kenstream", *argv, "--resume"], tmp_path)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err


# -- 8. paths that are not UTF-8 ----------------------------------------------------------------

def test_paths_that_are_not_utf8(tmp_path, capsys):
    base = tensors()
    b = save_dir(tmp_path / os.fsdecode(b"base-\xe9"), base)
    f = save_dir(tmp_path / "ft", nudged(base))
    out = tmp_path / os.fsdecode(b"out\xe9\n")
    code = main([str(a) for a in compress_argv(b, f, out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "\\xe9" in captured.out and "Traceback" not in captured.err
    card = (out / "README.md").read_bytes().decode("utf-8")  # valid UTF-8
    assert "out\\xe9\\n" in card and "base-\\xe9" in card
    code, err = cli(capsys, ["verify", out, "--base", b, "--finetuned", f], [b, f, out])
    assert code == 0, err


# -- 15. the demo's folder ----------------------------------------------------------------------

def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    folder = tmp_path / "work"
    (folder / "base").mkdir(parents=True)
    (folder / "base" / "model.safetensors").write_bytes(b"my real weights")
    before = snapshot(folder)
    assert main(["demo", str(folder), "-q"]) == 2
    err = capsys.readouterr().err
    assert_one_error(err, str(folder), "not written by kenstream")
    assert snapshot(folder) == before
    demo = tmp_path / "demo"
    assert main(["demo", str(demo), "-q"]) == 0
    assert main(["demo", str(demo), "-q"]) == 0  # a previous demo is replaced
    capsys.readouterr()
