"""End to end: compress -> rebuild (and load, verify) on tiny real checkpoint pairs.

The expected model comes from the slow twins of the selection rules (``tests/expect.py``):
kept positions take the fine-tuned value and the rest the base value.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kenstream
from kenstream.kernels.ken import SERIAL_BELOW
from tests.ckpt import save_bin, save_dir, toy_pair
from tests.expect import assert_same_model, bits, expected_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sharded_pair_roundtrip(tmp_path, dtype):
    base, ft = toy_pair(dtype)
    b = save_dir(tmp_path / "base", base, shards=2)
    f = save_dir(tmp_path / "ft", ft, shards=3)
    kenstream.compress(b, f, tmp_path / "diff", keep=0.3, quiet=True, shard_size="2kB")
    index = json.loads((tmp_path / "diff" / "kenstream-diff.json").read_text())
    assert len(index["shards"]) > 1
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True, shard_size="3kB")
    assert_same_model(tmp_path / "out", expected_model(base, ft, keep=0.3))
    recs = index["tensors"]
    assert recs["layer.1.norm.weight"]["encoding"] == "unchanged"
    assert recs["positions"]["encoding"] == "unchanged"
    steps = recs["steps"]
    assert steps["reason"] == "non-float" and steps["encoding"] == "coded"
    assert steps["kept"] == 3 and steps["positions_bytes"] == 0 and steps["k"] is None
    assert recs["layer.1.conv.weight"]["rows"] == 6 and recs["layer.1.conv.weight"]["cols"] == 35
    assert recs["layer.0.attn.bias"]["rows"] == 1
    assert recs["head.weight"]["reason"] == "new" and recs["head.weight"]["base_name"] is None
    assert recs["emb.weight"]["k"] == round(0.3 * 24) and recs["emb.weight"]["row_kept"] == 7


def test_prefix_renamed_with_new_head_and_ties_values(tmp_path):
    base, ft = toy_pair(torch.bfloat16, prefix="model.")
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    index = kenstream.compress(b, f, tmp_path / "diff", k=5, ties="values", quiet=True)
    assert index["alignment"]["finetuned_prefix"] == "model."
    assert sorted(index["alignment"]["new"]) == ["head.bias", "head.weight"]
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True)
    assert_same_model(tmp_path / "out", expected_model(base, ft, "model.", k=5, ties="values"))
    assert kenstream.verify(tmp_path / "diff", b, f, quiet=True)["ok"]


def test_bin_pair_include_and_exclude(tmp_path):
    base, ft = toy_pair(torch.float32)
    b = save_bin(tmp_path / "base", base)
    f = save_bin(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "inc", keep=0.5, include=r"\d", quiet=True)
    kenstream.rebuild(b, tmp_path / "inc", tmp_path / "out", quiet=True)
    exp = expected_model(base, ft, keep=0.5, selected=lambda n: any(c.isdigit() for c in n))
    assert_same_model(tmp_path / "out", exp)
    index = json.loads((tmp_path / "inc" / "kenstream-diff.json").read_text())
    assert index["tensors"]["emb.weight"]["reason"] == "excluded"
    kenstream.compress(b, f, tmp_path / "exc", keep=0.5, exclude=r"^layer\.0\.", quiet=True)
    kenstream.rebuild(b, tmp_path / "exc", tmp_path / "out2", quiet=True)
    exp = expected_model(base, ft, keep=0.5, selected=lambda n: not n.startswith("layer.0."))
    assert_same_model(tmp_path / "out2", exp)
    index = json.loads((tmp_path / "exc" / "kenstream-diff.json").read_text())
    excluded = index["tensors"]["layer.0.mlp.weight"]
    assert excluded["reason"] == "excluded" and excluded["kept"] == 53 * 24


def test_load_yields_rebuilt_tensors(tmp_path):
    base, ft = toy_pair(torch.float16)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "diff", keep=0.25, quiet=True)
    exp = expected_model(base, ft, keep=0.25)
    got = dict(kenstream.load(b, tmp_path / "diff", block_elems=40))
    assert sorted(got) == sorted(exp)
    for name, t in exp.items():
        assert got[name].dtype == t.dtype, name
        assert np.array_equal(bits(got[name]), bits(t)), name


@pytest.mark.parametrize("method", ["delta", "magnitude", "random"])
def test_baseline_methods_rebuild_exactly(tmp_path, method):
    base, ft = toy_pair(torch.float32)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    index = kenstream.compress(b, f, tmp_path / "diff", keep=0.2, method=method, seed=3,
                               quiet=True)
    assert index["selection"]["method"] == method
    assert index["tensors"]["layer.0.mlp.weight"]["row_kept"] == round(0.2 * 24)
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True)
    assert_same_model(tmp_path / "out",
                      expected_model(base, ft, keep=0.2, method=method, seed=3))
    assert kenstream.verify(tmp_path / "diff", b, f, quiet=True)["ok"]


def big_pair(dtype=torch.bfloat16):
    """The toy pair plus a matrix above the kernels' serial threshold, so selection really
    runs on several threads."""
    base, ft = toy_pair(dtype)
    g = torch.Generator().manual_seed(11)
    rows, cols = 256, 300
    assert rows * cols >= SERIAL_BELOW
    w = torch.randn(rows, cols, generator=g) * 0.02
    base["big.weight"] = w.to(dtype)
    ft["big.weight"] = (w + torch.randn(rows, cols, generator=g) * 2e-3).to(dtype)
    return base, ft


def test_threads_give_identical_diffs(tmp_path):
    import numba

    base, ft = big_pair()
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    before = numba.get_num_threads()
    kenstream.compress(b, f, tmp_path / "j1", keep=0.4, threads=1, quiet=True)
    kenstream.compress(b, f, tmp_path / "j2", keep=0.4, threads=2, quiet=True)
    assert numba.get_num_threads() == before  # compress restores the caller's count
    shards = sorted((tmp_path / "j1").glob("*.kdiff"))
    assert shards
    for p in shards:
        assert p.read_bytes() == (tmp_path / "j2" / p.name).read_bytes()


@pytest.mark.parametrize("method,ties", [("ken", "positions"), ("ken", "values"),
                                         ("random", "positions"), ("delta", "positions"),
                                         ("delta", "scrambled"), ("delta", "values"),
                                         ("magnitude", "scrambled")])
def test_row_blocks_do_not_change_the_diff(tmp_path, method, ties):
    """Streaming in many small row blocks writes the same bytes as whole tensors."""
    base, ft = toy_pair(torch.bfloat16)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "whole", keep=0.3, ties=ties, method=method, quiet=True)
    kenstream.compress(b, f, tmp_path / "blocks", keep=0.3, ties=ties, method=method, quiet=True,
                       block_elems=50)
    whole = sorted((tmp_path / "whole").glob("*.kdiff"))
    assert whole
    for p in whole:
        assert p.read_bytes() == (tmp_path / "blocks" / p.name).read_bytes()
    kenstream.rebuild(b, tmp_path / "blocks", tmp_path / "out", quiet=True, block_elems=50)
    assert_same_model(tmp_path / "out",
                      expected_model(base, ft, keep=0.3, ties=ties, method=method))


def test_base_in_another_dtype_is_converted_on_rebuild(tmp_path):
    """A float32 base under a bf16 fine-tune: unkept positions are the base rounded to bf16
    (torch's rounding), in several row blocks per tensor."""
    base, ft = toy_pair(torch.bfloat16)
    base32 = {n: (t.float() + 1e-4 if t.is_floating_point() else t) for n, t in base.items()}
    b = save_dir(tmp_path / "base", base32)
    f = save_dir(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "diff", keep=0.3, quiet=True, block_elems=64)
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True, block_elems=64)
    assert_same_model(tmp_path / "out", expected_model(base32, ft, keep=0.3))


def indices_pair():
    """Tensors whose selection is stored as column indices: few kept per row, rows keeping
    different counts (coarse bf16 values under ties="values"), and a row longer than 65536
    (U32 column numbers)."""
    g = torch.Generator().manual_seed(4)
    base = {"coarse.weight": (torch.randn(12, 3000, generator=g) * 0.02).to(torch.bfloat16),
            "long.bias": (torch.randn(70_000, generator=g) * 0.02).to(torch.bfloat16)}
    ft = {"coarse.weight": (torch.round(torch.randn(12, 3000, generator=g) * 40) / 2e3)
          .to(torch.bfloat16),
          "long.bias": (base["long.bias"].float()
                        + torch.randn(70_000, generator=g) * 2e-3).to(torch.bfloat16)}
    return base, ft


def test_v1_indices_encoding_end_to_end(tmp_path):
    base, ft = indices_pair()
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    index = kenstream.compress(b, f, tmp_path / "diff", k=4, ties="values", quiet=True,
                               block_elems=5000, format_version=1)
    coarse, long_ = index["tensors"]["coarse.weight"], index["tensors"]["long.bias"]
    assert coarse["encoding"] == "indices" and coarse["row_kept"] is None  # counts vary
    assert long_["encoding"] == "indices" and long_["cols"] > 65536
    from safetensors import safe_open

    with safe_open(str(tmp_path / "diff" / long_["shard"]), "np") as sf:
        assert sf.get_slice("long.bias::index").get_dtype() == "U32"
        assert "coarse.weight::counts" in sf.keys()
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True, block_elems=5000)
    assert_same_model(tmp_path / "out", expected_model(base, ft, k=4, ties="values"))
    assert kenstream.verify(tmp_path / "diff", b, f, quiet=True, block_elems=5000)["ok"]


def test_sparse_rows_and_varying_counts_in_format_2(tmp_path):
    """Few kept positions (column gaps), rows keeping different counts, and a 1-D tensor of
    70,000 values, in small frames: rebuilt exactly, and verify agrees."""
    base, ft = indices_pair()
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    index = kenstream.compress(b, f, tmp_path / "diff", k=4, ties="values", quiet=True,
                               frame_elems=5000, block_elems=12000)
    coarse = index["tensors"]["coarse.weight"]
    assert coarse["row_kept"] is None and coarse["frames"] == 12  # one row of 3000 a frame
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True)
    assert_same_model(tmp_path / "out", expected_model(base, ft, k=4, ties="values"))
    assert kenstream.verify(tmp_path / "diff", b, f, quiet=True)["ok"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keep_one_is_lossless(tmp_path, dtype):
    """keep 1 stores every tensor that changed, coded against the base: the rebuilt model
    is the fine-tune, bit for bit, integer tensors and new tensors included."""
    base, ft = big_pair(dtype)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    index = kenstream.compress(b, f, tmp_path / "diff", keep=1.0, quiet=True,
                               frame_elems=10_000)
    assert all(r["positions_bytes"] == 0 for r in index["tensors"].values())
    assert index["totals"]["diff_bytes"] < index["totals"]["finetuned_bytes"]
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True, threads=2)
    assert_same_model(tmp_path / "out", {n: t.clone() for n, t in ft.items()})


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_empty_tensors_round_trip(tmp_path, version, keep):
    """Tensors with no values ([0, 16], [16, 0], [0], and [0, 4] in bf16 and int64), the
    same or different in the two checkpoints, rebuild and load as they were, and verify
    agrees; a whole-row tensor beside them keeps the diff non-trivial."""
    g = torch.Generator().manual_seed(5)
    empties = {"e.rows": torch.zeros(0, 16), "e.cols": torch.zeros(16, 0), "e.flat": torch.zeros(0),
               "e.bf16": torch.zeros(0, 4, dtype=torch.bfloat16),
               "e.ints": torch.zeros(0, 4, dtype=torch.int64)}
    base = dict(empties, w=torch.randn(8, 8, generator=g))
    ft = dict({n: t.clone() for n, t in empties.items()}, w=base["w"] + 0.1,
              **{"e.new": torch.zeros(0, 3)})
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "diff", keep=keep, quiet=True, format_version=version)
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True)
    assert_same_model(tmp_path / "out", expected_model(base, ft, keep=keep))
    loaded = dict(kenstream.load(b, tmp_path / "diff"))
    assert {n: (tuple(t.shape), t.dtype) for n, t in loaded.items()} == \
        {n: (tuple(t.shape), t.dtype) for n, t in ft.items()}
    assert kenstream.verify(tmp_path / "diff", b, f, quiet=True)["ok"]


def test_a_reason_the_reader_does_not_know_is_read(tmp_path):
    """docs/format.md 6.2: reasons are informational, and a reader accepts one it does not
    know (a later writer's, here in the shards' records and the index alike), rebuilding
    the same model."""
    from tests.forge import edit_records, resign

    base, ft = toy_pair(torch.bfloat16)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    d = tmp_path / "diff"
    kenstream.compress(b, f, d, keep=0.3, quiet=True)

    def later(records):
        for rec in records.values():
            rec["reason"] = "zz"  # no longer than any reason, so the header keeps its size

    for shard in d.glob("*.kdiff"):
        edit_records(shard, later)
    resign(d)
    index = json.loads((d / "kenstream-diff.json").read_text())
    assert {r["reason"] for r in index["tensors"].values() if r["shard"]} == {"zz"}
    kenstream.rebuild(b, d, tmp_path / "out", quiet=True)
    assert_same_model(tmp_path / "out", expected_model(base, ft, keep=0.3))
