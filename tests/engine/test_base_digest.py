"""Base digests (docs/format.md 6.7): every record with a base carries the digest of the
base rows it takes, and rebuild, verify and load refuse a base whose content differs
anywhere the diff takes it from (an unchanged tensor, a reset position, a kept one),
naming the tensor, while the same base in other files or another dtype that holds its
values rebuilds without --force. Diffs without digests keep the fingerprint rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kenstream
from kenstream.cli import main
from kenstream.errors import IdentityError
from tests.ckpt import save_bin, save_dir
from tests.expect import bits, load_model_dir
from tests.forge import edit_records, resign
from tests.format.reference_v2 import base_digest
from tests.test_reliability import assert_not_complete, assert_one_error


def tensors(dtype=torch.float32):
    """(base, fine-tune): a changed matrix, an unchanged one, a resized vocabulary, a new
    tensor and an integer buffer."""
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(6, 16, generator=g).to(dtype),
            "frozen": torch.randn(5, 8, generator=g).to(dtype),
            "emb": torch.randn(10, 8, generator=g).to(dtype),
            "steps": torch.arange(6, dtype=torch.int64)}
    ft = {"w": base["w"] + torch.randn(6, 16, generator=g).to(dtype) * 0.1,
          "frozen": base["frozen"].clone(),
          "emb": torch.cat([base["emb"] + 0.25, torch.randn(3, 8, generator=g).to(dtype)]),
          "steps": base["steps"] + 1,
          "new": torch.randn(4, generator=g).to(dtype)}
    return base, ft


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("digest")
    base, ft = tensors()
    return save_dir(root / "base", base), save_dir(root / "ft", ft), base, ft


def rows(t: torch.Tensor, n=None) -> np.ndarray:
    """The first ``n`` rows of ``t`` as [rows, cols] of its storage bits."""
    a = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(1, -1)
    a = a.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else t.dtype).numpy()
    return a if n is None else a[:n]


def test_records_carry_the_digest_of_the_base_rows_they_take(pair, tmp_path):
    b, f, base, ft = pair
    kenstream.compress(b, f, tmp_path / "d", keep=0.5, quiet=True)
    records = kenstream.info(tmp_path / "d")["tensors"]
    got = {r["name"]: r.get("base_digest") for r in records}
    assert got == {"w": base_digest(rows(base["w"])),
                   "frozen": base_digest(rows(base["frozen"])),
                   "emb": base_digest(rows(base["emb"])),  # its 10 rows of the base
                   "steps": base_digest(rows(base["steps"])),
                   "new": None}


def test_a_bf16_fine_tune_records_its_f32_bases_digest_as_bf16(tmp_path):
    """The base is read in the fine-tune's dtype (2.3): the digest is of those values."""
    base, ft = tensors(torch.bfloat16)
    f32 = {n: t.float() if t.is_floating_point() else t for n, t in base.items()}
    b, f = save_dir(tmp_path / "b", f32), save_dir(tmp_path / "f", ft)
    kenstream.compress(b, f, tmp_path / "d", keep=1, quiet=True)
    records = {r["name"]: r for r in kenstream.info(tmp_path / "d")["tensors"]}
    assert records["w"]["base_digest"] == base_digest(rows(base["w"]))


def other_revision(base: dict, name: str, where) -> dict:
    out = {n: t.clone() for n, t in base.items()}
    out[name].view(-1)[where] += 1.0
    return out


@pytest.mark.parametrize("keep, name, what", [
    ("1", "frozen", "an unchanged tensor"),
    ("0.25", "w", "a reset position"),
    ("0.25", "w", "a kept position"),
])
def test_a_base_of_other_content_is_refused_by_rebuild_verify_and_load(
        pair, tmp_path, capsys, keep, name, what):
    b, f, base, ft = pair
    d = tmp_path / "d"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", keep, "-q"]) == 0
    good = tmp_path / "good"
    assert main(["rebuild", str(b), str(d), "-o", str(good), "-q"]) == 0
    rebuilt = load_model_dir(good)[name].reshape(-1)
    kept = rebuilt.numpy() == ft[name].reshape(-1).numpy()
    if what == "a reset position":
        where = int(np.flatnonzero(~kept)[0])
    elif what == "a kept position":
        where = int(np.flatnonzero(kept)[0])
    else:
        where = 3
    wrong = save_dir(tmp_path / "wrong", other_revision(base, name, where))
    capsys.readouterr()
    for argv in (["rebuild", str(wrong), str(d), "-o", str(tmp_path / "out")],
                 ["verify", str(wrong), str(d)], ["verify", str(wrong), str(d), "--force"]):
        assert main([*argv, "-q"]) == 2, argv
        assert_one_error(capsys.readouterr().err, f"tensor '{name}'", "not the one this diff was made from",
                         "wrong/model.safetensors", f"made from: {b}")
    assert_not_complete(tmp_path / "out")
    with pytest.raises(IdentityError, match="content differs"):
        dict(kenstream.load(wrong, d))


def test_the_same_base_in_other_files_or_dtype_rebuilds_without_force(tmp_path, capsys):
    base, ft = tensors(torch.bfloat16)
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    d = tmp_path / "d"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.5", "-q"]) == 0
    assert main(["rebuild", str(b), str(d), "-o", str(tmp_path / "ref"), "-q"]) == 0
    want = load_model_dir(tmp_path / "ref")
    f32 = {n: t.float() if t.is_floating_point() else t for n, t in base.items()}
    copies = {"sharded": save_dir(tmp_path / "sharded", base, shards=3),
              "bin": save_bin(tmp_path / "bin", base),
              "float32": save_dir(tmp_path / "f32", f32),
              "extra": save_dir(tmp_path / "extra", {**base, "more": torch.ones(2)})}
    for label, copy in copies.items():
        out = tmp_path / f"out-{label}"
        capsys.readouterr()
        assert main(["rebuild", str(copy), str(d), "-o", str(out)]) == 0, label
        notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
        assert len(notes) == 1 and "every base tensor is checked" in notes[0], notes
        got = load_model_dir(out)
        assert sorted(got) == sorted(want)
        assert all(bits(got[n]).tobytes() == bits(want[n]).tobytes() for n in want), label
        assert main(["verify", str(copy), str(d), "-q"]) == 0, label


def test_a_diff_without_digests_keeps_the_fingerprint_rule(pair, tmp_path, capsys):
    """Diffs written before 6.7: a base in other files still needs --force, which says
    what it cannot check; a wrong revision is caught only where a kept value decodes."""
    b, f, base, ft = pair
    d = tmp_path / "d"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "1", "-q"]) == 0
    for shard in d.glob("*.kdiff"):
        edit_records(shard, lambda records: [r.pop("base_digest", None)
                                             for r in records.values()])
    resign(d)
    assert all("base_digest" not in r
               for r in json.loads((d / "kenstream-diff.json").read_text())["tensors"].values())
    sharded = save_dir(tmp_path / "sharded", base, shards=2)
    capsys.readouterr()
    assert main(["rebuild", str(sharded), str(d), "-o", str(tmp_path / "o1"), "-q"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["rebuild", str(sharded), str(d), "-o", str(tmp_path / "o2"), "-q",
                 "--force"]) == 0
    assert "records no base digests" in capsys.readouterr().err
    wrong = save_dir(tmp_path / "wrong", other_revision(base, "frozen", 0))
    assert main(["rebuild", str(wrong), str(d), "-o", str(tmp_path / "o3"), "-q",
                 "--force"]) == 0  # what the digests exist for: nothing else can see it


def test_a_frame_that_fails_against_another_base_names_the_base(pair, tmp_path):
    """A kept value of the first frame decodes against a changed base value and fails its
    checksum before the later frames are read: the reader digests the rest of the base
    then, and the error is about the base, not a damaged diff."""
    b, f, base, ft = pair
    d = tmp_path / "d"
    kenstream.compress(b, f, d, keep=1, frame_elems=16, quiet=True)  # one row a frame
    wrong = save_dir(tmp_path / "wrong", other_revision(base, "w", 2))  # row 0
    with pytest.raises(IdentityError, match="content differs") as exc:
        kenstream.rebuild(wrong, d, tmp_path / "out", quiet=True, threads=1)
    assert exc.value.tensor == "w"


def test_resume_of_a_finished_model_reads_a_base_in_other_files(pair, tmp_path, capsys):
    """Nothing else reads the base then: --resume digests it before saying the finished
    model is this command's (another layout of the base: yes; other content: no)."""
    b, f, base, ft = pair
    d, out = tmp_path / "d", tmp_path / "out"
    kenstream.compress(b, f, d, keep=0.5, quiet=True)
    kenstream.rebuild(b, d, out, quiet=True)
    sharded = save_dir(tmp_path / "sharded", base, shards=2)
    wrong = save_dir(tmp_path / "wrong", other_revision(base, "frozen", 1))
    capsys.readouterr()
    assert main(["rebuild", str(sharded), str(d), "-o", str(out), "--resume", "-q"]) == 0
    assert main(["rebuild", str(wrong), str(d), "-o", str(out), "--resume", "-q"]) == 2
    assert "tensor 'frozen'" in capsys.readouterr().err


def test_a_copy_in_a_dtype_that_loses_the_bases_values_is_refused(pair, tmp_path, capsys):
    """A float16 copy of a float32 base converts back to other values: not the base."""
    b, f, base, ft = pair
    d = tmp_path / "d"
    kenstream.compress(b, f, d, keep=0.5, quiet=True)
    f16 = save_dir(tmp_path / "f16", {n: t.half() if t.is_floating_point() else t
                                      for n, t in base.items()})
    capsys.readouterr()
    assert main(["rebuild", str(f16), str(d), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert_one_error(capsys.readouterr().err, "not the one this diff was made from",
                     "f16/model.safetensors")
