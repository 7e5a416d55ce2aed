"""Test-only builders of tiny real checkpoints, written with the independent safetensors
library (and torch.save for .bin), so the code under test never writes its own inputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_dir(directory, tensors: dict, *, shards: int = 1, config: dict | None = None) -> Path:
    """Write ``tensors`` (name -> torch.Tensor) as a hub-style safetensors directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            part = names[i * per:(i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n].contiguous() for n in part}, str(directory / fname),
                      metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    return directory


def save_bin(directory, tensors: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({n: t.contiguous() for n, t in tensors.items()}, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return directory


def toy_pair(dtype=torch.float32, seed=0, prefix="", head=True):
    """A base / fine-tune pair of odd shapes: 2-D, 1-D, 3-D, an int buffer, an unchanged
    tensor; the fine-tune's names carry ``prefix`` and it adds a head when ``head``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    base = {
        "emb.weight": rnd(37, 24),
        "layer.0.attn.weight": rnd(24, 24),
        "layer.0.attn.bias": rnd(24),
        "layer.0.mlp.weight": rnd(53, 24),
        "layer.1.conv.weight": rnd(6, 5, 7),
        "layer.1.norm.weight": torch.ones(24, dtype=dtype),
        "positions": torch.arange(17, dtype=torch.int64),
        "steps": torch.tensor([3, 1, 4], dtype=torch.int32),
    }
    ft = {}
    for name, t in base.items():
        if t.is_floating_point() and "norm" not in name:
            t = (t.float() + torch.randn(t.shape, generator=g) * 2e-3).to(dtype)
        elif name == "steps":
            t = t + 1
        ft[prefix + name] = t
    if head:
        ft["head.weight"] = rnd(3, 24)
        ft["head.bias"] = rnd(3)
    return base, ft
