"""Benchmark the KEN selection kernel; prints one table of figures.

Measures, in one run and side by side:

* parameters/second of ``select_mask`` on a 4096x4096 float32 matrix at k=1024 and on
  1024x11008 at k=2752 (LLaMA-7B-like shapes), and on the first as bfloat16, with 1 and
  2 numba threads (best of --repeats runs, wall clock);
* the slow NumPy reference (tests/slow_ken.py) on a sample of rows of the same matrices,
  its rate and the kernel's speed-up over it;
* tie modes: ``scrambled`` against ``positions`` on the 4096x4096 bfloat16 matrix;
* long rows: one row of 10^6 and of 4 x 10^6 values at k = n/4 against the same values
  as rows of 10000 (issue 15, item 18), on one thread;
* JIT start-up: a fresh process compiling into an empty numba cache (cold), and a second
  process reusing that cache (warm).

Usage: python tools/bench_kernel.py [--repeats 3] [--sample-rows 3] [--scale 1.0]
[--only rates,ties,long,startup] (--scale < 1 shrinks the row counts for a quick look;
``--only ties,long`` takes well under a minute). Side-by-side figures alternate their
runs and keep the best of each. The machine load average is printed too: timings on a
shared machine are only as good as it is quiet.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kenstream.kernels.ken import select_mask  # noqa: E402
from tests.slow_ken import ken_row  # noqa: E402

SHAPES = [("4096x4096", 4096, 4096, 1024, "f32"), ("1024x11008", 1024, 11008, 2752, "f32"),
          ("4096x4096", 4096, 4096, 1024, "bf16")]

STARTUP = """
import time, numpy as np
t0 = time.perf_counter()
from kenstream.kernels.ken import select_mask
t1 = time.perf_counter()
select_mask(np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32), 64)
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
"""


def weights(rows, cols, seed, dtype):
    """Fine-tuned-weight-like matrix, normal(0, 0.02): float32, or bfloat16 bits (uint16,
    rounded to nearest even)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    if dtype == "bf16":
        bits = x.view(np.uint32)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return x


def as_float32(x):
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return x


def kernel_rate(x, k, threads, repeats):
    numba.set_num_threads(threads)
    out = np.empty(x.shape, bool)
    select_mask(x[:2], k)  # compiled / loaded before timing
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        select_mask(x, k, out=out)
        best = min(best, time.perf_counter() - t)
    assert (out.sum(axis=1) == k).all()
    return x.size / best


def best_of(calls, repeats):
    """Best wall time of each callable, running them in turn ``repeats`` times."""
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            t = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def ties_table(repeats, scale):
    rows = max(4, int(4096 * scale))
    x = weights(rows, 4096, 2, "bf16")
    out = np.empty(x.shape, bool)
    print(f"{'4096x4096 bf16, k 1024':<26}{'positions s':>12}{'scrambled s':>12}{'ratio':>8}")
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        for ties in ("positions", "scrambled"):
            select_mask(x[:2], 1024, ties=ties)
        pos, scr = best_of([lambda: select_mask(x, 1024, ties="positions", out=out),
                            lambda: select_mask(x, 1024, ties="scrambled", out=out)], repeats)
        print(f"{f'{threads} thread(s)':<26}{pos:>12.3f}{scr:>12.3f}{scr / pos:>8.2f}")


def long_rows_table(repeats):
    numba.set_num_threads(1)
    print(f"{'values, k = n/4, 1 thread':<26}{'one row s':>12}{'rows of 1e4 s':>14}{'ratio':>8}")
    for n in (1_000_000, 4_000_000):
        x = weights(1, n, 3, "f32")
        m = x.reshape(n // 10000, 10000)
        one, rows = best_of([lambda: select_mask(x[0], n // 4),
                             lambda: select_mask(m, 2500)], repeats)
        print(f"{n:<26,}{one:>12.3f}{rows:>14.3f}{one / rows:>8.2f}")


def reference_rate(x, k, rows):
    t = time.perf_counter()
    for i in range(rows):
        ken_row(as_float32(x[i]), k)
    return rows * x.shape[1] / (time.perf_counter() - t)


def startup(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", STARTUP], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    total = time.perf_counter() - t
    return float(out[0]), float(out[1]), total


def rates_table(threads, args):
    head = f"{'matrix':<16}{'k':>6}" + "".join(f"{f'{t} thr Mparam/s':>17}" for t in threads)
    head += f"{'reference param/s':>19}{'speed-up (2 thr)':>18}"
    print(head)
    print("-" * len(head))
    for seed, (name, rows, cols, k, dtype) in enumerate(SHAPES):
        rows = max(4, int(rows * args.scale))
        x = weights(rows, cols, seed, dtype)
        rates = [kernel_rate(x, k, t, args.repeats) for t in threads]
        ref = reference_rate(x, k, args.sample_rows)
        line = f"{name + ' ' + dtype:<16}{k:>6}" + "".join(f"{r / 1e6:>17.1f}" for r in rates)
        line += f"{ref:>19,.0f}{rates[-1] / ref:>17,.0f}x"
        print(line)
    print()


def startup_table():
    with tempfile.TemporaryDirectory() as cache:
        cold = startup(cache)
        warm = startup(cache)
    print(f"{'JIT start-up':<14}{'import s':>10}{'first call s':>14}{'process s':>11}")
    for label, (imp, first, total) in (("cold cache", cold), ("warm cache", warm)):
        print(f"{label:<14}{imp:>10.2f}{first:>14.2f}{total:>11.2f}")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample-rows", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--only", default="rates,ties,long,startup",
                    help="comma-separated sections: rates, ties, long, startup")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))

    threads = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]
    print(f"numba {numba.__version__}, numpy {np.__version__}, "
          f"{numba.config.NUMBA_NUM_THREADS} numba threads available, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print()
    if "ties" in only:
        ties_table(args.repeats, args.scale)
        print()
    if "long" in only:
        long_rows_table(args.repeats)
        print()
    if "rates" in only:
        rates_table(threads, args)
    if "startup" in only:
        startup_table()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
