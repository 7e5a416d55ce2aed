"""Write the checked-in test fixtures under ``tests/data/``.

    python tools/make_fixtures.py inputs     # tests/data/pair: a tiny base / fine-tune pair
    python tools/make_fixtures.py v1         # tests/data/v1: diffs of that pair in format 1

The pair is drawn with NumPy and written with the independent ``safetensors`` library. It
covers every encoding a diff has: bitmask and indices (equal and varying row counts, U16 and
U32 column numbers), dense (new, reshaped, non-float), unchanged, a name prefix, F32, F16 and
BF16. The v1 diffs were written by kenstream 0.1.0 (format 1) before the package was
reorganised; tests check that today's readers rebuild them exactly and that today's format-1
writer reproduces their shard bytes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

SHARD_SIZE = "60kB"
"""Shard size of the v1 diffs (small, so some of them have several shards)."""

# name -> settings of each v1 diff (the keyword arguments of kenstream.compress)
V1_CASES = {  # made when positions was the default tie mode, which the indices record
    "ken-keep0.3": dict(keep=0.3, ties="positions"),
    "ken-k3-values": dict(k=3, ties="values"),
    "delta-keep0.25": dict(keep=0.25, method="delta", ties="positions"),
    "random-keep0.01": dict(keep=0.01, method="random", seed=7, ties="positions"),
}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
            >> np.uint32(16)).astype(np.uint16)


def pair() -> tuple[dict, dict]:
    """(base, fine-tune) name -> array; BF16 tensors are uint16 bit patterns."""
    rng = np.random.default_rng(20261202)

    def w(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    base = {
        "embed.weight": w(40, 24),
        "layers.0.attn.weight": w(24, 24),
        "layers.0.attn.bias": w(24),
        "layers.0.mlp.weight": w(300, 24).astype(np.float16),
        "layers.0.conv.weight": w(6, 5, 7),
        "layers.0.norm.weight": np.ones(24, np.float32),
        "layers.1.mlp.weight": _bf16_bits(w(16, 200)),
        "layers.1.long.bias": _bf16_bits(w(70000)),
        "layers.1.wide.weight": w(4, 48),
        "layers.1.coarse.weight": _bf16_bits(w(8, 2000)),
        "positions": np.arange(17, dtype=np.int64),
        "steps": np.array([3, 1, 4], dtype=np.int32),
    }
    ft = {}
    for name, arr in base.items():
        if name in ("layers.0.norm.weight", "positions"):
            out = arr
        elif name == "steps":
            out = arr + 1
        elif name == "layers.1.coarse.weight":
            # few distinct values, so ties="values" keeps different counts per row
            out = _bf16_bits(np.round(w(*arr.shape) * 2e4) / 2e4)
        elif name == "layers.1.wide.weight":
            out = w(4, 50)  # reshaped: stored whole
        elif arr.dtype == np.uint16:
            f = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
            out = _bf16_bits(f + w(*arr.shape, std=0.002))
        else:
            out = (arr.astype(np.float32) + w(*arr.shape, std=0.002)).astype(arr.dtype)
        ft["model." + name] = out
    ft["head.weight"] = w(3, 24)
    ft["head.bias"] = w(3)
    return base, ft


def _save(directory: Path, tensors: dict, bf16: set) -> None:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, arr in tensors.items():
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if name.removeprefix("model.") in bf16:
            t = t.view(torch.int16).view(torch.bfloat16)
        out[name] = t
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text('{"model_type": "toy"}\n')


def write_inputs() -> None:
    base, ft = pair()
    bf16 = {n for n, a in base.items() if a.dtype == np.uint16}
    shutil.rmtree(DATA / "pair", ignore_errors=True)
    _save(DATA / "pair" / "base", base, bf16)
    _save(DATA / "pair" / "finetuned", ft, bf16)


def write_v1() -> None:
    import os

    import kenstream

    os.chdir(ROOT)  # recorded sources are then the relative paths tests/data/pair/...
    for name, settings in V1_CASES.items():
        out = Path("tests/data/v1") / name
        shutil.rmtree(out, ignore_errors=True)
        kenstream.compress("tests/data/pair/base", "tests/data/pair/finetuned", out,
                           quiet=True, shard_size=SHARD_SIZE, format_version=1, **settings)


if __name__ == "__main__":
    what = sys.argv[1:] or ["inputs", "v1"]
    if "inputs" in what:
        write_inputs()
    if "v1" in what:
        write_v1()
