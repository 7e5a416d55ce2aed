"""How close ``--size`` lands: requested against actual diff bytes, side by side.

    python tools/bench_size.py [--pair DIR] [--requests 5%,10%,20%] [--method delta]
        [--budget global] [-j 2] [--work /tmp/kenstream-size]

``--pair`` holds ``base/`` and ``finetuned/`` (default: the 1B synthetic pair, made in
``--work`` by ``tools/make_checkpoint.py --params 1B`` when absent). Each request runs
``kenstream compress --size`` as a child process; the table prints the request, the
diff's bytes on disk (its shards), their ratio (the target is 0.98 to 1.00), the keep
chosen, the passes and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_pair(work: Path) -> Path:
    pair = work / "pair-1b"
    if not (pair / "finetuned").exists():
        print(f"making the 1B synthetic pair in {pair} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), str(pair),
                        "--params", "1B", "--quiet", "--overwrite"], check=True)
    return pair


def shard_bytes(diff: Path) -> int:
    return sum(p.stat().st_size for p in diff.iterdir() if p.suffix == ".kdiff")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", type=Path, help="folder with base/ and finetuned/")
    ap.add_argument("--requests", default="5%,10%,20%", help="comma-separated --size values")
    ap.add_argument("--method", default="delta")
    ap.add_argument("--budget", default="global")
    ap.add_argument("-j", "--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kenstream-size"))
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    pair = args.pair or default_pair(args.work)
    diff = args.work / "diff"
    rows = []
    for request in [r.strip() for r in args.requests.split(",") if r.strip()]:
        cmd = [sys.executable, "-m", "kenstream", "compress", str(pair / "base"),
               str(pair / "finetuned"), "-o", str(diff), "--size", request, "--method",
               args.method, "--budget", args.budget, "-j", str(args.threads), "--overwrite"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        index = json.loads((diff / "kenstream-diff.json").read_text())
        got = shard_bytes(diff)
        assert got == index["totals"]["diff_bytes"]
        wanted = _requested(request, index["totals"]["finetuned_bytes"])
        passes = proc.stderr.count("--size pass")
        rows.append((request, wanted, got, got / wanted, index["selection"]["keep"], passes,
                     secs))
        print(f"{request}: {got:,} of {wanted:,} bytes ({got / wanted:.4f}) in {passes} "
              f"passes, {secs:.0f} s", flush=True)
    print(f"\n{args.method} --budget {args.budget} on {pair}")
    print(f"{'request':>9} {'requested B':>15} {'actual B':>15} {'ratio':>7} {'keep':>9} "
          f"{'passes':>6} {'seconds':>8}")
    for request, wanted, got, ratio, keep, passes, secs in rows:
        print(f"{request:>9} {wanted:>15,} {got:>15,} {ratio:>7.4f} {keep:>9.5f} {passes:>6} "
              f"{secs:>8.0f}")
    return 0


def _requested(request: str, finetuned_bytes: int) -> int:
    sys.path.insert(0, str(ROOT))
    from kenstream.engine.size import parse_request

    return parse_request(request, finetuned_bytes)


if __name__ == "__main__":
    sys.exit(main())
