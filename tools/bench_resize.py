"""What a resized vocabulary costs: a 7B-shaped embedding and output head (32000 x 4096,
bf16) whose fine-tune adds two tokens, against the same fine-tune without them.

    python tools/bench_resize.py [--rows 32000] [--cols 4096] [--added 2] [--keep 0.25]
        [--dir /tmp/kenstream-resize]

Writes base, fine-tune and grown fine-tune with NumPy and safetensors, compresses both
fine-tunes against the base in one run, and prints the two diff sizes and their ratio
(target: the grown one within 1 % of the other). These two tensors are the only ones a
resize touches; the rest of a 7B model adds the same bytes to both diffs, so the ratio
over the whole model is closer still.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bf16(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def save(directory: Path, tensors: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
               for n, a in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32000)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--added", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--dir", default="/tmp/kenstream-resize")
    args = ap.parse_args(argv)
    import kenstream

    work = Path(args.dir)
    rng = np.random.default_rng(0)
    names = ("model.embed_tokens.weight", "lm_head.weight")
    base = {n: rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02
            for n in names}
    ft = {n: b + rng.standard_normal(b.shape, dtype=np.float32) * 2e-3 for n, b in base.items()}
    grown = {n: np.concatenate([t, rng.standard_normal((args.added, args.cols),
                                                       dtype=np.float32) * 0.02])
             for n, t in ft.items()}
    b = save(work / "base", {n: bf16(t) for n, t in base.items()})
    f = save(work / "finetuned", {n: bf16(t) for n, t in ft.items()})
    g = save(work / "grown", {n: bf16(t) for n, t in grown.items()})
    sizes = {}
    for label, src in (("same vocabulary", f), (f"{args.added} tokens added", g)):
        t0 = time.perf_counter()
        index = kenstream.compress(b, src, work / f"diff-{label.split()[0]}", keep=args.keep,
                                   quiet=True, overwrite=True)
        sizes[label] = index["totals"]["diff_bytes"]
        print(f"{label:<20} diff {sizes[label] / 1e6:9.2f} MB  ({time.perf_counter() - t0:.0f} s)")
    same, grew = sizes.values()
    print(f"grown / same: {grew / same:.5f}  (target <= 1.01); the added rows alone are "
          f"{2 * args.added * args.cols * 2 / 1e3:.1f} kB raw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
