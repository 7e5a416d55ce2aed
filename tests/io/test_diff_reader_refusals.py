"""The diff reader's refusals that no other test reaches: a path that is no diff folder, a
shard that is no readable file of the indexed size, a shard's entries that do not match
its records; and verify given a fine-tune whose tensor has another shape or dtype. Each
ends in one DiffError (one ``error:`` line), never a traceback or a passing check."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kenstream.errors import DiffError
from kenstream.io.diff_reader import DiffReader
from tests.ckpt import save_dir
from tests.forge import rewrite_header, resign
from tests.test_reliability import (assert_one_error, cli, diff, nudged, pair,  # noqa: F401
                                    tensors)


def test_a_file_is_not_a_diff_directory(tmp_path, capsys):
    path = tmp_path / "kenstream-diff.json"
    path.write_text("{}")
    with pytest.raises(DiffError, match="is not a diff directory"):
        DiffReader(path)
    code, err = cli(capsys, ["info", path])
    assert code == 2
    assert_one_error(err, "is not a diff directory")


def test_a_file_of_a_diff_names_its_folder(diff, tmp_path, capsys):
    """The diff's index or a shard given where the diff goes: the line says to pass the
    folder that holds kenstream-diff.json, and names it (it said only 'is not a diff
    directory')."""
    b, f, d = diff
    out = tmp_path / "out"
    for path in (d / "kenstream-diff.json", _shard(d)):
        for argv in (["info", path], ["verify", b, path], ["rebuild", b, path, "-o", out]):
            code, err = cli(capsys, argv, [b, f, d])
            assert code == 2 and not out.exists()
            assert_one_error(err, f"{path}: is not a diff directory (pass the folder that "
                                  f"holds kenstream-diff.json: {d})")
    code, err = cli(capsys, ["info", b / "model.safetensors"], [b])
    assert code == 2
    assert_one_error(err, "is not a diff directory (pass the folder that holds "
                          "kenstream-diff.json)")


def test_an_empty_folder_and_a_folder_of_other_files_are_no_diffs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffError, match="is empty, not a kenstream diff"):
        DiffReader(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(DiffError, match="has no kenstream-diff.json; not a kenstream diff"):
        DiffReader(other)


def _shard(d):
    (shard,) = d.glob("*.kdiff")
    return shard


def test_a_shard_of_another_size_than_indexed_is_refused_before_hashing(diff):
    _, _, d = diff
    shard = _shard(d)
    size = shard.stat().st_size
    with open(shard, "ab") as fh:
        fh.write(b"\x00" * 8)
    with DiffReader(d) as reader, \
            pytest.raises(DiffError, match=f"shard is {size + 8} bytes, index says {size}"):
        reader.check_files()


def test_a_shard_that_cannot_be_read_is_refused_in_one_line(diff, tmp_path, capsys):
    """A shard replaced by a link to itself: stat fails (ELOOP), reported as a DiffError."""
    b, _, d = diff
    shard = _shard(d)
    shard.unlink()
    os.symlink(shard.name, shard)
    with DiffReader(d) as reader, pytest.raises(DiffError, match="shard cannot be read"):
        reader.check_files()
    code, err = cli(capsys, ["rebuild", b, d, "-o", tmp_path / "rebuilt"])
    assert code == 2
    assert_one_error(err, "shard cannot be read", shard.name)


def _renamed(old, new):
    def edit(header):
        header[new] = header.pop(old)
    return edit


@pytest.mark.parametrize("old, new, message", [
    # b.weight's table, renamed to a role a coded record has no use for
    ("b.weight::table", "a.weight::mask", "shard has a 'mask' entry, which a coded record"),
    # a.weight's table, renamed to belong to a tensor no record names
    ("a.weight::table", "zz.weight::table", "shard has no table entry for this tensor"),
])
def test_entries_that_do_not_match_the_record_are_refused(diff, tmp_path, capsys, old, new,
                                                          message):
    """Re-signed, so only the reader's entry checks stand between the edit and a
    traceback (or a wrong model)."""
    b, _, d = diff
    rewrite_header(_shard(d), _renamed(old, new))
    resign(d)
    with DiffReader(d) as reader, pytest.raises(DiffError, match=message):
        reader.entries("a.weight")
    code, err = cli(capsys, ["rebuild", b, d, "-o", tmp_path / "rebuilt"])
    assert code == 2
    assert_one_error(err, message, "tensor 'a.weight'")


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_verify_reports_a_finetune_tensor_of_another_shape_or_dtype(diff, tmp_path, capsys,
                                                                     change):
    """The fine-tune given has b.weight, but not the one the diff rebuilds: a mismatch,
    not a tensor quietly left unchecked."""
    b, f, d = diff
    other = nudged(tensors())
    if change == "shape":
        other["b.weight"] = other["b.weight"][:, :15].contiguous()
        want = "b.weight: fine-tune has F32[8, 15], diff has F32[8, 16]"
    else:
        other["b.weight"] = other["b.weight"].to(torch.float64)
        want = "b.weight: fine-tune has F64[8, 16], diff has F32[8, 16]"
    other_dir = save_dir(tmp_path / "other", other)
    code, err = cli(capsys, ["verify", d, "--base", b, "--finetuned", other_dir],
                    [b, d, other_dir])
    assert code == 1
    assert_one_error(err, "1 mismatch", want)
    code = cli(capsys, ["verify", d, "--base", b, "--finetuned", f])[0]
    assert code == 0  # the true fine-tune passes


def test_verify_report_lists_the_shape_mismatch(diff, tmp_path, capsys):
    from kenstream.cli import main

    b, _, d = diff
    other = nudged(tensors())
    other["b.weight"] = other["b.weight"].reshape(16, 8).contiguous()
    other_dir = save_dir(tmp_path / "other", other)
    assert main(["verify", str(d), "--base", str(b), "--finetuned", str(other_dir),
                 "--json", "-q"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["problems"] == ["b.weight: fine-tune has F32[16, 8], diff has F32[8, 16]"]


def _edit_index(d, edit):
    path = d / "kenstream-diff.json"
    index = json.loads(path.read_text())
    edit(index["tensors"])
    path.write_text(json.dumps(index))


def test_an_index_that_lost_a_tensor_is_refused(diff, tmp_path, capsys):
    """The shard hashes are in the index, so they cannot tell that a tensor was taken out
    of it; the records in the shards can: without that check the rebuilt model would
    quietly lack the tensor."""
    b, _, d = diff
    _edit_index(d, lambda tensors: tensors.pop("c.bias"))
    with DiffReader(d) as reader, \
            pytest.raises(DiffError, match="records a tensor the index lacks"):
        reader.check_hashes()
    out = tmp_path / "rebuilt"
    code, err = cli(capsys, ["rebuild", b, d, "-o", out])
    assert code == 2
    assert_one_error(err, "tensor 'c.bias'", "records a tensor the index lacks")
    assert not (out / "model.safetensors").exists()


def test_an_index_that_gained_a_tensor_is_refused(diff):
    _, _, d = diff
    _edit_index(d, lambda tensors: tensors.update({"d.bias": dict(tensors["c.bias"])}))
    with DiffReader(d) as reader, \
            pytest.raises(DiffError, match="record is in no shard's metadata"):
        reader.check_hashes()


def test_a_folder_of_shards_without_an_index_is_called_incomplete(diff):
    _, _, d = diff
    (d / "kenstream-diff.json").unlink()
    with pytest.raises(DiffError, match="has diff shards but no kenstream-diff.json: an "
                                        "incomplete diff"):
        DiffReader(d)


def test_load_checks_the_hashes_and_the_base_like_rebuild(diff, tmp_path):
    """kenstream.load runs rebuild's checks before it yields anything: an index edited
    (a tensor taken out) and a base other than the recorded one are refused, not turned
    into a model lacking a tensor or one built on the wrong base."""
    import kenstream
    from kenstream.errors import IdentityError

    b, f, d = diff
    other = save_dir(tmp_path / "other", tensors(seed=9))
    with pytest.raises(IdentityError, match="not the one this diff was made from"):
        list(kenstream.load(other, d))
    edited = tmp_path / "edited"
    import shutil
    shutil.copytree(d, edited)
    _edit_index(edited, lambda tensors: tensors.pop("c.bias"))
    with pytest.raises(DiffError, match="records a tensor the index lacks"):
        list(kenstream.load(b, edited))
    assert [name for name, _ in kenstream.load(b, d)] == ["a.weight", "b.weight", "c.bias"]


def test_an_index_record_edited_apart_from_its_shard_copy_is_refused(tmp_path, capsys):
    """An unchanged tensor's record says which base tensor the rebuilt model takes whole:
    pointed at another base tensor of the same shape in the index alone, the rebuilt model
    would be quietly wrong. The copy of every record in the shards' metadata tells."""
    base = tensors()
    ft = {**nudged(base), "b.weight": base["b.weight"].clone()}
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    d = tmp_path / "d"
    assert cli(capsys, ["compress", b, f, "-o", d, "--keep", "0.5"], [b, f])[0] == 0

    def repoint(records):
        assert records["b.weight"]["encoding"] == "unchanged"
        records["b.weight"]["base_name"] = "a.weight"
    _edit_index(d, repoint)
    out = tmp_path / "rebuilt"
    code, err = cli(capsys, ["rebuild", b, d, "-o", out])
    assert code == 2
    assert_one_error(err, "tensor 'b.weight'", "record differs from the copy")
    assert not (out / "model.safetensors").exists()


@pytest.fixture
def sharded(tmp_path):
    """A diff of three changed matrices in shards of ~10 kB (one or two a shard) and an
    unchanged vector, which no shard holds."""
    import kenstream

    g = torch.Generator().manual_seed(9)
    base = {f"l{i}.weight": torch.randn(32, 64, generator=g) * 0.02 for i in range(3)}
    base["same"] = torch.randn(8, generator=g)
    ft = {n: t + torch.randn(t.shape, generator=g) * 1e-3 for n, t in base.items()}
    ft["same"] = base["same"].clone()
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    kenstream.compress(b, f, tmp_path / "d", keep=0.5, shard_size="10kB", quiet=True)
    return tmp_path / "d"


def _damage_a_shard_without(d, tensor):
    """Flip the last byte of a shard that does not hold ``tensor``; returns its name."""
    index = json.loads((d / "kenstream-diff.json").read_text())
    mine = index["tensors"][tensor]["shard"]
    other = next(n for n in index["shards"] if n != mine)
    raw = bytearray((d / other).read_bytes())
    raw[-1] ^= 1
    (d / other).write_bytes(bytes(raw))
    return other


def test_checking_some_tensors_reads_only_the_shards_that_hold_them(sharded):
    """check_hashes(tensors=...) reads the shards holding those tensors and compares only
    their records: a damaged shard elsewhere is not read (and its records not missed);
    the full check finds it."""
    other = _damage_a_shard_without(sharded, "l0.weight")
    with DiffReader(sharded) as reader:
        assert reader.records["same"].shard is None
        reader.check_hashes(tensors=["l0.weight"])
        with pytest.raises(DiffError, match="sha256 does not match") as exc:
            reader.check_hashes()
    assert other in str(exc.value)


def test_checking_an_unchanged_tensor_reads_every_shard(sharded):
    """A tensor that no shard holds (unchanged) limits nothing: every shard is checked."""
    _damage_a_shard_without(sharded, "l0.weight")
    with DiffReader(sharded) as reader, \
            pytest.raises(DiffError, match="sha256 does not match"):
        reader.check_hashes(tensors=["l0.weight", "same"])


def test_an_index_that_gained_an_unchanged_tensor_is_refused(sharded):
    """Every record, an unchanged one's too, has its copy in a shard: one added to the
    index alone (a tensor said unchanged that the diff never had) is refused."""
    _edit_index(sharded, lambda tensors: tensors.update({"ghost": dict(tensors["same"])}))
    with DiffReader(sharded) as reader, \
            pytest.raises(DiffError, match="record is in no shard's metadata"):
        reader.check_hashes()


def test_check_base_names_the_first_file_and_counts_only_several(tmp_path):
    """A base whose weight files differ from the recorded ones, for a diff without base
    digests (format 1): the refusal names the first, and adds how many differ only when
    that is more than one; with force the differing files are returned, sorted. A diff
    with digests returns them without force (the content is checked as it is read)."""
    import kenstream
    from kenstream.errors import IdentityError
    from kenstream.io.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(10)
    base = {"a": torch.randn(8, 8, generator=g), "b": torch.randn(8, 8, generator=g)}
    ft = {n: t + 1e-3 for n, t in base.items()}
    b, f = save_dir(tmp_path / "b", base, shards=2), save_dir(tmp_path / "f", ft)
    kenstream.compress(b, f, tmp_path / "d", keep=0.5, quiet=True, format_version=1)
    kenstream.compress(b, f, tmp_path / "d2", keep=0.5, quiet=True)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_dir(b, {"a": base["a"], "b": base["b"] * 2}, shards=2)
    with DiffReader(tmp_path / "d2") as reader, Checkpoint.open(str(b)) as ck:
        assert reader.content_checked and reader.check_base(ck) == names[1:]
    with DiffReader(tmp_path / "d") as reader, Checkpoint.open(str(b)) as ck:
        with pytest.raises(IdentityError) as exc:
            reader.check_base(ck)
        assert "differs from the base this diff was made from (fingerprint) (" \
            in str(exc.value), str(exc.value)
        assert names[1] in str(exc.value)
        assert reader.check_base(ck, force=True) == names[1:]
    save_dir(b, {"a": base["a"] * 2, "b": base["b"] * 2}, shards=2)
    with DiffReader(tmp_path / "d") as reader, Checkpoint.open(str(b)) as ck:
        with pytest.raises(IdentityError, match="; 2 files differ") as exc:
            reader.check_base(ck)
        assert names[0] in str(exc.value)
        assert reader.check_base(ck, force=True) == names
