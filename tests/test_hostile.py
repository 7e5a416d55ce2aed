"""Hostile diffs and names that used to end in tracebacks or absurd allocations: re-signed
diffs claiming impossible shapes, shards whose header would pass the reader's limit,
numbers and names that cannot be printed as they are. The ``.bin`` containers and inputs
that are not files are in ``tests/io/test_untrusted_inputs.py``.

Each case runs the command line (in a child process where a regression would hang or
exhaust memory) and wants one ``error:`` line, exit code 2 (1 for a verify mismatch).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import kenstream
from kenstream.cli import main
from kenstream.errors import KenstreamError
from tests.ckpt import save_dir
from tests.expect import assert_same_model, expected_model
from tests.forge import edit_records, read_header, resign
from tests.io.test_untrusted_inputs import bounded
from tests.test_reliability import (assert_one_error, cli, compress_argv, diff, nudged,  # noqa: F401
                                    pair, tensors)


# -- 9. records claiming sizes beyond the bytes that exist ------------------------------------

def _unchanged_giant(records):
    records["c.bias"].update(shape=[1, 2**58], rows=1, cols=2**58, encoding="unchanged",
                             kept=0, shard=None, k=None, row_kept=None, reason="identical",
                             nbytes=0)


def _indices_giant(shard: Path):
    """Rewrite ``c.bias`` as an ``indices`` tensor of shape [1, 2**58] keeping one value,
    entries and all, so that every entry check passes."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    for role in ("mask", "values"):
        header.pop(f"c.bias::{role}")
    end = len(data)
    header["c.bias::index"] = {"dtype": "U32", "shape": [1], "data_offsets": [end, end + 4]}
    header["c.bias::values"] = {"dtype": "F32", "shape": [1],
                                "data_offsets": [end + 4, end + 8]}
    data += struct.pack("<I", 3) + struct.pack("<f", 0.5)
    records = json.loads(header["__metadata__"]["records"])
    records["c.bias"].update(shape=[1, 2**58], rows=1, cols=2**58, encoding="indices",
                             kept=1, row_kept=1, k=1, nbytes=8)
    header["__metadata__"]["records"] = json.dumps(records, sort_keys=True,
                                                   separators=(",", ":"))
    head = json.dumps(header).encode()
    head += b" " * (-(8 + len(head)) % 8)
    shard.write_bytes(struct.pack("<Q", len(head)) + head + data)


def _coded_giant(records):
    """Format 2: ``c.bias`` claims [1, 2**58] with no base, one frame holding it all."""
    records["c.bias"].update(shape=[1, 2**58], rows=1, cols=2**58, base_name=None,
                             reason="new", k=None)


@pytest.mark.parametrize("forgery", ["unchanged", "indices", "coded"])
def test_resigned_giant_shape_is_refused_everywhere(diff, capsys, tmp_path, forgery):
    b, f, d = diff
    if forgery == "indices":  # a format-1 encoding
        d = tmp_path / "diff-v1"
        assert cli(capsys, compress_argv(b, f, d, "--format-version", "1"), [b, f])[0] == 0
    shard = next(d.glob("*.kdiff"))
    if forgery == "unchanged":
        edit_records(shard, _unchanged_giant)
    elif forgery == "indices":
        _indices_giant(shard)
    else:
        edit_records(shard, _coded_giant)
    resign(d)
    for argv in (["verify", d, "--base", b, "--finetuned", f],
                 ["rebuild", b, d, "-o", tmp_path / "rebuilt"],
                 ["viz", d, "--tensor", "c.bias", "-o", tmp_path / "c.png"]):
        proc = bounded(argv)
        assert proc.returncode == 2, (argv[0], proc.stderr)
        assert_one_error(proc.stderr, "tensor 'c.bias'")
    assert not (tmp_path / "rebuilt" / "model.safetensors.index.json").exists()
    with pytest.raises(KenstreamError, match="c.bias"):
        list(kenstream.load(b, d))



# -- 7. headers within the reader's limit ------------------------------------------------------

def test_compress_and_rebuild_split_shards_by_header_size(tmp_path, capsys, monkeypatch):
    """With the reader's header limit lowered (as 276k tensors would meet the real one),
    compress and rebuild cut shards by header bytes, and every file reads back."""
    import kenstream.io.safetensors_file as st

    g = torch.Generator().manual_seed(2)
    base = {f"layers.{i}.weight": torch.randn(4, 8, generator=g) for i in range(60)}
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", nudged(base))
    monkeypatch.setattr(st, "MAX_HEADER_BYTES", 6000)
    d, out = tmp_path / "diff", tmp_path / "rebuilt"
    assert cli(capsys, compress_argv(b, f, d), [b, f])[0] == 0
    shards = sorted(d.glob("*.kdiff"))
    assert len(shards) > 1
    for shard in shards:
        (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
        assert n <= 6000
    code, err = cli(capsys, ["verify", d, "--base", b, "--finetuned", f], [b, f, d])
    assert code == 0, err
    monkeypatch.setattr(st, "MAX_HEADER_BYTES", 5000)  # the base's own header is 4.5 kB
    code, err = cli(capsys, ["rebuild", b, d, "-o", out], [b, f])
    assert code == 0, err
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1 and all(len(read_header(p)) > 1 for p in files)
    assert all(struct.unpack("<Q", p.read_bytes()[:8])[0] <= 5000 for p in files)
    assert_same_model(out, expected_model(base, nudged(base), keep=0.5))


# -- 13. verify against a fine-tune that lacks a tensor ------------------------------------------

def test_verify_reports_a_tensor_missing_from_the_finetune(diff, tmp_path, capsys):
    b, f, d = diff
    lacking = nudged(tensors())
    del lacking["b.weight"]
    other = save_dir(tmp_path / "lacking", lacking)
    code, err = cli(capsys, ["verify", d, "--base", b, "--finetuned", other], [b, d, other])
    assert code == 1
    assert_one_error(err, "1 mismatch", "b.weight: not in the fine-tune")
    assert main(["verify", str(d), "--base", str(b), "--finetuned", str(other), "--json",
                 "-q"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"] == ["b.weight: not in the fine-tune"]


def test_verify_reports_a_tensor_only_the_finetune_has(diff, tmp_path, capsys):
    """The reverse of the above: the rebuilt model would lack the extra tensor, so the
    fine-tune given is not the one the diff rebuilds."""
    b, f, d = diff
    extra = dict(nudged(tensors()), **{"extra.weight": torch.ones(2, 2)})
    other = save_dir(tmp_path / "extra", extra)
    code, err = cli(capsys, ["verify", d, "--base", b, "--finetuned", other], [b, d, other])
    assert code == 1
    assert_one_error(err, "1 mismatch", "extra.weight: in the fine-tune, not in the diff")


# -- 14. numbers and names that cannot be printed as they are ---------------------------------

def test_info_with_huge_numbers_and_unprintable_sources(diff, capsys):
    b, f, d = diff
    path = d / "kenstream-diff.json"
    index = json.loads(path.read_text())
    index["totals"]["reset"] = 10**400
    path.write_text(json.dumps(index))
    code, err = cli(capsys, ["info", d], [d])
    assert code == 2
    assert_one_error(err, "totals reset", "not a count")
    index["totals"]["reset"] = 3
    index["base"]["source"] = "evil\ud800\x1b[2J\nsecond line"
    index["finetuned"]["source"] = "\u202egnp.exe"
    path.write_text(json.dumps(index))
    assert main(["info", str(d)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    base_line = next(line for line in out.splitlines() if line.startswith("base:"))
    assert "evil\\ud800\\x1b[2J\\nsecond line" in base_line and "\\u202egnp.exe" in base_line
    assert main(["info", str(d), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base"] == "evil\ud800\x1b[2J\nsecond line"


def write_raw_safetensors(path: Path, arrays: dict) -> None:
    """A safetensors file whose names may hold lone surrogates (JSON escapes them)."""
    header, blobs, at = {}, [], 0
    for name, arr in arrays.items():
        raw = np.ascontiguousarray(arr, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    head = json.dumps(header).encode("ascii")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


UNPRINTABLE = ["bad\ud800name.weight", "esc\x1b[31m.weight", "new\nline.weight"]


@pytest.fixture
def unprintable_diff(tmp_path):
    rng = np.random.default_rng(3)
    base = {n: rng.standard_normal((6, 10)).astype(np.float32) for n in UNPRINTABLE}
    ft = {n: a + np.float32(0.01) * rng.standard_normal(a.shape).astype(np.float32)
          for n, a in base.items()}
    write_raw_safetensors(tmp_path / "base" / "model.safetensors", base)
    write_raw_safetensors(tmp_path / "ft" / "model.safetensors", ft)
    b, f, d = tmp_path / "base", tmp_path / "ft", tmp_path / "diff"
    assert main([str(a) for a in compress_argv(b, f, d, "-q")]) == 0
    return b, f, d


def test_verify_prints_unprintable_names_escaped(unprintable_diff, capsys):
    b, f, d = unprintable_diff
    capsys.readouterr()
    assert main(["verify", str(d), "--base", str(b), "--finetuned", str(f)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "verify: OK" in out
    assert "bad\\ud800name.weight" in out and "new\\nline.weight" in out
    assert len(out.strip().splitlines()) == 2 + len(UNPRINTABLE)
