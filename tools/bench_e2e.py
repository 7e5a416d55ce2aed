"""End-to-end benchmark: compress and rebuild a synthetic Llama-shaped pair, side by side with
the floors they are judged against.

Prints, in one run: parameters per second and wall time of `kenstream compress` and
`kenstream rebuild` (each a child process, peak resident memory measured by the OS), the time to
read both inputs once (the I/O floor), the kernel-only time on the same tensors held in RAM, the
time to copy the base checkpoint, and the slow reference implementation's rate on a sample of
rows; every timed step, the floors included, is the fastest of ``--repeat`` runs. Page caches
of the files involved are dropped (posix_fadvise DONTNEED) before every timed step, so each
starts from disk. Usage:

    python tools/bench_e2e.py --params 1B --dir /tmp/kbench
    python tools/bench_e2e.py --params 1B,7B --dir /tmp/kbench --keep 0.25 -j 2

With several sizes, each is measured in turn and the peak memory of the larger ones is
compared with the smallest's at the end, all in the one run.

With ``--executor ray`` the script also starts a Ray instance on this machine (its CPUs, no
dashboard; stopped at the end), runs the same compress and rebuild as Ray tasks beside the
local runs (``--executor ray --ray-address``, each a new Ray job whose workers start cold),
checks that their outputs are byte-identical, and prints wall time and peak memory of the
driver and of the job's worker processes (their kernel high-water marks, sampled) beside
the local figures, with the overhead ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
          "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
          "print(u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); "
          "sys.exit(rc)")


def files_under(path: Path) -> list:
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


def drop_cache(paths) -> None:
    """Ask the kernel to forget cached pages of these files (no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(p, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_child(cmd, cwd=None, cpu=False) -> tuple:
    """(seconds, peak RSS in bytes) of ``cmd`` run as a grandchild with its own rusage;
    with ``cpu``, also the CPU-seconds it used (user + system, every thread)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *cmd], stderr=subprocess.PIPE, text=True,
                          cwd=cwd)
    dt = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(lines[-5:]))
    rss, used = lines[-1].split()
    return (dt, int(rss) * 1024, float(used)) if cpu else (dt, int(rss) * 1024)


def tree_hashes(directory: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files_under(directory)}


def read_floor(paths) -> float:
    drop_cache(paths)
    t0 = time.perf_counter()
    buf = bytearray(1 << 24)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def copy_floor(src: Path, dst: Path) -> float:
    drop_cache(files_under(src))
    if dst.exists():
        shutil.rmtree(dst)
    t0 = time.perf_counter()
    shutil.copytree(src, dst)
    for p in files_under(dst):
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    dt = time.perf_counter() - t0
    shutil.rmtree(dst)
    return dt


def kernel_only(ft_dir: Path, index: dict, threads: int) -> tuple:
    """Seconds the selection kernel alone spends on the selected tensors (held in RAM)."""
    import numba

    from kenstream import kernels
    from kenstream.engine.plan import tensor_salt
    from kenstream.io.checkpoint import Checkpoint

    numba.set_num_threads(threads)
    total_t, params = 0.0, 0
    sel = index["selection"]
    with Checkpoint.open(str(ft_dir)) as ft:
        for name, rec in index["tensors"].items():
            if rec["k"] is None:  # not selected (stored whole, or unchanged)
                continue
            arr = np.array(ft.array(name)).reshape(rec["rows"], rec["cols"])
            ft.release(name)
            t0 = time.perf_counter()
            kernels.select(sel["method"], arr, rec["k"], ties=sel["ties"], seed=sel["seed"],
                           salt=tensor_salt(name))
            total_t += time.perf_counter() - t0
            params += arr.size
            del arr
    return total_t, params


def slow_rate(ft_dir: Path, rows: int = 3) -> float:
    """Parameters per second of the slow reference on a few rows of an MLP matrix."""
    sys.path.insert(0, str(ROOT / "tests"))
    from slow_ken import ken_mask, widen_bf16_bits

    from kenstream.io.checkpoint import Checkpoint

    with Checkpoint.open(str(ft_dir)) as ft:
        name = next(n for n in ft.names() if n.endswith("mlp.up_proj.weight"))
        info = ft.info(name)
        arr = np.array(ft.array(name)[:rows])
    data = widen_bf16_bits(arr) if info.dtype == "BF16" else arr.astype(np.float32)
    k = max(1, data.shape[1] // 4)
    t0 = time.perf_counter()
    for r in range(rows):
        ken_mask(data[r], k)
    return rows * data.shape[1] / (time.perf_counter() - t0)


def measure(size: str, args, head=None) -> dict:
    """Every figure for one pair size, measured in this process's run."""
    work = Path(args.dir) / size.lower()
    pair, diff, out = work / "pair", work / "diff", work / "rebuilt"
    if not (pair / "finetuned" / "model.safetensors.index.json").exists():
        print(f"making a {size} {args.dtype} pair in {pair} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), str(pair),
                        "--params", size, "--dtype", args.dtype, "--quiet",
                        "--overwrite"], check=True)
        print(f"  made in {time.perf_counter() - t0:.0f} s", flush=True)
    base, ft = pair / "base", pair / "finetuned"
    inputs = files_under(base) + files_under(ft)
    ks = [sys.executable, "-m", "kenstream"]

    warm_numba(ks, work / "warm", args.dtype, args.keep, args.threads)

    # The floor is the fastest of --repeat reads, as every timed step is the fastest of its
    # runs: one slow read (8.1 s where the next two took 2.1 and 1.9 s on 2026-12-07's
    # third host) would flatter every ratio against it.
    floors = []
    for n in range(args.repeat):
        print(f"{size}: reading both inputs ({n + 1}/{args.repeat}) ...", flush=True)
        floors.append(read_floor(inputs))
    floor = min(floors)
    drop_cache(inputs)
    # Every timed step is run --repeat times and the fastest kept (peak memory: the
    # largest): on a shared 2-core machine one run can be slowed 10 % by the host.
    def runs(label, step):
        out = []
        for n in range(args.repeat):
            print(f"{size}: {label} ({n + 1}/{args.repeat}) ...", flush=True)
            out.append(step())
        return out

    def compress():
        drop_cache(inputs)
        # Run in the diff's folder, -o relative: the command the diff records is then the
        # same for the Ray run beside it, whose output can be compared byte for byte.
        return timed_child(ks + ["compress", str(base), str(ft), "-o", diff.name, "--keep",
                                 str(args.keep), "-j", str(args.threads), "-q", "--overwrite"],
                           cwd=work)

    def copy_and_rebuild():
        t_copy = copy_floor(base, work / "copy")
        # Each timed rebuild starts from no output, as each timed copy does: an earlier
        # repeat's model, deleted by --overwrite, would add its unlinking to the time.
        shutil.rmtree(out, ignore_errors=True)
        drop_cache(files_under(base) + files_under(diff))
        return (t_copy, *timed_child(ks + ["rebuild", str(base), str(diff), "-o", str(out),
                                           "-q", "--overwrite"]))

    def kernel():
        drop_cache(inputs)
        return kernel_only(ft, index, args.threads)

    def lossless():
        drop_cache(inputs)
        out = work / "diff-keep1"
        got = timed_child(ks + ["compress", str(base), str(ft), "-o", str(out), "--keep", "1",
                                "-j", str(args.threads), "-q", "--overwrite"], cpu=True)
        size = json.loads((out / "kenstream-diff.json").read_text())["totals"]["diff_bytes"]
        shutil.rmtree(out, ignore_errors=True)
        return (*got, size)

    def delta():
        drop_cache(inputs)
        out = work / "diff-delta"
        got = timed_child(ks + ["compress", str(base), str(ft), "-o", str(out), "--keep",
                                str(args.keep), "--method", "delta", "-j", str(args.threads),
                                "-q", "--overwrite"], cpu=True)
        shutil.rmtree(out, ignore_errors=True)
        return got

    def verify():
        drop_cache(inputs + files_under(diff))
        return timed_child(ks + ["verify", str(diff), "--base", str(base), "--finetuned",
                                 str(ft), "-q"])

    compress_times, rss_c = zip(*runs("compress", compress))
    index = json.loads((diff / "kenstream-diff.json").read_text())
    copy_times, rebuild_times, rss_r = zip(*runs("copy and rebuild", copy_and_rebuild))
    on_ray = {}
    if head is not None:
        via = ["--executor", "ray", "--ray-address", head.address]

        def compress_ray():
            drop_cache(inputs)
            (work / "ray").mkdir(exist_ok=True)
            return head.timed(ks + ["compress", str(base), str(ft), "-o", diff.name, "--keep",
                                    str(args.keep), "-j", str(args.threads), "-q",
                                    "--overwrite"] + via, cwd=work / "ray")

        def rebuild_ray():
            drop_cache(files_under(base) + files_under(diff))
            return head.timed(ks + ["rebuild", str(base), str(diff), "-o",
                                    str(work / "ray" / "rebuilt"), "-q", "--overwrite"] + via)

        # A first Ray job of its own, so that no timed one pays the instance's warm-up.
        subprocess.run(ks + ["compress", str(work / "warm" / "base"),
                             str(work / "warm" / "finetuned"), "-o", str(work / "warm" / "ray"),
                             "--keep", "0.5", "-q", "--overwrite"] + via, check=True)
        for key, label, step in (("compress", "compress under ray", compress_ray),
                                 ("rebuild", "rebuild under ray", rebuild_ray)):
            got = runs(label, step)
            on_ray[key] = min(got, key=lambda r: r[0])[:1] + tuple(max(c) for c in
                                                                    list(zip(*got))[1:])
        on_ray["identical"] = (tree_hashes(diff) == tree_hashes(work / "ray" / diff.name)
                               and tree_hashes(out) == tree_hashes(work / "ray" / "rebuilt"))
        if not args.keep_files:
            shutil.rmtree(work / "ray", ignore_errors=True)
    verify_times, rss_v = zip(*runs("verify", verify))
    lossless_times, rss_l, cpu_l, lossless_sizes = zip(*runs("compress --keep 1", lossless))
    delta_times, rss_d, cpu_d = zip(*runs("compress --method delta", delta))
    kernel_times, k_params = zip(*runs("kernel only", kernel))
    t_c, t_copy, t_r, t_k = (min(t) for t in (compress_times, copy_times, rebuild_times,
                                              kernel_times))
    rss_c, rss_r, rss_v, k_params = max(rss_c), max(rss_r), max(rss_v), k_params[0]
    slow = slow_rate(ft)
    if not args.keep_files:
        for p in (diff, out, work / "warm"):
            shutil.rmtree(p, ignore_errors=True)
    largest = max(r["rows"] * r["cols"] for r in index["tensors"].values())
    return {"size": size, "params": index["totals"]["params"], "diff": index["totals"]["diff_bytes"],
            "input_bytes": sum(p.stat().st_size for p in inputs), "compress": t_c,
            "rss_c": rss_c, "kernel": t_k, "kernel_params": k_params, "floor": floor,
            "rebuild": t_r, "rss_r": rss_r, "copy": t_copy, "slow": slow,
            "verify": min(verify_times), "rss_v": rss_v, "verify_runs": verify_times,
            "lossless": min(lossless_times), "rss_l": max(rss_l), "lossless_size": lossless_sizes[0],
            "lossless_runs": lossless_times, "delta": min(delta_times), "rss_d": max(rss_d),
            "delta_runs": delta_times, "floor_runs": floors,
            "cpu_l": cpu_l[lossless_times.index(min(lossless_times))],
            "cpu_d": cpu_d[delta_times.index(min(delta_times))],
            "bound": 3 * largest * 4 + 300e6, "compress_runs": compress_times, "ray": on_ray,
            "kernel_runs": kernel_times, "rebuild_runs": rebuild_times, "copy_runs": copy_times}


def report(m: dict, args) -> None:
    params = m["params"]
    e2e_rate, kernel_rate = params / m["compress"], m["kernel_params"] / m["kernel"]
    print()
    print(f"pair: {m['size']} {args.dtype}, {params / 1e9:.2f} B params, inputs "
          f"{m['input_bytes'] / 1e9:.1f} GB; keep={args.keep}, -j {args.threads}; "
          f"diff {m['diff'] / 1e9:.2f} GB")
    rows = [
        ("compress (e2e)", m["compress"], e2e_rate, m["rss_c"]),
        ("kernel only", m["kernel"], kernel_rate, None),
        ("read both inputs once", m["floor"], params / m["floor"], None),
        ("rebuild", m["rebuild"], params / m["rebuild"], m["rss_r"]),
        ("verify --finetuned", m["verify"], params / m["verify"], m["rss_v"]),
        ("compress --keep 1", m["lossless"], params / m["lossless"], m["rss_l"]),
        ("compress --method delta", m["delta"], params / m["delta"], m["rss_d"]),
        ("copy base", m["copy"], params / m["copy"], None),
        ("slow reference (sample)", None, m["slow"], None),
    ]
    print(f"{'step':<26}{'seconds':>10}{'Mparam/s':>12}{'peak RSS':>12}")
    for label, secs, rate, rss in rows:
        s = f"{secs:10.1f}" if secs is not None else f"{'':>10}"
        r = f"{rss / 1e6:10.0f}MB" if rss is not None else f"{'':>12}"
        print(f"{label:<26}{s}{rate / 1e6:12.3f}{r}")
    if len(m["compress_runs"]) > 1:
        runs = lambda key: ", ".join(f"{t:.1f}" for t in m[key])
        print(f"(fastest of {len(m['compress_runs'])} runs; compress {runs('compress_runs')} s, "
              f"kernel only {runs('kernel_runs')} s, rebuild {runs('rebuild_runs')} s, "
              f"verify {runs('verify_runs')} s, keep 1 {runs('lossless_runs')} s, "
              f"delta {runs('delta_runs')} s, "
              f"copy {runs('copy_runs')} s, read floor {runs('floor_runs')} s)")
    print()
    print(f"compress rate / kernel-only rate : {e2e_rate / kernel_rate:.2f}   (target >= 0.80)")
    print(f"compress time / read floor       : {m['compress'] / m['floor']:.2f}")
    print(f"rebuild time / copy base         : {m['rebuild'] / m['copy']:.2f}   (target <= 1.5)")
    print(f"kernel speed-up over slow ref    : {kernel_rate / m['slow']:,.0f}x")
    print(f"peak RSS compress / rebuild      : {m['rss_c'] / 1e6:.0f} / {m['rss_r'] / 1e6:.0f} MB; "
          f"bound 3 x largest tensor (f32) + 300 MB = {m['bound'] / 1e9:.2f} GB")
    print(f"peak RSS verify / rebuild        : {m['rss_v'] / m['rss_r']:.3f}   (target <= 1.10)")
    print(f"keep 1 compress / read floor     : {m['lossless'] / m['floor']:.2f}   (target <= 2); "
          f"lossless diff {m['lossless_size'] / m['input_bytes'] * 2:.3f} of the fine-tune")
    print(f"delta compress / read floor      : {m['delta'] / m['floor']:.2f}   (target <= 2)")
    # Where the disk outruns the cores, the CPU work sets the pace, not the read: its
    # CPU-seconds over the cores used is the wall time the work needs with every core busy.
    cores = max(1, min(args.threads, os.cpu_count() or 1))
    for label, key, cpu in (("keep 1", "lossless", "cpu_l"), ("delta", "delta", "cpu_d")):
        print(f"{label + ' CPU / ' + str(cores) + ' cores':<33}: {m[cpu] / cores:.1f} s "
              f"({m[cpu]:.1f} CPU-s; wall {m[key]:.1f} s, read floor {m['floor']:.1f} s)")


def report_ray(m: dict, args) -> None:
    """Local and Ray runs side by side: wall time, peak memory, the overhead ratio."""
    r = m["ray"]
    print()
    print(f"local vs Ray (a local Ray instance, {os.cpu_count()} CPUs; Ray tasks of -j "
          f"{args.threads}; worker memory: each worker's peak, largest / sum over n):")
    print(f"{'step':<10}{'local s':>9}{'ray s':>9}{'ratio':>8}{'local RSS':>11}"
          f"{'ray driver':>12}{'ray workers':>22}")
    for key, local_s, local_rss in (("compress", m["compress"], m["rss_c"]),
                                    ("rebuild", m["rebuild"], m["rss_r"])):
        secs, driver, largest, total, n = r[key]
        workers = f"{largest / 1e6:.0f} / {total / 1e6:.0f} MB, {n}"
        print(f"{key:<10}{local_s:9.1f}{secs:9.1f}{secs / local_s:8.2f}"
              f"{local_rss / 1e6:9.0f}MB{driver / 1e6:10.0f}MB{workers:>22}")
    print(f"Ray outputs byte-identical to the local ones: {'yes' if r['identical'] else 'NO'}")
    print(f"overhead ratio (ray / local wall) compress / rebuild: "
          f"{r['compress'][0] / m['compress']:.2f} / {r['rebuild'][0] / m['rebuild']:.2f}"
          f"   (target <= 1.15)")


def compare(ms: list) -> None:
    """Peak memory of every size against the smallest's, measured in this one run."""
    first = ms[0]
    print()
    print(f"peak RSS against {first['size']} (target: within 15 %):")
    for m in ms[1:]:
        for key, what in (("rss_c", "compress"), ("rss_r", "rebuild"), ("rss_v", "verify"),
                          ("rss_l", "keep 1")):
            grow = m[key] / first[key] - 1
            print(f"  {what:<9} {m['size']}: {m[key] / 1e6:.0f} MB vs {first[key] / 1e6:.0f} MB "
                  f"({grow:+.1%}; {m['params'] / first['params']:.1f}x the parameters)")


def warm_numba(ks, warm: Path, dtype: str, keep: float, threads: int) -> None:
    """Run every timed command once on a tiny pair of the benchmark's dtype, so that no
    timed child compiles a kernel. numba compiles a kernel per dtype width and array
    flags: the demo this replaced (float32, ``ken``) left the bf16 coder, the ``delta``
    kernel and the decoder's 16-bit kernels to the first timed runs, and a fresh host's
    first 1B run measured keep 1 / read floor 2.60 where the next measured 0.96."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), str(warm),
                    "--params", "tiny", "--dtype", dtype, "--quiet", "--overwrite"], check=True)
    b, f = warm / "base", warm / "finetuned"
    for name, extra in (("diff", ["--keep", str(keep)]), ("keep1", ["--keep", "1"]),
                        ("delta", ["--keep", str(keep), "--method", "delta"])):
        subprocess.run(ks + ["compress", str(b), str(f), "-o", str(warm / name), "-j",
                             str(threads), "-q", "--overwrite", *extra], check=True)
    subprocess.run(ks + ["rebuild", str(b), str(warm / "diff"), "-o", str(warm / "rebuilt"),
                         "-q", "--overwrite"], check=True)
    subprocess.run(ks + ["verify", str(warm / "diff"), "--base", str(b), "--finetuned", str(f),
                         "-q"], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="1B",
                    help="pair size, or sizes separated by commas measured in one run (1B,7B)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--dir", default="/tmp/kenstream-bench",
                    help="work folder; each size's pair is made once under DIR/SIZE and reused")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("-j", "--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every timed step this many times, keep the fastest")
    ap.add_argument("--keep-files", action="store_true", help="leave diff and rebuild")
    ap.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="ray: also run compress and rebuild as Ray tasks, side by side")
    args = ap.parse_args(argv)
    ms = []
    if args.executor == "ray":
        from ray_head import RayHead  # tools/ is this script's folder

        head = RayHead(os.cpu_count(), timed_child)
    else:
        head = None
    try:
        for size in [s.strip() for s in args.params.split(",") if s.strip()]:
            ms.append(measure(size, args, head))
            report(ms[-1], args)
            if head is not None:
                report_ray(ms[-1], args)
    finally:
        if head is not None:
            head.close()
    if len(ms) > 1:
        compare(ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
