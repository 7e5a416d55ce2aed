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


def float_pair(root, *, layers: int, shape: tuple, nan_at=None) -> tuple:
    """(base, fine-tune) folders of a float32 pair written by the safetensors library:
    ``layers`` matrices of ``shape``, a bias, an int buffer, the fine-tune's names
    prefixed with ``model.`` and a new head, config files on both sides and a tokenizer on
    the fine-tune's; ``nan_at`` = (fine-tune tensor, row) puts a NaN in that row."""
    import numpy as np
    from safetensors.numpy import save_file as save_numpy

    root = Path(root)
    rng = np.random.default_rng(0)
    base = {f"layers.{i}.weight": rng.standard_normal(shape, dtype=np.float32)
            for i in range(layers)}
    base["layers.0.bias"] = rng.standard_normal(shape[1], dtype=np.float32)
    base["position_ids"] = np.arange(512, dtype=np.int64)
    ft = {"model." + n: (a + rng.standard_normal(a.shape, dtype=np.float32) * np.float32(0.01)
                         if a.dtype == np.float32 else a) for n, a in base.items()}
    ft["head.weight"] = rng.standard_normal((4, shape[1]), dtype=np.float32)
    if nan_at is not None:
        ft[nan_at[0]][nan_at[1], 3] = np.nan
    dirs = []
    for name, state in (("base", base), ("ft", ft)):
        d = root / name
        d.mkdir(parents=True)
        save_numpy(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "toy", "role": name}))
        dirs.append(d)
    (dirs[1] / "tokenizer.json").write_text('{"version": "1.0"}')
    return tuple(dirs)
