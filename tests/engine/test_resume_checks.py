"""What --resume checks before it finishes a run: the inputs and every setting that shapes
the output's bytes must be the interrupted run's. Runs are interrupted in-process (a
KeyboardInterrupt at the start of the second shard, as Ctrl-C would) on tiny pairs; the
process-level kills are in ``test_resume.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import torch

from kenstream.cli import main
from kenstream.io.fingerprint import HEAD_BYTES, SAMPLE_BYTES, SAMPLES, fingerprint
from tests.ckpt import save_dir
from tests.test_outputs import executor_module, interrupt_after, rebuild_module
from tests.test_reliability import (assert_one_error, cli, compress_argv, diff, nudged,  # noqa: F401
                                    pair, snapshot, tensors)


def files_of(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


# -- 1. rebuild --resume with another base or settings ---------------------------------------

def test_rebuild_resume_refuses_another_base_or_settings(diff, capsys, monkeypatch, tmp_path):
    """A rebuild started with the wrong base (--force) and resumed with the right one must
    not keep the shards made from the wrong one; nor may --force or --shard-size change."""
    b, f, d = diff
    # Format 1 stores raw values, so a base of other values can be forced under it (a
    # format-2 diff refuses to decode over it at all).
    d1 = tmp_path / "diff-v1"
    assert cli(capsys, compress_argv(b, f, d1, "--format-version", "1"), [b, f])[0] == 0
    other = save_dir(tmp_path / "other", tensors(seed=9))
    out = tmp_path / "rebuilt"
    argv = ["rebuild", other, d1, "-o", out, "--shard-size", "300B", "--force"]
    interrupt_after(monkeypatch, rebuild_module, "_write_group", 1)
    assert cli(capsys, argv, [b, f, d1, other])[0] == 130
    monkeypatch.undo()
    before = snapshot(out)
    right = ["rebuild", b, d1, "-o", out, "--shard-size", "300B", "--force", "--resume"]
    code, err = cli(capsys, right, [b, f, d1])
    assert code == 2
    assert_one_error(err, "kenstream-rebuild.partial.json", "base files differ", "--resume")
    assert snapshot(out) == before
    # the right base from the start, then a resume that drops --force or changes the size
    shutil.rmtree(out)
    argv = ["rebuild", b, d, "-o", out, "--shard-size", "300B", "--force"]
    interrupt_after(monkeypatch, rebuild_module, "_write_group", 1)
    assert cli(capsys, argv, [b, f, d])[0] == 130
    monkeypatch.undo()
    before = snapshot(out)
    for resume, what in ((argv[:-1] + ["--resume"], "--force setting"),
                         (argv[:6] + ["400B", "--force", "--resume"], "--shard-size value")):
        code, err = cli(capsys, resume, [b, f, d])
        assert code == 2, err
        assert_one_error(err, "kenstream-rebuild.partial.json", what, "differ")
        assert snapshot(out) == before
    code, err = cli(capsys, argv + ["--resume"], [b, f, d])
    assert code == 0, err
    reference = tmp_path / "reference"
    assert cli(capsys, ["rebuild", b, d, "-o", reference, "--shard-size", "300B"], [b, f, d])[0] == 0
    assert files_of(out) == files_of(reference)


def test_rebuild_resume_of_a_finished_model_checks_what_made_it(diff, capsys, tmp_path):
    """--resume on a finished model (nothing to resume) still refuses, leaving it as it is,
    when this command would write another model: another diff, another --shard-size, or
    another base; the same command says it is done and exits 0."""
    b, f, d = diff
    out = tmp_path / "rebuilt"
    argv = ["rebuild", b, d, "-o", out, "--shard-size", "300B"]
    assert cli(capsys, argv, [b, f, d])[0] == 0
    before = snapshot(out)
    lossless = tmp_path / "lossless"
    assert cli(capsys, ["compress", b, f, "-o", lossless, "--keep", "1"], [b, f])[0] == 0
    other_base = save_dir(tmp_path / "other", tensors(seed=9))
    for resume, needles in (
            (["rebuild", b, lossless, "-o", out, "--shard-size", "300B"],
             ("rebuilt from another diff",)),
            (["rebuild", b, d, "-o", out, "--shard-size", "5MB"], ("index differs",)),
            (["rebuild", other_base, d, "-o", out, "--shard-size", "300B"],
             ("this diff was made from",))):
        code, err = cli(capsys, resume + ["--resume"], [b, f, d, lossless, other_base])
        assert code == 2, err
        assert_one_error(err, *needles)
        assert snapshot(out) == before
    code, err = cli(capsys, argv + ["--resume"], [b, f, d])
    assert code == 0, err
    assert snapshot(out) == before
    # Two shards either way, under the same names, split otherwise: [a], [b, c] at 600 B
    # and [a, b], [c] at 1050 B (the tensors are 512, 512 and 64 bytes).
    shutil.rmtree(out)
    assert cli(capsys, ["rebuild", b, d, "-o", out, "--shard-size", "600B"], [b, f, d])[0] == 0
    before = snapshot(out)
    code, err = cli(capsys, ["rebuild", b, d, "-o", out, "--shard-size", "1050B", "--resume"],
                    [b, f, d])
    assert code == 2
    assert_one_error(err, "index differs")
    # An index edited after the run is refused too, rather than reported as the result.
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 1
    index_path.write_text(json.dumps(index))
    code, err = cli(capsys, ["rebuild", b, d, "-o", out, "--shard-size", "600B", "--resume"],
                    [b, f, d])
    assert code == 2
    assert_one_error(err, "index differs")


def test_compress_resume_of_a_finished_diff_that_lost_a_shard(pair, capsys, tmp_path):
    """A finished diff missing one shard is not done: --resume says which shard, and that
    --overwrite writes the diff again (it said 'wrote ...', exit 0). A path that does not
    exist is called that, not 'not a diff directory'."""
    b, f, out = pair
    argv = compress_argv(b, f, out, "--shard-size", "100B")
    assert cli(capsys, argv, [b, f])[0] == 0
    shards = sorted(out.glob("*.kdiff"))
    assert len(shards) > 1
    shards[1].unlink()
    code, err = cli(capsys, argv + ["--resume"], [b, f])
    assert code == 2
    assert_one_error(err, shards[1].name, "shard is missing", "--overwrite")
    code, err = cli(capsys, ["info", tmp_path / "nowhere"])
    assert code == 2
    assert_one_error(err, "nowhere", "does not exist")


def test_resume_of_a_finished_run_copies_lost_companions_again(pair, capsys, tmp_path):
    """A finished diff or model whose config or tokenizer was deleted, edited or replaced
    by a link is not whole: --resume copies those files again (from the fine-tune into the
    diff, from the diff into the model), replaces a link rather than writing through it,
    and names what it copied. It said 'nothing to resume' and kept the loss."""
    b, f, d = pair
    (f / "tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    (f / "README.md").write_text("the fine-tune's own card")
    argv = compress_argv(b, f, d)
    assert cli(capsys, argv, [b, f])[0] == 0
    shards = files_of(d)
    outside = tmp_path / "outside.json"
    outside.write_text("not part of any model")
    (d / "config.json").unlink()
    (d / "tokenizer.json").write_text("edited")
    (d / "README.finetuned.md").unlink()
    (d / "README.finetuned.md").symlink_to(outside)
    code = main([str(a) for a in argv + ["--resume"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "copied again" in err
    for name in ("config.json", "tokenizer.json", "README.md"):
        assert name in err
    assert outside.read_text() == "not part of any model"
    assert not (d / "README.finetuned.md").is_symlink()
    for src, dst in (("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"),
                     ("README.md", "README.finetuned.md")):
        assert (d / dst).read_bytes() == (f / src).read_bytes()
    assert files_of(d).keys() == shards.keys()
    assert {n: h for n, h in files_of(d).items() if n.endswith(".kdiff")} == \
        {n: h for n, h in shards.items() if n.endswith(".kdiff")}
    # Nothing lost: the run says so and changes nothing.
    again = files_of(d)
    code = main([str(a) for a in argv + ["--resume"]])
    out, err = capsys.readouterr()
    assert code == 0 and "nothing to resume" in err and "copied again" not in err, err
    assert files_of(d) == again

    model = tmp_path / "model"
    rebuild_argv = ["rebuild", b, d, "-o", model]
    assert cli(capsys, rebuild_argv, [b, d])[0] == 0
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").unlink()
    assert cli(capsys, rebuild_argv + ["--resume"], [b, d])[0] == 0
    for name in ("config.json", "tokenizer.json"):
        assert (model / name).read_bytes() == (f / name).read_bytes()


# -- 12. tensor names holding '::' ----------------------------------------------------------

def test_names_with_double_colons_resume(tmp_path, capsys, monkeypatch):
    """Entry names are ``TENSOR::role``; a tensor name that holds '::' itself (even one
    ending like a role) must resume into the same bytes as an uninterrupted run."""
    g = torch.Generator().manual_seed(4)
    base = {name: torch.randn(8, 16, generator=g)
            for name in ("enc::a.weight", "x::values", "plain.weight", "y::mask::index")}
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", nudged(base))
    out = tmp_path / "diff"
    argv = compress_argv(b, f, out, "--shard-size", "300B")
    assert cli(capsys, argv, [b, f])[0] == 0
    reference = files_of(out)
    assert len([n for n in reference if n.endswith(".kdiff")]) == 4
    shutil.rmtree(out)
    interrupt_after(monkeypatch, executor_module, "write_shard", 2)
    assert cli(capsys, argv, [b, f])[0] == 130
    monkeypatch.undo()
    code, err = cli(capsys, argv + ["--resume"], [b, f])
    assert code == 0, err
    assert files_of(out) == reference
    code, err = cli(capsys, ["verify", out, "--base", b, "--finetuned", f], [b, f, out])
    assert code == 0, err


# -- 19. --strict-resume ----------------------------------------------------------------------

def _unsampled_offset(size: int, data_start: int) -> int:
    """A 4-aligned byte offset that the sampled fingerprint does not read."""
    span = size - SAMPLE_BYTES
    starts = [i * span // (SAMPLES - 1) for i in range(SAMPLES)]
    for a, c in zip(starts, starts[1:]):
        gap = (a + SAMPLE_BYTES, c)
        mid = (gap[0] + gap[1]) // 2 // 4 * 4
        if gap[1] - gap[0] > 64 and mid > max(HEAD_BYTES, data_start) + 64:
            return mid
    raise AssertionError("no unsampled gap")


def test_strict_resume_sees_edits_the_fingerprint_misses(tmp_path, capsys, monkeypatch):
    g = torch.Generator().manual_seed(5)
    base = {"big.weight": torch.randn(1024, 1024, generator=g),  # 4 MiB: sampled, not hashed
            "small.weight": torch.randn(8, 16, generator=g)}
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", nudged(base))
    model = f / "model.safetensors"
    out = tmp_path / "diff"
    for strict in (False, True):
        shutil.rmtree(out, ignore_errors=True)
        argv = compress_argv(b, f, out, "--shard-size", "1MB",
                             *(["--strict-resume"] if strict else []))
        interrupt_after(monkeypatch, executor_module, "write_shard", 1)
        assert cli(capsys, argv, [b, f])[0] == 130
        monkeypatch.undo()
        # edit one weight in place, outside every window the fingerprint samples
        raw = bytearray(model.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        at = _unsampled_offset(len(raw), 8 + n)
        before = fingerprint(model)
        raw[at:at + 4] = struct.pack("<f", 0.25 if strict else 0.125)
        model.write_bytes(bytes(raw))
        assert fingerprint(model) == before  # the sampled identity cannot see it
        state = snapshot(out)
        code, err = cli(capsys, argv + ["--resume"], [b, f])
        if not strict:
            assert code == 0, err  # sampled mode: documented to accept it
            continue
        assert code == 2
        assert_one_error(err, "kenstream-diff.partial.json", "--strict-resume",
                         "model.safetensors", "changed", "sha256")
        assert snapshot(out) == state
    # a resume that asks for --strict-resume of a run made without it is refused too
    shutil.rmtree(out)
    argv = compress_argv(b, f, out, "--shard-size", "1MB")
    interrupt_after(monkeypatch, executor_module, "write_shard", 1)
    assert cli(capsys, argv, [b, f])[0] == 130
    monkeypatch.undo()
    code, err = cli(capsys, argv + ["--strict-resume", "--resume"], [b, f])
    assert code == 2
    assert_one_error(err, "--strict-resume settings differ")
    # a strict run that is not interrupted makes the same diff as a plain one
    shutil.rmtree(out)
    assert cli(capsys, compress_argv(b, f, out, "--shard-size", "1MB"), [b, f])[0] == 0
    plain = files_of(out)
    shutil.rmtree(out)
    assert cli(capsys, compress_argv(b, f, out, "--shard-size", "1MB", "--strict-resume"),
               [b, f])[0] == 0
    assert files_of(out) == plain
    assert json.loads((out / "kenstream-diff.json").read_text())["complete"] is True


def test_resume_names_a_damaged_finished_shard_as_its_own(diff, capsys, monkeypatch, tmp_path):
    """A finished shard whose header is gone (a race with a task of the killed run can
    leave one under its final name) is refused by --resume in one line that says to delete
    it and resume, not to download it again: it is this run's own output."""
    b, f, d = diff
    for kind in ("compress", "rebuild"):
        out = tmp_path / kind
        if kind == "compress":
            argv = compress_argv(b, f, out, "--shard-size", "300B")
            interrupt_after(monkeypatch, executor_module, "write_shard", 1)
        else:
            argv = ["rebuild", b, d, "-o", out, "--shard-size", "300B"]
            interrupt_after(monkeypatch, rebuild_module, "_write_group", 1)
        assert cli(capsys, argv, [b, f, d])[0] == 130
        monkeypatch.undo()
        first = sorted(p for p in out.iterdir() if p.suffix in (".kdiff", ".safetensors"))[0]
        with open(first, "r+b") as fh:
            fh.write(bytes(8))  # the header length a writer fills in last
        code, err = cli(capsys, argv + ["--resume"], [b, f, d])
        assert code == 2, err
        assert_one_error(err, first.name, "delete it and rerun with --resume")
        assert "download" not in err
