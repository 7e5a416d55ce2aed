"""Inputs that used to end in garbage, tracebacks, hangs or absurd allocations: compressed
and forged ``.bin`` archives, tensors without bytes, and indexes, weights and shards that
are not files.

Each case runs the command line (in a child process where a regression would hang or
exhaust memory) and wants one ``error:`` line, exit code 2 (1 for a verify mismatch).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy

import kenstream
from tests.ckpt import save_dir
from tests.expect import assert_same_model, expected_model
from tests.test_reliability import (ROOT, assert_one_error, cli, compress_argv, diff, nudged,  # noqa: F401
                                    pair, tensors)

# A child process with bounded memory and time: a regression fails, it does not take the
# machine down.
_BOUNDED = textwrap.dedent("""
    import resource, sys
    limit = 6 << 30
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    from kenstream.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def bounded(argv, timeout=60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", _BOUNDED, *map(str, argv), "-q"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def rezip(path: Path, method=zipfile.ZIP_DEFLATED) -> None:
    """Re-pack a torch.save archive with every member compressed by ``method``."""
    with zipfile.ZipFile(path) as src:
        members = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in members:
            dst.writestr(name, data, compress_type=method)


# -- 2. compressed .bin members ---------------------------------------------------------------

def test_deflated_bin_base_rebuilds_the_right_model(tmp_path, capsys):
    base = tensors(rows=16, cols=32)
    ft = nudged(base)
    bdir = tmp_path / "base"
    bdir.mkdir()
    torch.save(base, bdir / "pytorch_model.bin")
    rezip(bdir / "pytorch_model.bin")
    f = save_dir(tmp_path / "ft", ft)
    d, out = tmp_path / "diff", tmp_path / "rebuilt"
    assert cli(capsys, compress_argv(bdir, f, d), [bdir, f])[0] == 0
    code, err = cli(capsys, ["rebuild", bdir, d, "-o", out], [bdir, f, d])
    assert code == 0, err
    assert_same_model(out, expected_model(base, ft, keep=0.5))
    assert list(kenstream.load(bdir, d))  # and through the library


def test_deflated_bin_too_large_to_inflate_is_refused(tmp_path, capsys, monkeypatch):
    import kenstream.io.torch_bin as torch_bin

    monkeypatch.setattr(torch_bin, "MAX_INFLATE_BYTES", 100)
    b = save_dir(tmp_path / "base", tensors())
    fdir = tmp_path / "ft"
    fdir.mkdir()
    torch.save(nudged(tensors()), fdir / "pytorch_model.bin")
    rezip(fdir / "pytorch_model.bin", zipfile.ZIP_LZMA)
    code, err = cli(capsys, compress_argv(b, fdir, tmp_path / "out"), [b, fdir])
    assert code == 2
    assert_one_error(err, "pytorch_model.bin", "compressed (LZMA)", "safetensors")
    assert not (tmp_path / "out").exists()


# -- 9. sizes claimed beyond the bytes that exist --------------------------------------------

@pytest.mark.parametrize("state, needle", [
    ({"w": torch.zeros(1).expand(200000, 200000)}, "storage holds 4"),
    ({"w": torch.empty(3, 4, device="meta")}, "meta tensor"),
])
def test_bin_tensors_without_their_bytes_are_refused(tmp_path, capsys, state, needle):
    b = save_dir(tmp_path / "base", {"w": torch.zeros(3, 4)})
    fdir = tmp_path / "ft"
    fdir.mkdir()
    torch.save(state, fdir / "pytorch_model.bin")
    proc = bounded(compress_argv(b, fdir, tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert_one_error(proc.stderr, "pytorch_model.bin", "tensor 'w'", needle)


# -- 10. no bytes, no end ---------------------------------------------------------------------

def test_tensor_of_2_58_empty_rows_does_not_loop(tmp_path):
    base = {"w": np.ones((4, 8), np.float32), "z": np.zeros((2**58, 0), np.float32)}
    ft = {"w": base["w"] * 2, "z": base["z"], "new": np.zeros((2**40, 0), np.float16)}
    for name, state in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_numpy(state, str(tmp_path / name / "model.safetensors"))
    b, f, d = tmp_path / "base", tmp_path / "ft", tmp_path / "diff"
    for argv in (compress_argv(b, f, d), ["verify", d, "--base", b, "--finetuned", f],
                 ["rebuild", b, d, "-o", tmp_path / "rebuilt"]):
        proc = bounded(argv, timeout=120)
        assert proc.returncode == 0, proc.stderr
    shapes = {n: tuple(t.shape) for n, t in kenstream.load(b, d)}
    assert shapes == {"w": (4, 8), "z": (2**58, 0), "new": (2**40, 0)}


def _fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def _dev_zero(path: Path) -> Path:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")
    return path


@pytest.mark.parametrize("make", [_fifo, _dev_zero])
def test_index_or_weights_that_are_not_files(tmp_path, make):
    base = tensors()
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", nudged(base), shards=2)
    index = make(f / "model.safetensors.index.json")
    proc = bounded(compress_argv(b, index, tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert_one_error(proc.stderr, "model.safetensors.index.json", "not a regular file")
    weights = make(b / "model.safetensors")
    proc = bounded(compress_argv(weights, f / "model-00001-of-00002.safetensors",
                                 tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert_one_error(proc.stderr, "model.safetensors", "not a regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", [_fifo, _dev_zero])
def test_diff_shards_or_index_that_are_not_files(diff, tmp_path, make):
    b, f, d = diff
    shard = make(next(d.glob("*.kdiff")))
    for argv in (["verify", d, "--base", b], ["rebuild", b, d, "-o", tmp_path / "rebuilt"]):
        proc = bounded(argv)
        assert proc.returncode == 2, proc.stderr
        assert_one_error(proc.stderr, shard.name, "not a regular file")
    make(d / "kenstream-diff.json")
    proc = bounded(["info", d])
    assert proc.returncode == 2, proc.stderr
    assert_one_error(proc.stderr, "kenstream-diff.json", "not a regular file")
