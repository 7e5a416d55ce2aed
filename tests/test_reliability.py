"""Bad inputs and write faults through the command line: one ``error:`` line naming the culprit,
exit code 2, no traceback, inputs never written to, and no output that looks complete.

Every case runs ``kenstream.cli.main([...])`` through :func:`cli`, which fingerprints every
input file (sha256 + mtime) before and after the command. Corrupt files are made here by
editing the bytes that the independent ``safetensors`` / ``torch`` writers produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import kenstream
from kenstream.cli import main
from kenstream.errors import SelectionError
from tests.ckpt import save_dir
from tests.expect import load_model_dir

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------

def snapshot(*dirs) -> dict:
    """path -> (sha256, size, mtime_ns) of every file under ``dirs``."""
    out = {}
    for d in dirs:
        d = Path(d)
        files = [d] if d.is_file() else sorted(p for p in d.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def cli(capsys, argv, inputs=()):
    """Run ``main(argv + ['-q'])``; returns (exit code, stderr). Asserts inputs untouched."""
    before = snapshot(*inputs)
    code = main([str(a) for a in argv] + ["-q"])
    captured = capsys.readouterr()
    assert snapshot(*inputs) == before, "an input file was modified"
    return code, captured.err


def assert_one_error(err: str, *needles) -> None:
    """stderr is exactly one ``error:`` line holding every needle, and no traceback."""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, err)


def assert_not_complete(out: Path) -> None:
    """No output that looks finished: no index of a diff or of a rebuilt model, no temp files."""
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    assert "kenstream-diff.json" not in names
    assert "model.safetensors.index.json" not in names
    assert "model.safetensors" not in names
    assert not [n for n in names if n.endswith(".partial")], names


def tensors(seed=0, rows=8, cols=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(rows, cols, generator=g).to(dtype),
        "b.weight": torch.randn(rows, cols, generator=g).to(dtype),
        "c.bias": torch.randn(cols, generator=g).to(dtype),
    }


def nudged(state, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: t + torch.randn(t.shape, generator=g).to(t.dtype) * 0.01 for n, t in state.items()}


def read_st(path):
    """(header dict, data bytes) of a safetensors file, parsed with struct + json only."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path, header, data: bytes, *, length=None) -> None:
    """Write header (dict, or raw bytes) and data; ``length`` overrides the length field."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if length is None else length
    Path(path).write_bytes(struct.pack("<Q", n) + head + data)


@pytest.fixture
def pair(tmp_path):
    """(base dir, fine-tune dir, output path) of a tiny float32 pair."""
    base = tensors()
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", nudged(base))
    return b, f, tmp_path / "out"


def compress_argv(b, f, out, *extra):
    return ["compress", b, f, "-o", out, "--keep", "0.5", *extra]


@pytest.fixture
def diff(pair, capsys):
    """A finished diff of ``pair``: (base, fine-tune, diff dir)."""
    b, f, _ = pair
    d = b.parent / "diff"
    code, err = cli(capsys, compress_argv(b, f, d), [b, f])
    assert code == 0, err
    return b, f, d


# -- damaged checkpoints ---------------------------------------------------------------------

def _truncate_in_data(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:-40])


def _length_beyond_file(path):
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])


def _header_not_json(path):
    header, data = read_st(path)
    write_st(path, json.dumps(header).encode()[:-3] + b"@@@", data)


def _header_lies_about_span(path):
    header, data = read_st(path)
    header["b.weight"]["data_offsets"][1] -= 4
    write_st(path, header, data)


def _unknown_dtype(path):
    header, data = read_st(path)
    header["b.weight"]["dtype"] = "F17"
    write_st(path, header, data)


def _dtype_lie(path):  # F16 claims half the bytes the span holds
    header, data = read_st(path)
    header["b.weight"]["dtype"] = "F16"
    write_st(path, header, data)


def _overlap(path):
    header, data = read_st(path)
    a = header["a.weight"]["data_offsets"]
    span = header["b.weight"]["data_offsets"][1] - header["b.weight"]["data_offsets"][0]
    header["b.weight"]["data_offsets"] = [a[0] + 4, a[0] + 4 + span]
    write_st(path, header, data)


def _out_of_range(path):
    header, data = read_st(path)
    begin, end = header["b.weight"]["data_offsets"]
    header["b.weight"]["data_offsets"] = [begin + len(data), end + len(data)]
    write_st(path, header, data)


def _duplicate_name(path):
    header, data = read_st(path)
    text = json.dumps(header)
    entry = json.dumps(header["b.weight"])
    write_st(path, text[:-1].encode() + f', "b.weight": {entry}}}'.encode(), data)


DAMAGE = {
    "truncated": (_truncate_in_data, ["model.safetensors", "truncated"]),
    "length-beyond-file": (_length_beyond_file, ["model.safetensors", "header length"]),
    "not-json": (_header_not_json, ["model.safetensors", "JSON"]),
    "span-lie": (_header_lies_about_span, ["model.safetensors", "b.weight", "data_offsets"]),
    "unknown-dtype": (_unknown_dtype, ["model.safetensors", "b.weight", "F17"]),
    "dtype-lie": (_dtype_lie, ["model.safetensors", "b.weight", "F16"]),
    "overlap": (_overlap, ["model.safetensors", "b.weight", "overlaps"]),
    "out-of-range": (_out_of_range, ["model.safetensors", "b.weight", "data section"]),
    "duplicate-name": (_duplicate_name, ["model.safetensors", "b.weight", "twice"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
@pytest.mark.parametrize("side", ["base", "ft"])
def test_damaged_safetensors_refused(pair, capsys, case, side):
    b, f, out = pair
    damage, needles = DAMAGE[case]
    damage((b if side == "base" else f) / "model.safetensors")
    code, err = cli(capsys, compress_argv(b, f, out), [b, f])
    assert code == 2
    where = str((b if side == "base" else f) / "model.safetensors")
    assert_one_error(err, where, *needles)
    assert not out.exists()  # refused before anything was created


def _sharded_ft(tmp_path, base):
    return save_dir(tmp_path / "ft", nudged(base), shards=2)


def test_index_names_missing_shard(tmp_path, capsys):
    base = tensors()
    b = save_dir(tmp_path / "base", base)
    f = _sharded_ft(tmp_path, base)
    (f / "model-00002-of-00002.safetensors").unlink()
    code, err = cli(capsys, compress_argv(b, f, tmp_path / "out"), [b, f])
    assert code == 2
    assert_one_error(err, "model.safetensors.index.json", "model-00002-of-00002.safetensors",
                     "missing", "tensor 'c.bias'")
    assert not (tmp_path / "out").exists()


def test_index_names_tensor_missing_from_shard(tmp_path, capsys):
    base = tensors()
    b = save_dir(tmp_path / "base", base)
    f = _sharded_ft(tmp_path, base)
    index_path = f / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    code, err = cli(capsys, compress_argv(b, f, tmp_path / "out"), [b, f])
    assert code == 2
    assert_one_error(err, str(index_path), "tensor 'ghost.weight'", "missing from it")


def test_index_with_duplicate_weight_map_key(tmp_path, capsys):
    base = tensors()
    b = save_dir(tmp_path / "base", base)
    f = _sharded_ft(tmp_path, base)
    index_path = f / "model.safetensors.index.json"
    text = index_path.read_text()
    # JSON parsers keep the last of two equal keys; kenstream must refuse instead.
    text = text.replace('"weight_map": {', '"weight_map": {"c.bias": "model-00001-of-00002.safetensors", ', 1)
    index_path.write_text(text)
    code, err = cli(capsys, compress_argv(b, f, tmp_path / "out"), [b, f])
    assert code == 2
    assert_one_error(err, str(index_path), "c.bias", "twice")


def test_tensor_in_two_shards(tmp_path, capsys):
    base = tensors()
    b = save_dir(tmp_path / "base", base)
    f = _sharded_ft(tmp_path, base)
    # rewrite shard 2 so that it also holds a.weight, which the index places in shard 1
    from safetensors.torch import load_file, save_file

    shard2 = f / "model-00002-of-00002.safetensors"
    state = load_file(str(shard2))
    state["a.weight"] = torch.zeros(8, 16)
    save_file(state, str(shard2))
    code, err = cli(capsys, compress_argv(b, f, tmp_path / "out"), [b, f])
    assert code == 2
    assert_one_error(err, "model.safetensors.index.json", "tensor 'a.weight'", "both shards")


class Boom:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_with_arbitrary_objects_is_not_unpickled(tmp_path, capsys):
    base = tensors()
    b = save_dir(tmp_path / "base", base)
    f = tmp_path / "ft"
    f.mkdir()
    marker = tmp_path / "PWNED"
    torch.save({**nudged(base), "trap": Boom(marker)}, f / "pytorch_model.bin")
    code, err = cli(capsys, compress_argv(b, f, tmp_path / "out"), [b, f])
    assert code == 2
    assert_one_error(err, str(f / "pytorch_model.bin"), "weights-only")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_bin_that_is_not_a_checkpoint(tmp_path, capsys):
    base = tensors()
    b = save_dir(tmp_path / "base", base)
    f = tmp_path / "ft"
    f.mkdir()
    (f / "pytorch_model.bin").write_bytes(b"this is plain text, not a pickle")
    code, err = cli(capsys, compress_argv(b, f, tmp_path / "out"), [b, f])
    assert code == 2
    assert_one_error(err, str(f / "pytorch_model.bin"))


# -- unrelated models, bad values, bad flags --------------------------------------------------

def test_no_names_align(tmp_path, capsys):
    b = save_dir(tmp_path / "base", tensors())
    # no name matches, not even after adding or removing a dotted prefix
    f = save_dir(tmp_path / "ft", {n.replace(".", "_"): t for n, t in nudged(tensors()).items()})
    _refused_as_unrelated(b, f, tmp_path / "out", capsys)


def _refused_as_unrelated(b, f, out, capsys) -> None:
    code, err = cli(capsys, compress_argv(b, f, out), [b, f])
    assert code == 2
    assert_one_error(err, str(f), "no tensor name")
    assert not out.exists()


def test_a_head_paired_by_its_tied_embedding_alone_is_no_alignment(tmp_path, capsys):
    """A BERT-shaped base and a Llama-shaped fine-tune share no name; only the tied-head
    rule paired the fine-tune's lm_head with the base's word embeddings (same shape), and
    compress went on (exit 0). That pairing is no evidence of one model: refused."""
    g = torch.Generator().manual_seed(5)
    b = save_dir(tmp_path / "base", {
        "embeddings.word_embeddings.weight": torch.randn(50, 16, generator=g),
        "encoder.layer.0.attention.self.query.weight": torch.randn(16, 16, generator=g)})
    f = save_dir(tmp_path / "ft", {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "lm_head.weight": torch.randn(50, 16, generator=g)})
    _refused_as_unrelated(b, f, tmp_path / "out", capsys)


def test_a_fine_tune_mostly_without_base_is_warned_about(tmp_path, capsys):
    """One name in common and most parameters new: legal (rebuild is exact), but most
    likely the wrong base, so compress says so; a large new head alone does not."""
    g = torch.Generator().manual_seed(6)
    shared = {"enc.w": torch.randn(8, 16, generator=g)}
    b = save_dir(tmp_path / "base", shared)
    f = save_dir(tmp_path / "ft", {**nudged(shared), "other.w": torch.randn(40, 16, generator=g)})
    code = main([str(a) for a in compress_argv(b, f, tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0
    assert "warning: only 17% of the fine-tune's parameters have a base tensor (1 of 2 " \
           "tensors are new)" in err, err
    f2 = save_dir(tmp_path / "ft2", {**nudged(shared), "head.w": torch.randn(7, 16, generator=g)})
    assert main([str(a) for a in compress_argv(b, f2, tmp_path / "out2")]) == 0
    assert "have a base tensor" not in capsys.readouterr().err


def test_most_shapes_differ(tmp_path, capsys):
    b = save_dir(tmp_path / "base", tensors(rows=8, cols=16))
    f = save_dir(tmp_path / "ft", tensors(rows=4, cols=32))
    out = tmp_path / "out"
    code, err = cli(capsys, compress_argv(b, f, out), [b, f])
    assert code == 2
    # one line: no per-tensor "stored whole" warnings before the refusal
    assert_one_error(err, str(f), "differ in shape")
    assert not out.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["ken", "magnitude"])
def test_non_finite_value_names_tensor_and_row(tmp_path, capsys, bad, method):
    base = tensors()
    ft = nudged(base)
    ft["b.weight"][5, 3] = bad
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    out = tmp_path / "out"
    code, err = cli(capsys, compress_argv(b, f, out, "--method", method), [b, f])
    assert code == 2
    assert_one_error(err, str(f / "model.safetensors"), "tensor 'b.weight'", "row 5")
    assert_not_complete(out)


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_reset_base_value_beyond_the_finetunes_dtype_is_refused(tmp_path, capsys, version):
    """A float32 base holding 1e6 against a float16 fine-tune: where that position is
    reset, the rebuilt value would be float16(1e6) = inf. compress names the file, tensor
    and row instead; where the position is kept (or everything is), the diff is exact."""
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(6, 8, generator=g), "v": torch.randn(4, 8, generator=g)}
    base["w"][3, 2] = 1e6
    ft = {n: (t.clamp(-10, 10) + 0.01).to(torch.float16) for n, t in base.items()}
    ft["w"][3, 2] = 0.0  # the row's smallest magnitude: reset by magnitude at k = 1
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    out = tmp_path / "out"
    argv = ["compress", b, f, "-o", out, "--method", "magnitude", "--format-version", version]
    code, err = cli(capsys, argv + ["--k", "1"], [b, f])
    assert code == 2
    assert_one_error(err, str(b / "model.safetensors"), "tensor 'w'", "row 3", "column 2",
                     "inf", "--exclude")
    assert_not_complete(out)
    ft["w"][3, 2] = 11.0  # now the row's largest: kept, so nothing rebuilds from the base
    f = save_dir(tmp_path / "ft2", ft)
    for extra in (["--k", "1"], ["--keep", "1"]):
        code, err = cli(capsys, argv[:2] + [f] + argv[3:] + extra + ["--overwrite"], [b, f])
        assert code == 0, err
        kenstream.rebuild(b, out, tmp_path / "rebuilt", quiet=True, overwrite=True)
        got = load_model_dir(tmp_path / "rebuilt")["w"]
        assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
        assert got[3, 2].item() == 11.0


@pytest.mark.parametrize("extra", [["--k", "1"], ["--keep", "0.1", "--budget", "global"]])
def test_delta_names_the_base_when_its_cast_overflows(tmp_path, capsys, extra):
    """--method delta compares in the fine-tune's dtype: a float32 base value of 1e6 does
    not fit float16. The error names the base's file (it named the fine-tune's) and says
    that the cast overflows (it said 'NaN or Inf', of a finite value)."""
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(6, 8, generator=g)}
    base["w"][3, 2] = 1e6
    ft = {"w": (base["w"].clamp(-10, 10) + 0.01).to(torch.float16)}
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    out = tmp_path / "out"
    code, err = cli(capsys, ["compress", b, f, "-o", out, "--method", "delta", *extra], [b, f])
    assert code == 2
    assert_one_error(err, str(b / "model.safetensors"), "tensor 'w'", "row 3", "column 2",
                     "does not fit F16", "--exclude")
    assert_not_complete(out)
    # An inf in the base itself (no cast): 'NaN or Inf in the base tensor', of the base's file.
    base["w"][3, 2] = float("inf")
    b2 = save_dir(tmp_path / "base2", {"w": base["w"].to(torch.float16)})
    code, err = cli(capsys, ["compress", b2, f, "-o", tmp_path / "out2", "--method", "delta",
                             *extra], [b2, f])
    assert code == 2
    assert_one_error(err, str(b2 / "model.safetensors"), "tensor 'w'", "row 3",
                     "NaN or Inf in the base tensor")


@pytest.mark.parametrize("flags, needle", [
    (["--k", "0"], "--k"), (["--k", "-3"], "--k"), (["--keep", "0"], "--keep"),
    (["--keep", "1.5"], "--keep"), (["--keep", "-0.2"], "--keep"),  # nan: a usage error now
    # (tests/test_usability.py::test_keep_refuses_what_is_no_share)
    (["--k", "4", "--shard-size", "0"], "size"), (["--k", "4", "--shard-size", "lots"], "size"),
    (["--k", "4", "--include", "("], "--include"),
    (["--k", str(2**63)], "at most 2**63 - 1"), (["--k", "4", "--level", "0"], "--level"),
    (["--k", "4", "--level", "20"], "--level"), (["--k", "4", "--level", "-1"], "--level"),
    (["--k", "4", "--shard-size", "9" * 400], "too large"),
    (["--k", "4", "--shard-size", "9300000TB"], "at most 2**63 - 1 bytes"),
    # --level would be ignored, -1 would draw 2**64 - 1's ties under another record
    (["--k", "4", "--level", "5", "--format-version", "1"], "format 1 stores raw bits"),
    (["--k", "4", "--seed", "-1"], "--seed must be a whole number from 0 to 2**64 - 1"),
    (["--k", "4", "--seed", str(2**64)], "--seed must be a whole number from 0 to 2**64 - 1"),
])
def test_bad_selection_flags(pair, capsys, flags, needle):
    b, f, out = pair
    code, err = cli(capsys, ["compress", b, f, "-o", out, *flags], [b, f])
    assert code == 2
    assert_one_error(err, needle)
    assert not out.exists()


@pytest.mark.parametrize("options, needle", [
    ({"keep": True}, "keep True is not a fraction"), ({"k": 2.5}, "--k must be a whole number"),
    ({"keep": 0.5, "seed": "1"}, "--seed must be a whole number"),
    ({"keep": 0.5, "seed": 1.5}, "--seed must be a whole number"),
    ({"keep": 0.5, "include": ["a"]}, "--include must be a regular expression"),
    ({"keep": 0.5, "threads": 0}, "threads must be a whole number >= 1"),
    ({"keep": "half"}, "keep 'half' is not a fraction"),
    ({"keep": 0.5, "shard_size": 2**63}, "at most 2**63 - 1 bytes"),
    ({"keep": 0.5, "level": 3, "format_version": 1}, "format 1 stores raw bits"),
    ({"keep": 0.5, "seed": -5}, "from 0 to 2**64 - 1"),
])
def test_api_settings_are_checked_before_anything_is_made(pair, options, needle):
    """The Python API takes what the command line parses: a bad value is a SelectionError
    before the output folder exists (it was an unfinished diff, or a TypeError)."""
    b, f, out = pair
    before = snapshot(b, f)
    with pytest.raises(SelectionError, match=re.escape(needle)):
        kenstream.compress(b, f, out, quiet=True, **options)
    assert not out.exists() and snapshot(b, f) == before


def test_api_takes_numbers_of_any_type(pair):
    """NumPy scalars, fractions and '50%' are the numbers they stand for: the same diff,
    byte for byte, as plain ints and floats."""
    b, f, out = pair
    kenstream.compress(b, f, out, keep=0.5, seed=3, quiet=True)
    want = {p.name: p.read_bytes() for p in out.glob("*.kdiff")}
    for options in ({"keep": np.float32(0.5), "seed": np.int64(3)},
                    {"keep": Fraction(1, 2), "seed": 3.0}, {"keep": "50%", "seed": 3}):
        other = out.with_name("other")
        kenstream.compress(b, f, other, quiet=True, overwrite=True, **options)
        assert {p.name: p.read_bytes() for p in other.glob("*.kdiff")} == want, options
    index = json.loads((other / "kenstream-diff.json").read_text())
    assert index["selection"]["keep"] == 0.5 and index["selection"]["seed"] == 3
    kenstream.compress(b, f, out.with_name("by-k"), k=np.int64(8), quiet=True)
    assert json.loads((out.with_name("by-k") / "kenstream-diff.json").read_text())[
        "selection"]["k"] == 8


@pytest.mark.parametrize("call", ["rebuild", "verify"])
def test_api_thread_counts_below_one_are_refused(diff, tmp_path, call):
    b, f, d = diff
    with pytest.raises(SelectionError, match="threads must be a whole number >= 1"):
        if call == "rebuild":
            kenstream.rebuild(b, d, tmp_path / "rebuilt", threads=0, quiet=True)
        else:
            kenstream.verify(d, b, f, threads=-2, quiet=True)
    assert not (tmp_path / "rebuilt").exists()


@pytest.mark.parametrize("command", ["compress", "rebuild", "verify"])
@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_thread_counts_below_one_are_refused(pair, capsys, command, threads):
    """-j 0 or less is a usage error (exit 2, naming -j) before anything is read or made."""
    b, f, out = pair
    argv = {"compress": ["compress", b, f, "-o", out, "--k", "4"],
            "rebuild": ["rebuild", b, out, "-o", out.with_name("rebuilt")],
            "verify": ["verify", b, out]}[command]
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv] + ["-j", threads, "-q"])
    assert stop.value.code == 2
    assert "-j/--threads" in capsys.readouterr().err
    assert not out.exists() and not out.with_name("rebuilt").exists()


def test_missing_input(tmp_path, capsys):
    b = save_dir(tmp_path / "base", tensors())
    code, err = cli(capsys, compress_argv(b, tmp_path / "nowhere", tmp_path / "out"), [b])
    assert code == 2
    assert_one_error(err, "nowhere")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback_above_the_one_line(pair, capsys, tmp_path):
    """--debug adds the traceback; a user's error still ends in its one line and exit 2,
    in `main` and through the real entry point (it was "internal error", exit 3)."""
    b, f, out = pair
    _truncate_in_data(f / "model.safetensors")
    code = main([str(a) for a in compress_argv(b, f, out, "--debug", "-q")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" in err and "CorruptFileError" in err
    assert_one_error(err.strip("\n").split("\n")[-1], f / "model.safetensors")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "kenstream", "rebuild", b, tmp_path / "nope",
                           "-o", tmp_path / "out2", "--debug"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr and "internal error" not in proc.stderr
    assert_one_error(proc.stderr.strip("\n").split("\n")[-1], tmp_path / "nope")
    assert not (tmp_path / "out2").exists()


# -- damaged or foreign diffs -----------------------------------------------------------------

def _diff_commands(b, f, d, out):
    return {
        "info": ["info", d],
        "verify": ["verify", d, "--base", b, "--finetuned", f],
        "rebuild": ["rebuild", b, d, "-o", out],
    }


def _check_all_commands(capsys, b, f, d, *needles, code=2):
    for cmd, argv in _diff_commands(b, f, d, d.parent / "rebuilt").items():
        got, err = cli(capsys, argv, [b, f, d])
        assert got == code, (cmd, err)
        assert_one_error(err, *needles)
        assert_not_complete(d.parent / "rebuilt")


def test_diff_without_index(diff, capsys):
    b, f, d = diff
    (d / "kenstream-diff.json").unlink()
    _check_all_commands(capsys, b, f, d, str(d), "kenstream-diff.json")


def test_diff_index_unfinished_flag(diff, capsys):
    b, f, d = diff
    index = json.loads((d / "kenstream-diff.json").read_text())
    index["complete"] = False
    (d / "kenstream-diff.json").write_text(json.dumps(index))
    _check_all_commands(capsys, b, f, d, "kenstream-diff.json", "unfinished", "--resume")


def test_diff_from_newer_format(diff, capsys):
    b, f, d = diff
    index = json.loads((d / "kenstream-diff.json").read_text())
    index["format_version"] = 3
    (d / "kenstream-diff.json").write_text(json.dumps(index))
    _check_all_commands(capsys, b, f, d, "kenstream-diff.json", "newer", "upgrade")


def test_diff_index_not_json(diff, capsys):
    b, f, d = diff
    (d / "kenstream-diff.json").write_text("{ not json")
    _check_all_commands(capsys, b, f, d, "kenstream-diff.json", "JSON")


def test_tampered_shard_fails_its_hash(diff, capsys):
    b, f, d = diff
    shard = next(d.glob("*.kdiff"))
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x40  # one bit of one stored value
    shard.write_bytes(bytes(raw))
    for argv in (["verify", d, "--base", b], ["rebuild", b, d, "-o", d.parent / "rebuilt"]):
        code, err = cli(capsys, argv, [b, f, d])
        assert code == 2
        assert_one_error(err, shard.name, "sha256")
    assert_not_complete(d.parent / "rebuilt")


def test_the_first_damaged_shard_is_named_though_shards_are_hashed_side_by_side(pair, capsys):
    """Shards are hashed on verify's threads; the error still names the first damaged one
    in the index's order, whichever thread finishes first."""
    b, f, _ = pair
    d = b.parent / "sharded"
    assert cli(capsys, compress_argv(b, f, d, "--shard-size", "300B"), [b, f])[0] == 0
    shards = sorted(d.glob("*.kdiff"))
    assert len(shards) >= 3
    for shard in shards[1:]:
        raw = bytearray(shard.read_bytes())
        raw[-1] ^= 0x01
        shard.write_bytes(bytes(raw))
    for _ in range(3):
        code, err = cli(capsys, ["verify", d, "--base", b, "-j", "2"], [b, f, d])
        assert code == 2
        assert_one_error(err, shards[1].name, "sha256")


def test_missing_shard(diff, capsys):
    b, f, d = diff
    shard = next(d.glob("*.kdiff"))
    shard.unlink()
    code, err = cli(capsys, ["rebuild", b, d, "-o", d.parent / "rebuilt"], [b, f, d])
    assert code == 2
    assert_one_error(err, shard.name, "missing")


def test_rebuild_against_another_base_needs_force(diff, capsys):
    """Format 2 records each base tensor's digest: another base is refused by its content,
    --force or not (it would decode nothing right). Format 1 has no digests: a base whose
    files differ is refused by fingerprint unless --force, which rebuilds over it."""
    b, f, d = diff
    other = save_dir(b.parent / "other", tensors(seed=9))
    for n, argv in enumerate((["rebuild", other, d, "-o", d.parent / "out-0"],
                              ["verify", d, "--base", other],
                              ["rebuild", other, d, "-o", d.parent / "out-2", "--force"])):
        code, err = cli(capsys, argv, [b, f, d, other])
        assert code == 2
        assert_one_error(err, str(other / "model.safetensors"), "tensor '",
                         "not the one this diff was made from", f"made from: {b}")
        assert_not_complete(d.parent / f"out-{n}")
    d1 = d.parent / "diff-v1"
    code, err = cli(capsys, compress_argv(b, f, d1) + ["--format-version", "1"], [b, f])
    assert code == 0, err
    out1 = d.parent / "rebuilt-v1"
    code, err = cli(capsys, ["rebuild", other, d1, "-o", out1], [b, f, d1, other])
    assert code == 2
    assert_one_error(err, str(other / "model.safetensors"), "differs from the base", "--force")
    code, err = cli(capsys, ["rebuild", other, d1, "-o", out1, "--force"], [b, f, d1, other])
    assert code == 0
    assert err.startswith("warning: ") and "--force" in err and "Traceback" not in err
    assert (out1 / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_forced_base_of_other_shapes_is_refused_before_anything_is_built(tmp_path, capsys,
                                                                         version):
    """--force lets another base through the fingerprint check, not another shape: a base
    whose 'b.weight' is [16, 8] where the diff's is [8, 16] (same bytes) is refused, by
    rebuild and verify, naming the tensor and both shapes, before any shard is written
    (rebuild writes 'a.weight' into a shard of its own first)."""
    base = tensors()
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", nudged(base))
    d = tmp_path / "diff"
    code, err = cli(capsys, compress_argv(b, f, d, "--format-version", version), [b, f])
    assert code == 0, err
    other = save_dir(tmp_path / "other", {**base, "b.weight": base["b.weight"].reshape(16, 8)})
    out = tmp_path / "rebuilt"
    for argv in (["rebuild", other, d, "-o", out, "--force", "--shard-size", "600B"],
                 ["verify", other, d, "--force"]):
        code, err = cli(capsys, argv, [b, f, d, other])
        assert code == 2, err
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning: ")]
        assert_one_error("\n".join(lines), "tensor 'b.weight'", "base tensor 'b.weight' has "
                         "shape [16, 8], diff expects [8, 16]")
        assert not (out.exists() and list(out.glob("*.safetensors"))), argv


def test_index_strings_are_data(diff, capsys, tmp_path):
    """Hostile strings in the index are printed or compared, never evaluated or formatted."""
    b, f, d = diff
    marker = tmp_path / "PWNED"
    payload = f"__import__('os').system('touch {marker}') {{0}} %s $(touch {marker})"
    index_path = d / "kenstream-diff.json"
    index = json.loads(index_path.read_text())
    index["command"] = [payload]
    index["base"]["source"] = payload
    index["selection"]["method"] = payload
    index["kenstream_version"] = payload
    index_path.write_text(json.dumps(index))
    code = main(["info", str(d)])
    printed = capsys.readouterr().out
    assert code == 0 and payload in printed
    assert not marker.exists()
    # a record field that should be a number but holds code is refused, not run
    index["tensors"]["a.weight"]["rows"] = payload
    index_path.write_text(json.dumps(index))
    _check_all_commands(capsys, b, f, d, "kenstream-diff.json", "tensor 'a.weight'")
    assert not marker.exists()


def test_record_dtype_tampered_with_consistent_hash(pair, capsys):
    """A format-1 record whose dtype disagrees with its shard entry is refused, not
    silently cast: the shard's own record is edited and the diff re-signed, so only the
    entry check can catch it."""
    from tests.forge import edit_records, resign

    b, f, _ = pair
    d = b.parent / "diff-v1"
    code, err = cli(capsys, compress_argv(b, f, d) + ["--format-version", "1"], [b, f])
    assert code == 0, err
    index = json.loads((d / "kenstream-diff.json").read_text())
    rec = index["tensors"]["a.weight"]
    assert rec["encoding"] in ("bitmask", "indices") and rec["dtype"] == "F32"

    def to_f64(records):
        records["a.weight"]["dtype"] = "F64"

    edit_records(d / rec["shard"], to_f64)
    resign(d)
    for argv in (["rebuild", b, d, "-o", d.parent / "rebuilt"], ["verify", d, "--base", b],
                 ["viz", d, "--tensor", "a.weight", "-o", d.parent / "a.png"]):
        code, err = cli(capsys, argv, [b, f, d])
        assert code == 2
        assert_one_error(err, "tensor 'a.weight'", "values entry is F32",
                         "the record says F64", "dtype or shape tampered")
    assert_not_complete(d.parent / "rebuilt")
    assert not (d.parent / "a.png").exists()


# -- outputs ------------------------------------------------------------------------------

def test_output_equal_to_or_inside_an_input(pair, capsys):
    b, f, _ = pair
    for out in (b, f, b / "sub", f / "model.safetensors", b.parent):
        code, err = cli(capsys, compress_argv(b, f, out), [b, f])
        assert code == 2
        assert_one_error(err, str(out), "input")
    assert not (b / "sub").exists()


def test_rebuild_output_inside_diff(diff, capsys):
    b, f, d = diff
    for out in (d, d / "model"):
        code, err = cli(capsys, ["rebuild", b, d, "-o", out], [b, f, d])
        assert code == 2
        assert_one_error(err, str(out), "input")
    assert not (d / "model").exists()


def test_existing_output_needs_overwrite(pair, capsys):
    """A non-empty folder is refused without --overwrite; --overwrite replaces a diff that
    kenstream wrote and keeps the files someone added to it since."""
    b, f, out = pair
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, err = cli(capsys, compress_argv(b, f, out), [b, f, out])
    assert code == 2
    assert_one_error(err, str(out), "not empty")
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert cli(capsys, compress_argv(b, f, out), [b, f])[0] == 0
    (out / "notes.txt").write_text("mine")
    code, err = cli(capsys, compress_argv(b, f, out), [b, f, out])
    assert code == 2
    assert_one_error(err, str(out), "not empty", "--overwrite")
    code, err = cli(capsys, compress_argv(b, f, out, "--overwrite"), [b, f])
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "kenstream-diff.json").exists()


def test_overwrite_of_a_foreign_directory_keeps_its_files(pair, capsys):
    """--overwrite on a folder that kenstream did not write deletes none of its files,
    even ones named like kenstream's own (a project's README.md, a model's config.json)."""
    b, f, out = pair
    out.mkdir()
    (out / "README.md").write_text("my project")
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    code, err = cli(capsys, compress_argv(b, f, out, "--overwrite"), [b, f])
    assert code == 2
    assert_one_error(err, str(out), "not written by kenstream")
    assert snapshot(out) == before


def test_overwrite_replaces_a_previous_diff(diff, capsys):
    b, f, d = diff
    old = snapshot(d)
    code, err = cli(capsys, compress_argv(b, f, d, "--overwrite", "--shard-size", "200B"), [b, f])
    assert code == 0, err
    assert snapshot(d) != old
    assert len(list(d.glob("*.kdiff"))) > 1
    code, err = cli(capsys, ["verify", d, "--base", b, "--finetuned", f], [b, f, d])
    assert code == 0, err


def test_failed_overwrite_leaves_nothing_complete(diff, capsys):
    """An --overwrite run that fails must not leave the previous index beside new shards."""
    b, f, d = diff
    bad = save_dir(b.parent / "bad", {n: t.clone() for n, t in nudged(tensors()).items()})
    from safetensors.torch import load_file, save_file

    state = load_file(str(bad / "model.safetensors"))
    state["c.bias"][2] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    code, err = cli(capsys, compress_argv(b, bad, d, "--overwrite", "--shard-size", "200B"),
                    [b, bad])
    assert code == 2
    assert_one_error(err, "tensor 'c.bias'", "row 0")
    assert_not_complete(d)
    code, err = cli(capsys, ["info", d], [b, d])
    assert code == 2
    assert_one_error(err, "unfinished")


# -- write faults -----------------------------------------------------------------------------

_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from kenstream.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def run_limited(limit: int, argv, cwd) -> subprocess.CompletedProcess:
    """The CLI in a child process whose files may not grow beyond ``limit`` bytes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", _LIMITED, str(limit), *map(str, argv), "-q"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def bigger_pair(tmp_path):
    base = tensors(rows=64, cols=256)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", nudged(base))
    return b, f


@pytest.mark.parametrize("limit", [100, 40_000])
def test_compress_hits_file_size_limit(bigger_pair, tmp_path, limit):
    b, f = bigger_pair
    out = tmp_path / "out"
    before = snapshot(b, f)
    proc = run_limited(limit, compress_argv(b, f, out), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_error(proc.stderr, str(out), "file size limit")
    assert snapshot(b, f) == before
    assert_not_complete(out)
    assert not list(out.rglob("*.partial"))


def test_rebuild_hits_file_size_limit(bigger_pair, tmp_path, capsys):
    b, f = bigger_pair
    d = tmp_path / "diff"
    assert cli(capsys, compress_argv(b, f, d), [b, f])[0] == 0
    out = tmp_path / "rebuilt"
    before = snapshot(b, f, d)
    proc = run_limited(20_000, ["rebuild", b, d, "-o", out], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_error(proc.stderr, str(out), "file size limit")
    assert snapshot(b, f, d) == before
    assert_not_complete(out)
    assert not list(out.rglob("*.partial"))


def test_subprocess_error_is_one_line(tmp_path):
    """The real entry point: exit code 2 and one line, with no traceback, for a bad file."""
    b = save_dir(tmp_path / "base", tensors())
    f = save_dir(tmp_path / "ft", nudged(tensors()))
    _header_not_json(f / "model.safetensors")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "kenstream", *map(str, compress_argv(
        b, f, tmp_path / "out")), "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert_one_error(proc.stderr, str(f / "model.safetensors"), "JSON")
    assert proc.stdout == ""


@pytest.mark.parametrize("where", ["raw-bits", "last-raw-byte", "symbols", "positions",
                                   "table"])
def test_damaged_frame_in_a_resigned_diff(diff, capsys, where):
    """One byte of a format-2 tensor changed and the diff re-signed: every reader (rebuild,
    verify, viz, load) refuses it in one line naming the tensor; nothing complete is
    written."""
    import struct

    from tests.forge import read_header, resign

    b, f, d = diff
    index = json.loads((d / "kenstream-diff.json").read_text())
    rec = index["tensors"]["a.weight"]
    assert rec["encoding"] == "coded" and rec["positions_bytes"] > 0
    shard = d / rec["shard"]
    header = read_header(shard)
    data_start = 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]
    frames = header["a.weight::frames"]["data_offsets"][0] + data_start
    table = header["a.weight::table"]["data_offsets"][0] + data_start
    pos = rec["positions_bytes"]
    raw = bytearray(shard.read_bytes())
    nibbles, escapes, raw_bits = struct.unpack_from("<BBHfIIII", raw, frames + pos)[5:]
    bits_at = frames + pos + 24 + 128 + nibbles + escapes
    assert raw_bits > 4
    at = {"raw-bits": bits_at + raw_bits // 2,  # a stored value's bits: only the crc sees it
          "last-raw-byte": frames + pos + rec["values_bytes"] - 1,
          "symbols": frames + pos + 24 + 128 + 5,
          "positions": frames + 6,
          "table": table + 8}[where]  # the positions length of frame 0
    raw[at] ^= 0x10
    shard.write_bytes(bytes(raw))
    resign(d)
    for argv in (["rebuild", b, d, "-o", d.parent / "rebuilt"], ["verify", d, "--base", b],
                 ["viz", d, "--tensor", "a.weight", "--base", b, "-o", d.parent / "a.png"]):
        code, err = cli(capsys, argv, [b, f, d])
        assert code == 2, (argv[0], err)
        assert_one_error(err, "tensor 'a.weight'")
    assert_not_complete(d.parent / "rebuilt")
    assert not (d.parent / "a.png").exists()
    import kenstream
    from kenstream.errors import DiffError

    with pytest.raises(DiffError, match="a.weight"):
        list(kenstream.load(b, d))
