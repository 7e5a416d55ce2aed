"""tools/make_checkpoint.py: files checked with the independent safetensors / torch libraries."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kenstream.errors import OutputError, SelectionError

_SPEC = importlib.util.spec_from_file_location(
    "make_checkpoint", Path(__file__).resolve().parents[1] / "tools" / "make_checkpoint.py")
mc = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("make_checkpoint", mc)  # dataclasses look their module up there
_SPEC.loader.exec_module(mc)

H, I, L, V = 64, 172, 2, 320  # the tiny preset, written out by hand


def expected_layout() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for n in range(L):
        p = f"model.layers.{n}."
        for x in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{x}_proj.weight"] = (H, H)
        shapes[p + "mlp.gate_proj.weight"] = (I, H)
        shapes[p + "mlp.up_proj.weight"] = (I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
    return shapes


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors = load_file(f)
        assert not set(tensors) & set(out)
        out.update(tensors)
    return out


def file_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    # 30 kB shards: several shards, and the 40 kB embedding / lm_head exceed one.
    mc.make_pair(root / "bf16", "tiny", "bf16", "30KB", seed=7, quiet=True, threads=2)
    mc.make_pair(root / "f32", "tiny", "f32", "5GB", seed=7, quiet=True, threads=1)
    mc.make_pair(root / "f16", "tiny", "f16", "5GB", seed=7, quiet=True, threads=2)
    return root


def test_layout_names_shapes_and_dtype(pairs):
    for role in ("base", "finetuned"):
        tensors = load_dir(pairs / "bf16" / role)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_layout()
        assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    assert all(v.dtype == torch.float16 for v in load_dir(pairs / "f16" / "base").values())


def test_shards_headers_and_index(pairs):
    d = pairs / "bf16" / "base"
    shards = sorted(d.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert [p.name for p in shards] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not list(d.glob("*.partial"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shapes = expected_layout()
    assert set(index["weight_map"]) == set(shapes)
    assert index["metadata"]["total_size"] == sum(2 * int(np.prod(s)) for s in shapes.values())
    for p in shards:
        raw = p.read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        assert hlen % 8 == 0
        header = json.loads(raw[8:8 + hlen])
        header.pop("__metadata__", None)
        spans = sorted(v["data_offsets"] for v in header.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert len(raw) == 8 + hlen + spans[-1][1]
        for name, meta in header.items():
            assert index["weight_map"][name] == p.name
            assert meta["dtype"] == "BF16" and tuple(meta["shape"]) == shapes[name]
        # Only a lone tensor may exceed the 30 kB limit.
        assert spans[-1][1] <= 30_000 or len(header) == 1
    assert index["weight_map"]["model.embed_tokens.weight"] != index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    assert file_bytes(d)["model.safetensors.index.json"] == (pairs / "bf16" / "finetuned" / "model.safetensors.index.json").read_bytes()


def test_config(pairs):
    cfg = json.loads((pairs / "bf16" / "finetuned" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (H, I, L, V)
    assert cfg["torch_dtype"] == "bfloat16"
    assert H % cfg["num_attention_heads"] == 0
    assert json.loads((pairs / "f32" / "base" / "config.json").read_text())["torch_dtype"] == "float32"


def test_values_are_plausible_and_finetune_is_close(pairs):
    base, ft = load_dir(pairs / "f32" / "base"), load_dir(pairs / "f32" / "finetuned")
    mats = torch.cat([v.flatten() for k, v in base.items() if v.dim() == 2])
    assert 0.019 < mats.std().item() < 0.021 and abs(mats.mean().item()) < 1e-3
    norms = torch.cat([v for v in base.values() if v.dim() == 1])
    assert abs(norms.mean().item() - 1.0) < 0.01
    frozen_rows = hot_rows = 0
    for name, b in base.items():
        diff = (ft[name] - b).double()
        rel = diff.norm() / b.double().norm()
        assert rel < 0.2, name
        if b.dim() == 2:
            assert 0.01 < rel, name
            frozen_rows += int((diff.abs().amax(dim=1) == 0).sum())
            # Row scales vary: the per-row change spread is wide, not one constant.
            row_std = diff.std(dim=1)
            moved = row_std[row_std > 0]
            assert moved.max() > 3 * moved.min(), name
            hot_rows += int((row_std > 5 * moved.median()).sum())
    assert frozen_rows > 0  # some rows are bit-identical, as in a real fine-tune
    assert hot_rows > 0  # and a few change much more than the rest
    bf_base, bf_ft = load_dir(pairs / "bf16" / "base"), load_dir(pairs / "bf16" / "finetuned")
    assert any(not torch.equal(bf_base[k], bf_ft[k]) for k in bf_base)


def test_bf16_and_f16_are_torch_rounding_of_f32(pairs):
    for role in ("base", "finetuned"):
        f32 = load_dir(pairs / "f32" / role)
        bf16, f16 = load_dir(pairs / "bf16" / role), load_dir(pairs / "f16" / role)
        for name, x in f32.items():
            assert torch.equal(x.to(torch.bfloat16).view(torch.int16), bf16[name].view(torch.int16)), name
            assert torch.equal(x.to(torch.float16).view(torch.int16), f16[name].view(torch.int16)), name


def test_round_bf16_bit_patterns_match_torch():
    rng = np.random.default_rng(3)
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)  # ties and their neighbours
    bits = np.concatenate([(hi[:, None] | lows[None, :]).ravel(),
                           rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)])
    x = bits.view(np.float32)
    finite_or_inf = ~np.isnan(x)
    ours = mc.round_bf16(x)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours[finite_or_inf], ref[finite_or_inf])
    assert np.isnan(torch.from_numpy(ours[~finite_or_inf].view(np.int16)).view(torch.bfloat16).float().numpy()).all()


def test_deterministic_and_independent_of_threads_and_shards(pairs, tmp_path):
    mc.make_pair(tmp_path / "again", "tiny", "bf16", "30KB", seed=7, quiet=True, threads=1)
    for role in ("base", "finetuned"):
        assert file_bytes(tmp_path / "again" / role) == file_bytes(pairs / "bf16" / role)
    mc.make_pair(tmp_path / "one", "tiny", "bf16", "5GB", seed=7, quiet=True, threads=3)
    one, many = load_dir(tmp_path / "one" / "base"), load_dir(pairs / "bf16" / "base")
    assert len(list((tmp_path / "one" / "base").glob("*.safetensors"))) == 1
    assert all(torch.equal(one[k].view(torch.int16), many[k].view(torch.int16)) for k in many)
    mc.make_pair(tmp_path / "other", "tiny", "bf16", "30KB", seed=8, quiet=True)
    other = load_dir(tmp_path / "other" / "base")
    assert not any(torch.equal(other[k], many[k]) for k in many if many[k].dim() == 2)


def test_main_cli(tmp_path, capsys):
    assert mc.main([str(tmp_path / "o"), "--params", "tiny", "--quiet", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "140,096 params" in out and "280,192 bytes" in out  # counted by hand from expected_layout
    assert mc.main([str(tmp_path / "o"), "--params", "tiny", "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err
    assert mc.main([str(tmp_path / "o"), "--params", "tiny", "--quiet", "--overwrite", "--shard-size", "30KB"]) == 0
    shards = sorted(p.name for p in (tmp_path / "o" / "base").glob("*.safetensors"))
    assert len(shards) > 1 and all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert mc.main([str(tmp_path / "p"), "--params", "huge", "--quiet"]) == 2
    assert mc.main([str(tmp_path / "p"), "--params", "tiny", "--shard-size", "5 parsecs"]) == 2
    with pytest.raises(SystemExit):
        mc.main([str(tmp_path / "p"), "--dtype", "int8"])


def test_argument_errors(tmp_path):
    with pytest.raises(SelectionError):
        mc.make_pair(tmp_path / "x", "tiny", dtype="fp8")
    with pytest.raises(SelectionError):
        mc.make_pair(tmp_path / "x", "tiny", delta_std=-1.0)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError):
        mc.make_pair(tmp_path / "file", "tiny", quiet=True)


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5kb", 1500),
                                       ("123", 123), ("2GiB", 2 * 2**30)])
def test_parse_size(text, size):
    assert mc.parse_size(text) == size


@pytest.mark.parametrize("text,target", [("300M", 3e8), ("2.5B", 2.5e9), ("1B", 1.1e9), ("7B", 6.74e9)])
def test_params_presets_and_counts(text, target):
    layout = mc.parse_params(text)
    shapes = dict(layout.tensors())
    count = sum(int(np.prod(s)) for s in shapes.values())
    per_layer = 4 * layout.hidden**2 + 3 * layout.hidden * layout.inter + 2 * layout.hidden
    assert abs(count - target) <= per_layer / 2 + 0.01 * target
    assert shapes["model.embed_tokens.weight"] == (32000, layout.hidden)
    assert shapes[f"model.layers.{layout.layers - 1}.mlp.down_proj.weight"] == (layout.hidden, layout.inter)
    if text == "7B":
        assert (layout.hidden, layout.inter, layout.layers) == (4096, 11008, 32)
