"""Where format 2's lossless bytes go on a real pair, and how much a richer model could save.

    python tools/codec_anatomy.py [--real /tmp/kq/pair] [--work /tmp/kenstream-codec] [--low-rank]

Codes every frame of the tensors the MiniLM pair shares (tools/quality, cast to bfloat16
as tools/bench_codec.py does: the case where format 2 misses its size target) at keep 1, then splits the bytes into
the raw bits below each difference's top bit and the rest (the coded lengths and the
headers), and measures what each part could still lose:

- the raw bits: how often the bit below the top bit is 0, and how well the sign of the
  difference is predicted by the base value's sign or by its neighbours' signs (a rank-one
  update makes ``sign(d[i, j]) = sign(d[i, j-1]) * sign(d[i-1, j]) * sign(d[i-1, j-1])``);
- the lengths: their order-0 entropy alone, given format 2's exponent context, and given
  that context and the left neighbour's length, the length above, both, or the left one
  and the column's mean length over the rows before (richer models than format 2's, as a
  bound on what one could save; format 2 stores the lengths in fewer bits than the first
  three, because zstd's matches also take runs of equal lengths);
- two changes of the coder: the lengths split into one zstd stream per context, two to a
  byte; and zstd level 19;
- a change of the model (``--low-rank``): each matrix's values coded against the base plus
  a rank-r approximation of the update (``bf16(base + A @ B)``, the factors A and B stored
  in bfloat16 beside the diff), at each rank in ``--ranks`` and at the best rank of each
  tensor, factors counted.

Sizes are deterministic. Every figure is a fraction of the fine-tune's bytes unless it
says bits.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_codec  # noqa: E402
from kenstream.format import spec  # noqa: E402
from kenstream.format.v2 import encode_frame  # noqa: E402
from kenstream.io.checkpoint import Checkpoint  # noqa: E402
from kenstream.io.rows import TensorRows  # noqa: E402
from kenstream.kernels import codec  # noqa: E402


def entropy(counts) -> float:
    """Bits a symbol of the empirical distribution ``counts`` (a Counter)."""
    v = np.array(list(counts.values()), float)
    v /= v.sum()
    return float(-(v * np.log2(v)).sum())


def conditional(joint) -> float:
    """H(X | C) in bits from a Counter of (c, x) pairs."""
    marginal = collections.Counter()
    for (c, _), n in joint.items():
        marginal[c] += n
    return entropy(joint) - entropy(marginal)


def _count(counter, keys, values) -> None:
    for key, n in zip(*np.unique(keys * 256 + values, return_counts=True)):
        counter[(int(key) // 256, int(key) % 256)] += int(n)


def signed_key(bits: np.ndarray, width: int) -> np.ndarray:
    """The order-preserving integer of float bit patterns (format 2's key, as int64)."""
    x = bits.astype(np.int64)
    sign = np.int64(1) << np.int64(width - 1)
    return np.where(x & sign, -(x & (sign - 1)) - 1, x)


def measure(frames, level: int) -> dict:
    zc = zstandard.ZstdCompressor(level=level)
    tot = collections.Counter()
    by_ctx, by_ctx_left = collections.Counter(), collections.Counter()
    by_ctx_above, by_ctx_left_above = collections.Counter(), collections.Counter()
    by_ctx_left_column = collections.Counter()
    for ft, base, code in frames:
        w = ft.itemsize * 8
        bits = np.dtype(f"u{ft.itemsize}")
        a, p = ft.reshape(-1).view(bits), base.reshape(-1).view(bits)
        n = a.size
        tot["ft"] += ft.nbytes
        tot["format 2"] += len(encode_frame(ft, base, None, code, level).data)
        tot["format 2, zstd 19"] += len(encode_frame(ft, base, None, code, 19).data)
        lengths = np.empty(n, np.uint8)
        words = np.empty(n * (w - 1) // 64 + 1, np.uint64)
        tot["raw bits"] += (codec.encode_lengths(a, p, w, True, lengths, words) + 7) // 8
        centre = codec.median_exponent(p, w)
        ctx = np.clip(((p >> (w - 9)) & 255).astype(np.int64) - centre + 4, 0, 7)
        L = lengths.astype(np.int64)
        _count(by_ctx, ctx, L)
        left = np.zeros_like(L).reshape(ft.shape)
        left[:, 1:] = L.reshape(ft.shape)[:, :-1]
        _count(by_ctx_left, ctx * 8 + np.minimum(left.reshape(-1), 7), L)
        # The rows above: the length in the same column one row up, and the mean length
        # of that column over the rows before (both known to a decoder, row by row).
        grid = L.reshape(ft.shape)
        above = np.zeros_like(grid)
        above[1:] = grid[:-1]
        column = np.zeros(grid.shape)
        column[1:] = np.cumsum(grid, axis=0)[:-1] / np.arange(1, grid.shape[0])[:, None]
        column = np.minimum(np.round(column * 2).astype(np.int64), 15).reshape(-1)
        left7, above7 = np.minimum(left.reshape(-1), 7), np.minimum(above.reshape(-1), 7)
        _count(by_ctx_above, ctx * 8 + above7, L)
        _count(by_ctx_left_above, (ctx * 8 + left7) * 8 + above7, L)
        _count(by_ctx_left_column, (ctx * 16 + column) * 8 + left7, L)
        for c in range(codec.CONTEXTS):
            s = lengths[ctx == c]
            if s.size:
                s = np.append(s, np.uint8(0)) if s.size & 1 else s
                tot["lengths, a stream per context"] += len(zc.compress(
                    (s[0::2] | (s[1::2] << 4)).tobytes()))
        # The raw bits: bit below the top, and the sign of the difference.
        d = (signed_key(a, w) - signed_key(p, w)).reshape(ft.shape)
        s = np.sign(d)
        m = np.abs(d[np.abs(d) >= 2])
        top = np.floor(np.log2(m)).astype(np.int64)
        tot["|d| >= 2"] += m.size
        tot["bit below top is 0"] += int(((m >> (top - 1)) & 1 == 0).sum())
        nz = s != 0
        tot["d != 0"] += int(nz.sum())
        tot["sign as the base's"] += int(((s == np.where(p.reshape(ft.shape) >> (w - 1), -1, 1))
                                          & nz).sum())
        if ft.shape[0] > 1 and ft.shape[1] > 1:
            q, lf, up, ul = s[1:, 1:], s[1:, :-1], s[:-1, 1:], s[:-1, :-1]
            ok = (q != 0) & (lf != 0) & (up != 0) & (ul != 0)
            tot["rank-one candidates"] += int(ok.sum())
            tot["rank-one right"] += int(((q == lf * up * ul) & ok).sum())
    h_ctx = conditional(by_ctx)
    h_left = conditional(by_ctx_left)
    marginal = collections.Counter()
    for (_, x), n in by_ctx.items():
        marginal[x] += n
    return dict(tot=tot, h=entropy(marginal), h_ctx=h_ctx, h_left=h_left,
                h_above=conditional(by_ctx_above), h_left_above=conditional(by_ctx_left_above),
                h_left_column=conditional(by_ctx_left_column), values=sum(by_ctx.values()))


def binary_entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def report(label: str, m: dict) -> None:
    tot, n = m["tot"], m["values"]
    ft = tot["ft"]
    rest = tot["format 2"] - tot["raw bits"]
    print(f"\n{label}: {n:,} values, {ft / 1e6:.1f} MB of fine-tune")
    print(f"  format 2, keep 1                       {tot['format 2'] / ft:.4f}")
    print(f"    raw bits below each top bit          {tot['raw bits'] / ft:.4f} "
          f"({tot['raw bits'] * 8 / n:.2f} bits a value)")
    print(f"    lengths and headers                  {rest / ft:.4f} ({rest * 8 / n:.2f} bits a value)")
    print(f"  lengths, order-0 entropy               {m['h']:.2f} bits a value")
    print(f"    given format 2's exponent context    {m['h_ctx']:.2f} bits")
    print(f"    given the context and left length    {m['h_left']:.2f} bits")
    print(f"    given the context and length above   {m['h_above']:.2f} bits")
    print(f"    given context, left and above        {m['h_left_above']:.2f} bits")
    print(f"    given context, left, column's mean   {m['h_left_column']:.2f} bits")
    print(f"  lengths as one zstd stream a context   {tot['lengths, a stream per context'] / ft:.4f} "
          f"(against {rest / ft:.4f} with the headers)")
    print(f"  format 2 with zstd level 19            {tot['format 2, zstd 19'] / ft:.4f}")
    below = tot["bit below top is 0"] / max(1, tot["|d| >= 2"])
    base_sign = tot["sign as the base's"] / max(1, tot["d != 0"])
    rank_one = tot["rank-one right"] / max(1, tot["rank-one candidates"])
    print(f"  bit below the top is 0                 {below:.3f} "
          f"({binary_entropy(below):.3f} bits a raw bit)")
    print(f"  sign as the base value's sign          {base_sign:.3f} "
          f"({binary_entropy(base_sign):.3f} bits)")
    print(f"  sign as the rank-one neighbour product {rank_one:.3f} "
          f"({binary_entropy(rank_one):.3f} bits)")


def _coded(ft: np.ndarray, base: np.ndarray, code: str, level: int) -> int:
    """Format 2's bytes for the whole tensor ``ft`` [rows, cols] against ``base``."""
    rows, cols = ft.shape
    return sum(len(encode_frame(ft[r0:r1], base[r0:r1], None, code, level).data)
               for r0, r1 in spec.frame_ranges(rows, cols, spec.DEFAULT_FRAME_ELEMS))


def low_rank(base_dir, ft_dir, names, ranks, level: int) -> dict:
    """Bytes of the shared bfloat16 tensors coded against ``bf16(base + A @ B)``.

    A @ B is the best rank-r approximation (SVD) of the update ``ft - base`` of each
    matrix; A and B are rounded to bfloat16 and cost ``2 r (rows + cols)`` bytes. Returns
    {"ft": fine-tune bytes, r: bytes at rank r for every matrix, "best": bytes with the
    rank (0 included) chosen tensor by tensor, "chosen": Counter of the ranks chosen}.
    """
    out = collections.Counter()
    chosen = collections.Counter()
    with Checkpoint.open(str(base_dir)) as b, Checkpoint.open(str(ft_dir)) as f:
        for name, bname, code in names:
            rows, cols = spec.rows_cols_v2(name, f.info(name).shape)
            ft = np.ascontiguousarray(TensorRows(f, name, rows, cols).raw(0, rows))
            base = np.ascontiguousarray(TensorRows(b, bname, rows, cols, code).read(0, rows))
            out["ft"] += ft.nbytes
            sizes = {0: _coded(ft, base, code, level)}
            if code == "BF16" and rows > 1 and cols > 1:
                tb = torch.from_numpy(base.view(np.int16).copy()).view(torch.bfloat16).float()
                tf = torch.from_numpy(ft.view(np.int16).copy()).view(torch.bfloat16).float()
                u, s, v = torch.linalg.svd((tf - tb).double(), full_matrices=False)
                for r in ranks:
                    a = (u[:, :r] * s[:r]).to(torch.bfloat16).float()
                    bb = v[:r].to(torch.bfloat16).float()
                    pred = (tb + a @ bb).to(torch.bfloat16).view(torch.int16).numpy()
                    sizes[r] = (_coded(ft, pred.view(base.dtype), code, level)
                                + 2 * r * (rows + cols))
            for r in ranks:
                out[r] += sizes.get(r, sizes[0])
            out[0] += sizes[0]
            best = min(sizes, key=sizes.get)
            out["best"] += sizes[best]
            chosen[best] += 1
    return dict(tot=out, chosen=chosen)


def report_low_rank(label: str, m: dict, ranks) -> None:
    tot = m["tot"]
    ft = tot["ft"]
    print(f"\n{label}, values coded against base + a rank-r update (factors counted):")
    print(f"  rank 0 (format 2)                      {tot[0] / ft:.4f}")
    for r in ranks:
        print(f"  rank {r:<2d} for every matrix               {tot[r] / ft:.4f}")
    picks = ", ".join(f"rank {r}: {n}" for r, n in sorted(m["chosen"].items()))
    print(f"  the best rank of each tensor           {tot['best'] / ft:.4f} ({picks})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=Path("/tmp/kq/pair"),
                    help="the MiniLM pair of tools/quality/finetune.py (made if absent)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kenstream-codec"),
                    help="where the bfloat16 cast is kept")
    ap.add_argument("--level", type=int, default=1, help="zstd level of format 2's frames")
    ap.add_argument("--low-rank", action="store_true",
                    help="also code the values against base + a rank-r update")
    ap.add_argument("--ranks", default="2,4,8,16", help="ranks tried by --low-rank")
    args = ap.parse_args(argv)
    label = "MiniLM bf16"
    base, ft = bench_codec.real_pair(args.real, args.work)[label]
    names = bench_codec.shared_tensors(base, ft)
    report(label, measure(bench_codec._frames(base, ft, names), args.level))
    if args.low_rank:
        ranks = [int(r) for r in args.ranks.split(",") if r]
        report_low_rank(label, low_rank(base, ft, names, ranks, args.level), ranks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
