"""What a global budget costs: its first pass and the whole compress, against the plain
compress of the same rule, side by side (seconds and peak RSS, as ratios).

    python tools/bench_budget.py [--pair DIR] [--method delta] [--keep 0.125] [-j 2]
        [--work /tmp/kenstream-budget-bench]

Three child processes on the same pair, the inputs' pages dropped before each: ``compress
--method M --keep K`` (row budget), the global budget's first pass alone (this script with
``--first-pass``: open, plan, gather the score histograms, allocate), and ``compress
--budget global``. Peak RSS is the child's, from the OS. ``--pair`` defaults to the 1B
synthetic pair (made by ``tools/make_checkpoint.py --params 1B`` when absent).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from bench_e2e import drop_cache, files_under, timed_child  # noqa: E402
from bench_size import default_pair  # noqa: E402


def first_pass(base: str, ft: str, method: str, keep: float, threads: int) -> None:
    """The global budget's first pass alone, as compress runs it (no output written)."""
    from kenstream import kernels
    from kenstream.engine import budget
    from kenstream.engine.align import align, tie_heads
    from kenstream.engine.plan import make_items
    from kenstream.io.checkpoint import Checkpoint
    from kenstream.progress import bar
    from kenstream.settings import Settings

    settings = Settings(method=method, keep=keep, budget="global")
    with kernels.threads(threads), Checkpoint.open(base) as b, Checkpoint.open(ft) as f:
        alignment = align(f.names(), b.names())
        tie_heads(alignment, b.names())
        items = make_items(f, b, alignment, settings)
        with bar(0, "budget", True) as progress:
            stats = budget.gather(f, b, items, settings, progress)
        budget.allocate(stats, items, settings)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", type=Path, help="folder with base/ and finetuned/")
    ap.add_argument("--method", default="delta")
    ap.add_argument("--keep", type=float, default=0.125)
    ap.add_argument("-j", "--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kenstream-budget-bench"))
    ap.add_argument("--first-pass", nargs=2, metavar=("BASE", "FT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.first_pass:
        first_pass(*args.first_pass, args.method, args.keep, args.threads)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    pair = args.pair or default_pair(args.work)
    base, ft = str(pair / "base"), str(pair / "finetuned")
    inputs = files_under(pair / "base") + files_under(pair / "finetuned")
    compress = [sys.executable, "-m", "kenstream", "compress", base, ft, "-q", "--overwrite",
                "--method", args.method, "--keep", str(args.keep), "-j", str(args.threads)]
    steps = {
        "compress (row)": compress + ["-o", str(args.work / "row")],
        "first pass (global)": [sys.executable, str(HERE / "bench_budget.py"), "--method",
                                args.method, "--keep", str(args.keep), "-j",
                                str(args.threads), "--first-pass", base, ft],
        "compress --budget global": compress + ["-o", str(args.work / "global"), "--budget",
                                                "global"],
    }
    timed_child(steps["compress (row)"])  # warm the numba cache outside the timings
    out = {}
    for label, cmd in steps.items():
        drop_cache(inputs)
        t0 = time.perf_counter()
        secs, rss = timed_child(cmd)
        out[label] = (secs, rss)
        print(f"{label}: {secs:.1f} s, {rss / 1e6:.0f} MB ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    plain_s, plain_rss = out["compress (row)"]
    print(f"\n{args.method} --keep {args.keep}, -j {args.threads}, on {pair}")
    print(f"{'step':<26}{'seconds':>9}{'x row':>8}{'peak RSS':>11}{'x row':>8}")
    for label, (secs, rss) in out.items():
        print(f"{label:<26}{secs:>9.1f}{secs / plain_s:>8.2f}{rss / 1e6:>9.0f}MB"
              f"{rss / plain_rss:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
