"""viz reads a diff as carefully as rebuild: shard hashes and records are checked for the
shards it draws from, forged entries are one error line, names are drawn escaped, a huge
``--tensor`` costs no minutes, and the path printed is the file written."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import kenstream  # noqa: E402
from kenstream.cli import main  # noqa: E402
from kenstream.io.diff_reader import DiffReader  # noqa: E402
from tests.forge import resign  # noqa: E402
from tests.test_hostile import UNPRINTABLE, unprintable_diff  # noqa: E402,F401
from tests.test_reliability import assert_one_error  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def fixture_diff(tmp_path):
    """A copy of a checked-in diff with ``indices`` tensors, and its base."""
    d = tmp_path / "diff"
    shutil.copytree(DATA / "v1" / "random-keep0.01", d)
    return d, DATA / "pair" / "base"


def run(capsys, argv):
    code = main([str(a) for a in argv] + ["-q"])
    return code, capsys.readouterr().err


def test_tampered_shard_is_refused(fixture_diff, tmp_path, capsys):
    d, _ = fixture_diff
    rec = json.loads((d / "kenstream-diff.json").read_text())["tensors"]["model.embed.weight"]
    shard = d / rec["shard"]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x10
    shard.write_bytes(bytes(raw))
    for extra in (["--tensor", "model.embed.weight"], ["--view", "summary"]):
        code, err = run(capsys, ["viz", d, "-o", tmp_path / "x.png", *extra])
        assert code == 2
        assert_one_error(err, shard.name, "sha256")
    assert not (tmp_path / "x.png").exists()


def test_only_the_shards_drawn_from_are_hashed(fixture_diff):
    d, _ = fixture_diff
    with DiffReader(d) as reader:
        rec = reader.records["model.embed.weight"]
        reader.check_hashes(tensors=["model.embed.weight"])
        assert reader._checked == {rec.shard}


def _repeat_a_column(d: Path, name: str) -> None:
    """Make the second kept column of the tensor's first row equal its first, re-signed."""
    rec = json.loads((d / "kenstream-diff.json").read_text())["tensors"][name]
    shard = d / rec["shard"]
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8:8 + n])[f"{name}::index"]
    size = {"U16": 2, "U32": 4}[entry["dtype"]]
    at = 8 + n + entry["data_offsets"][0]
    raw[at + size:at + 2 * size] = raw[at:at + size]
    shard.write_bytes(bytes(raw))
    resign(d)


def test_resigned_index_with_a_repeated_column(fixture_diff, tmp_path, capsys):
    d, base = fixture_diff
    _repeat_a_column(d, "model.layers.1.long.bias")
    for extra in ([], ["--base", base], ["--view", "neighbors"]):
        code, err = run(capsys, ["viz", d, "--tensor", "model.layers.1.long.bias",
                                 "-o", tmp_path / "x.png", *extra])
        assert code == 2, err
        assert_one_error(err, "model.layers.1.long.bias", "column number twice")


def test_a_megabyte_tensor_name_is_quick(tmp_path, capsys):
    """A tensor named with a million characters is drawn (its name shortened in the
    picture) and a near miss of it is reported, each in seconds, not minutes."""
    name = "layer." + "w" * 10**6
    g = np.random.default_rng(0)
    base = {name: g.standard_normal((4, 8)).astype(np.float32),
            "x": g.standard_normal((3, 3)).astype(np.float32)}
    for sub, state in (("base", base), ("ft", {n: a + 1 for n, a in base.items()})):
        (tmp_path / sub).mkdir()
        save_file(state, str(tmp_path / sub / "model.safetensors"))
    d = tmp_path / "diff"
    kenstream.compress(tmp_path / "base", tmp_path / "ft", d, keep=0.5, quiet=True)
    for extra, want in ((["--view", "summary"], 0), (["--tensor", name], 0),
                        (["--tensor", name[:-1] + "v"], 2)):
        t0 = time.monotonic()
        code, err = run(capsys, ["viz", d, "-o", tmp_path / "x.png", *extra])
        assert code == want, err[:300]
        assert time.monotonic() - t0 < 30, extra[0]
    assert "no such tensor" in err and err.count("\n") == 1


def test_output_without_a_suffix_is_a_png_and_the_path_printed(fixture_diff, tmp_path, capsys):
    d, _ = fixture_diff
    out = tmp_path / "picture"
    assert main(["viz", str(d), "--tensor", "model.embed.weight", "-o", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"wrote {out}.png"
    assert (tmp_path / "picture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--view", "summary"],
                                   ["--tensor", "model.embed.weight", "--raw"]])
def test_a_link_at_the_output_is_replaced_not_written_through(fixture_diff, tmp_path, capsys,
                                                              extra):
    """A symbolic link planted at ``-o`` (here to a model file) is replaced by the picture;
    the file it pointed to keeps its bytes, and no temporary file is left."""
    d, _ = fixture_diff
    victim = tmp_path / "model" / "model.safetensors"
    victim.parent.mkdir()
    victim.write_bytes(b"weights")
    out = tmp_path / "pictures" / "p.png"
    out.parent.mkdir()
    out.symlink_to(victim)
    code, err = run(capsys, ["viz", d, "-o", out, *extra])
    assert code == 0, err
    assert victim.read_bytes() == b"weights"
    assert not out.is_symlink() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.png"]


def test_change_colouring_says_why_a_tensor_has_no_base(tmp_path, capsys):
    """--color change of a tensor stored without a base: a reshaped tensor is called
    reshaped, not new; a new one new."""
    rng = np.random.default_rng(2)
    base = {"w": rng.standard_normal((8, 6)).astype(np.float32),
            "r": rng.standard_normal((6, 4)).astype(np.float32)}
    ft = {"w": base["w"] + 0.1, "r": base["r"].reshape(4, 6) + 0.1,
          "n": rng.standard_normal((2, 2)).astype(np.float32)}
    for name, tensors in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    d = tmp_path / "diff"
    with pytest.warns(UserWarning, match="differs from the base's .*; stored whole"):
        kenstream.compress(tmp_path / "base", tmp_path / "ft", d, keep=0.5, quiet=True)
    for tensor, why in (("r", "changed shape from the base's"), ("n", "is new in the fine-tune")):
        code, err = run(capsys, ["viz", d, "--tensor", tensor, "--base", tmp_path / "base",
                                 "--color", "change", "-o", tmp_path / "x.png"])
        assert code == 2
        assert_one_error(err, f"tensor '{tensor}'", why, "--color value")


def test_summary_of_unprintable_names(unprintable_diff, tmp_path, capsys):
    _, _, d = unprintable_diff
    code, err = run(capsys, ["viz", d, "--view", "summary", "-o", tmp_path / "s.png"])
    assert code == 0, err
    assert (tmp_path / "s.png").exists()
    code, err = run(capsys, ["viz", d, "--tensor", UNPRINTABLE[0], "-o", tmp_path / "m.png"])
    assert code == 0, err
