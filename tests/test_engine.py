"""End to end: compress -> rebuild on tiny real checkpoint pairs.

The expected model is computed in the test: the kernel's ``select_mask`` is applied by hand to
each fine-tuned matrix, kept positions take the fine-tuned value and the rest the base value.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kenstream
from kenstream.cli import main
from tests.ckpt import save_bin, save_dir, toy_pair


def _bits(t: torch.Tensor) -> np.ndarray:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width).numpy()


def _as_kernel_input(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def expected_model(base: dict, ft: dict, prefix: str, keep=None, k=None, ties="positions",
                   selected=lambda name: True) -> dict:
    """Slow independent composition of the rebuilt model from the kernel's masks."""
    out = {}
    for name, t in ft.items():
        bname = name[len(prefix):] if name.startswith(prefix) else name
        b = base.get(bname)
        if b is None or b.shape != t.shape or not t.is_floating_point() or not selected(name):
            out[name] = t.clone()
            continue
        rows = t.shape[0] if t.dim() >= 2 else 1
        ft2 = _as_kernel_input(t).reshape(rows, -1)
        cols = ft2.shape[1]
        kk = k if k is not None else max(1, int(round(keep * cols)))
        mask = kenstream.select_mask(ft2, kk, ties=ties)
        res = b.clone().reshape(rows, cols)
        res[torch.from_numpy(mask)] = t.reshape(rows, cols)[torch.from_numpy(mask)]
        out[name] = res.reshape(t.shape)
    return out


def assert_same_model(directory, expected: dict) -> None:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    got = {}
    for fname in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(directory / fname)))
    assert sorted(got) == sorted(expected)
    assert set(index["weight_map"]) == set(expected)
    total = sum(t.numel() * t.element_size() for t in expected.values())
    assert index["metadata"]["total_size"] == total
    for name, t in expected.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert np.array_equal(_bits(got[name]), _bits(t)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sharded_pair_roundtrip(tmp_path, dtype):
    base, ft = toy_pair(dtype)
    b = save_dir(tmp_path / "base", base, shards=2)
    f = save_dir(tmp_path / "ft", ft, shards=3)
    kenstream.compress(b, f, tmp_path / "diff", keep=0.3, quiet=True, shard_size="2kB")
    index = json.loads((tmp_path / "diff" / "kenstream-diff.json").read_text())
    assert len(index["shards"]) > 1
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True, shard_size="3kB")
    assert_same_model(tmp_path / "out", expected_model(base, ft, "", keep=0.3))
    recs = index["tensors"]
    assert recs["layer.1.norm.weight"]["encoding"] == "unchanged"
    assert recs["positions"]["encoding"] == "unchanged"
    assert recs["steps"]["encoding"] == "dense" and recs["steps"]["reason"] == "non-float"
    assert recs["layer.1.conv.weight"]["rows"] == 6 and recs["layer.1.conv.weight"]["cols"] == 35
    assert recs["layer.0.attn.bias"]["rows"] == 1
    assert recs["head.weight"]["reason"] == "new"


def test_prefix_renamed_with_new_head_and_ties_values(tmp_path):
    base, ft = toy_pair(torch.bfloat16, prefix="model.")
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    index = kenstream.compress(b, f, tmp_path / "diff", k=5, ties="values", quiet=True)
    assert index["alignment"]["finetuned_prefix"] == "model."
    assert index["alignment"]["new"] == ["head.bias", "head.weight"] or \
        sorted(index["alignment"]["new"]) == ["head.bias", "head.weight"]
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True)
    assert_same_model(tmp_path / "out", expected_model(base, ft, "model.", k=5, ties="values"))
    report = kenstream.verify(tmp_path / "diff", b, f, quiet=True)
    assert report["ok"]


def test_bin_pair_and_include(tmp_path):
    base, ft = toy_pair(torch.float32)
    b = save_bin(tmp_path / "base", base)
    f = save_bin(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "diff", keep=0.5, include=r"\d", quiet=True)
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True)
    exp = expected_model(base, ft, "", keep=0.5, selected=lambda n: any(c.isdigit() for c in n))
    assert_same_model(tmp_path / "out", exp)
    index = json.loads((tmp_path / "diff" / "kenstream-diff.json").read_text())
    assert index["tensors"]["emb.weight"]["reason"] == "excluded"


def test_load_yields_rebuilt_tensors(tmp_path):
    base, ft = toy_pair(torch.float16)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "diff", keep=0.25, quiet=True)
    exp = expected_model(base, ft, "", keep=0.25)
    got = dict(kenstream.load(b, tmp_path / "diff"))
    assert sorted(got) == sorted(exp)
    for name, t in exp.items():
        assert np.array_equal(_bits(got[name]), _bits(t)), name


def test_methods_recorded_and_exact(tmp_path):
    base, ft = toy_pair(torch.float32)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    for method in ("delta", "magnitude", "random"):
        out = tmp_path / method
        index = kenstream.compress(b, f, out, keep=0.2, method=method, seed=3, quiet=True)
        assert index["selection"]["method"] == method
        rec = index["tensors"]["layer.0.mlp.weight"]
        assert rec["row_kept"] == round(0.2 * 24)
        assert kenstream.verify(out, b, f, quiet=True)["ok"]


def test_cli_roundtrip_and_info(tmp_path, capsys):
    base, ft = toy_pair(torch.float32)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.5", "-q"]) == 0
    assert main(["info", str(d), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["kept"] + report["totals"]["reset"] == report["totals"]["selected"]
    assert main(["rebuild", str(b), str(d), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert main(["verify", str(d), "--base", str(b), "--finetuned", str(f), "-q"]) == 0
    readme = (d / "README.md").read_text()
    assert readme.startswith("---\nbase_model:") and "--keep 0.5" in readme
    assert (d / "config.json").read_text() == (f / "config.json").read_text()
    # the diff must not look like model weights to a loader
    assert not list(d.glob("*.safetensors")) and not list(d.glob("*.bin"))


def test_threads_give_identical_diffs(tmp_path):
    base, ft = toy_pair(torch.bfloat16)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "j1", keep=0.4, threads=1, quiet=True)
    kenstream.compress(b, f, tmp_path / "j2", keep=0.4, threads=2, quiet=True)
    for p in sorted((tmp_path / "j1").glob("*.kdiff")):
        assert p.read_bytes() == (tmp_path / "j2" / p.name).read_bytes()


@pytest.mark.parametrize("method,ties", [("ken", "positions"), ("ken", "values"),
                                         ("random", "positions"), ("delta", "positions")])
def test_row_blocks_do_not_change_the_diff(tmp_path, monkeypatch, method, ties):
    """Streaming in many small row blocks writes the same bytes as whole tensors."""
    import kenstream.format as fmt

    base, ft = toy_pair(torch.bfloat16)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    kenstream.compress(b, f, tmp_path / "whole", keep=0.3, ties=ties, method=method, quiet=True)
    monkeypatch.setattr(fmt, "BLOCK_ELEMS", 50)
    kenstream.compress(b, f, tmp_path / "blocks", keep=0.3, ties=ties, method=method, quiet=True)
    whole = sorted((tmp_path / "whole").glob("*.kdiff"))
    assert whole
    for p in whole:
        assert p.read_bytes() == (tmp_path / "blocks" / p.name).read_bytes()
    kenstream.rebuild(b, tmp_path / "blocks", tmp_path / "out", quiet=True)
    if method == "ken":
        assert_same_model(tmp_path / "out", expected_model(base, ft, "", keep=0.3, ties=ties))


def test_base_in_another_dtype_is_converted_on_rebuild(tmp_path, monkeypatch):
    """A float32 base under a bf16 fine-tune: unkept positions are the base rounded to bf16
    (torch's rounding), in several row blocks per tensor."""
    import kenstream.format as fmt

    base, ft = toy_pair(torch.bfloat16)
    base32 = {n: (t.float() + 1e-4 if t.is_floating_point() else t) for n, t in base.items()}
    b = save_dir(tmp_path / "base", base32)
    f = save_dir(tmp_path / "ft", ft)
    monkeypatch.setattr(fmt, "BLOCK_ELEMS", 64)
    kenstream.compress(b, f, tmp_path / "diff", keep=0.3, quiet=True)
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True)
    as_ft = {n: (t.to(torch.bfloat16) if t.is_floating_point() else t) for n, t in base32.items()}
    assert_same_model(tmp_path / "out", expected_model(as_ft, ft, "", keep=0.3))
