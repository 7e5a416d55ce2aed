"""KENviz benchmark: seconds and peak memory to draw the views of an embedding-sized tensor.

Builds, in a temporary directory, a float32 base / fine-tune pair holding one ROWS x COLS
matrix (default 32000 x 4096, a Llama-7B embedding: 131 M positions, 512 MB per file) and one
small matrix, compresses it with ``kenstream.compress(keep=...)``, then renders, each into a
PNG: the ``matrix`` view (kept fraction per block), ``neighbors``, ``matrix`` coloured by the
change from the base, and ``summary``. Printed side by side: the floor (unpacking every kept
row once through the engine's block layer, which every matrix-like view must do), each
view's seconds and its ratio to that floor, the seconds of computing its image alone
(:mod:`kenstream.viz.images`, no matplotlib; timed just before the render), and the peak
resident memory of this process after each step (``resource.getrusage``; it only grows, and counts resident pages of
memory-mapped files, such as the base read for ``--color change``).

Building and compressing run in a child process, so their memory does not count in this
process's peak; the child's own peak is printed apart. Files were just written, so reads
come from the page cache. Usage:

    python tools/bench_viz.py
    python tools/bench_viz.py --rows 4000 --cols 1024 --dir /tmp/kviz --keep-files
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIG = "model.embed_tokens.weight"
SMALL = "model.layers.0.mlp.up_proj.weight"
SMALL_SHAPE = (256, 512)
_ROW_STEP = 2048  # noise is added in row blocks so no second full-size array is made


def build(work: Path, rows: int, cols: int, keep: float) -> float:
    """Write base/, ft/ and compress into diff/ under ``work``; returns compress seconds.

    Peak memory about 2 x rows x cols x 4 bytes: one matrix plus the byte copy that
    ``safetensors.numpy.save_file`` makes while writing it.
    """
    from safetensors.numpy import save_file

    import kenstream

    rng = np.random.default_rng(0)
    big = rng.standard_normal((rows, cols), dtype=np.float32)
    small = rng.standard_normal(SMALL_SHAPE, dtype=np.float32)
    (work / "base").mkdir()
    save_file({BIG: big, SMALL: small}, str(work / "base" / "model.safetensors"))
    # The fine-tune is the base plus small noise, made in place: the base is already on disk.
    for r0 in range(0, rows, _ROW_STEP):
        block = big[r0:r0 + _ROW_STEP]
        block += np.float32(0.02) * rng.standard_normal(block.shape, dtype=np.float32)
    small += np.float32(0.02) * rng.standard_normal(SMALL_SHAPE, dtype=np.float32)
    (work / "ft").mkdir()
    save_file({BIG: big, SMALL: small}, str(work / "ft" / "model.safetensors"))
    del big
    t0 = time.perf_counter()
    kenstream.compress(work / "base", work / "ft", work / "diff", keep=keep, quiet=True)
    return time.perf_counter() - t0


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def unpack_floor(diff: Path, tensor: str) -> float:
    """Seconds to unpack every row of ``tensor``'s kept mask once, in viz-sized row blocks."""
    from kenstream.engine.blocks import TensorBlocks
    from kenstream.io.diff_reader import DiffReader
    from kenstream.viz.images import BLOCK_ELEMS

    with DiffReader(diff) as reader:
        rec = reader.records[tensor]
        t0 = time.perf_counter()
        blocks = TensorBlocks(tensor, reader, None, BLOCK_ELEMS)
        kept = sum(int(np.count_nonzero(blocks.kept(i))) for i in range(len(blocks.ranges)))
        dt = time.perf_counter() - t0
        blocks.release()
    if kept != rec.kept:
        sys.exit(f"unpacked {kept} kept positions, the index says {rec.kept}")
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32000)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--max-pixels", type=int, default=1024)
    ap.add_argument("--dir", help="work here instead of a fresh temporary directory")
    ap.add_argument("--keep-files", action="store_true", help="leave the pair and the diff")
    ap.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)  # the child's job
    args = ap.parse_args(argv)

    if args.build_only:
        print(build(Path(args.build_only), args.rows, args.cols, args.keep))
        return 0

    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="kviz-bench-", dir=args.dir)
    work = Path(tmp.name)
    try:
        return run(args, work)
    finally:
        if args.keep_files:
            print(f"files left in {work}")
        else:
            tmp.cleanup()


def run(args, work: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from kenstream.viz import matrix_image, neighbor_image, render

    t0 = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--cols",
                            str(args.cols), "--keep", str(args.keep), "--build-only", str(work)],
                           capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"building the pair failed:\n{child.stderr[-2000:]}")
    build_s = time.perf_counter() - t0
    compress_s = float(child.stdout.split()[-1])
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    diff, base = work / "diff", work / "base"
    diff_mb = sum(p.stat().st_size for p in diff.rglob("*") if p.is_file()) / 1e6

    # Untimed warm-up on the small tensor: imports, font cache, first PNG writer.
    render(diff, SMALL, "matrix", work / "warm.png", base=base, color="change")
    start_rss = peak_rss()

    floor = unpack_floor(diff, BIG)
    rows = [("floor: kept mask of every row", floor, None, peak_rss())]
    mpx = args.max_pixels
    views = [
        ("matrix (kept fraction)", dict(view="matrix"),
         lambda: matrix_image(diff, BIG, max_pixels=mpx)),
        ("neighbors", dict(view="neighbors"), lambda: neighbor_image(diff, BIG, max_pixels=mpx)),
        ("matrix --base --color change", dict(view="matrix", base=base, color="change"),
         lambda: matrix_image(diff, BIG, base=base, color="change", max_pixels=mpx)),
        ("summary", dict(view="summary"), None),
    ]
    for label, kw, image in views:
        image_s = None
        if image is not None:
            t0 = time.perf_counter()
            image()
            image_s = time.perf_counter() - t0
        view = kw.pop("view")
        out = work / f"{view}-{len(rows)}.png"
        t0 = time.perf_counter()
        render(diff, BIG, view, out, max_pixels=mpx, **kw)
        rows.append((label, time.perf_counter() - t0, image_s, peak_rss()))

    mp = args.rows * args.cols / 1e6
    print(f"tensor {BIG} {args.rows} x {args.cols} float32 ({mp:.1f} M positions), "
          f"keep {args.keep}, diff {diff_mb:.0f} MB, max_pixels {args.max_pixels}")
    print(f"build + compress (child): {build_s:.1f} s, compress alone {compress_s:.1f} s, "
          f"child peak RSS {child_rss / 2**20:.0f} MiB")
    print(f"this process after imports and warm-up: peak RSS {start_rss / 2**20:.0f} MiB\n")
    print(f"{'step':<32} {'seconds':>8} {'x floor':>8} {'image s':>8} {'peak RSS MiB':>13}")
    for label, dt, image_s, rss in rows:
        img = "" if image_s is None else f"{image_s:.2f}"
        print(f"{label:<32} {dt:8.2f} {dt / floor:8.1f} {img:>8} {rss / 2**20:13.0f}")
    print(f"\npeak RSS of this process: {peak_rss() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
