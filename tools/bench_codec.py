"""Codec benchmark: format 2's diff sizes and coding speed beside ZipNN and zstd, in one run.

    python tools/bench_codec.py [--real DIR] [--params 1B,7B] [--keeps 1,0.5,0.25,0.1]
        [--threads 2] [--repeat 2] [--sample N] [--dir /tmp/kenstream-codec]

For each pair (the real MiniLM drug-review pair of tools/quality, in float32 and cast to
bfloat16; and the synthetic Llama-shaped pairs of tools/make_checkpoint.py), over the
tensors the fine-tune shares with its base (same name after the prefix, same shape, float):

- diff bytes / fine-tune bytes of kenstream format 2 and format 1 at each keep fraction,
  from real ``kenstream.compress`` runs (the rule: KEN on the real pair; ``random`` on the
  synthetic ones, where KEN would take minutes a keep; the positions it keeps cost the same
  bits at the same fraction);
- format 2's coding speed at keep 1: every frame coded, then decoded, on ``--threads``
  threads (MB of fine-tune per second; the fastest of ``--repeat`` runs);
- ZipNN 0.5.4 (``pip install zipnn``: a benchmark-only dependency) of the fine-tune and of
  its delta (XOR against the base), sizes and speeds with the same threads;
- zstd -3 of the fine-tune's bytes.

Figures are ratios measured side by side; the host's speed moves the MB/s between runs.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kenstream  # noqa: E402
from kenstream import kernels  # noqa: E402
from kenstream.format import spec  # noqa: E402
from kenstream.format.v2 import FrameDecoder, encode_frame  # noqa: E402
from kenstream.io.checkpoint import Checkpoint  # noqa: E402
from kenstream.io.rows import TensorRows  # noqa: E402


def shared_tensors(base_dir: Path, ft_dir: Path, sample: int = 1) -> list:
    """(fine-tune name, base name, dtype) of every sample-th float tensor the two share."""
    with Checkpoint.open(str(base_dir)) as b, Checkpoint.open(str(ft_dir)) as f:
        from kenstream.engine.align import align

        pairs = align(f.names(), b.names()).pairs
        out = []
        for name, bname in pairs.items():
            fi, bi = f.info(name), b.info(bname)
            if fi.dtype in ("F32", "BF16", "F16") and tuple(fi.shape) == tuple(bi.shape):
                out.append((name, bname, fi.dtype))
    return out[::sample]


def diff_sizes(base_dir, ft_dir, names, keeps, method, work: Path) -> dict:
    """(format, keep) -> shared-tensor diff bytes / fine-tune bytes, from real diffs."""
    regex = "^(" + "|".join(__import__("re").escape(n) for n, _, _ in names) + ")$"
    out = {}
    for version in (2, 1):
        for keep in keeps:
            diff = work / f"diff-v{version}-{keep}"
            index = kenstream.compress(base_dir, ft_dir, diff, keep=keep, method=method,
                                       include=regex, format_version=version, quiet=True,
                                       overwrite=True)
            recs = [index["tensors"][n] for n, _, _ in names]
            ft_bytes = sum(r["rows"] * r["cols"] * (4 if r["dtype"] == "F32" else 2)
                           for r in recs)
            out[version, keep] = sum(r["nbytes"] for r in recs) / ft_bytes
            shutil.rmtree(diff)
    return out


def _frames(base_dir, ft_dir, names):
    """Yield (fine-tune rows, base rows, dtype) of every frame of the named tensors."""
    with Checkpoint.open(str(base_dir)) as b, Checkpoint.open(str(ft_dir)) as f:
        for name, bname, code in names:
            shape = f.info(name).shape
            rows, cols = spec.rows_cols_v2(name, shape)
            ft = TensorRows(f, name, rows, cols)
            base = TensorRows(b, bname, rows, cols, code)
            for r0, r1 in spec.frame_ranges(rows, cols, spec.DEFAULT_FRAME_ELEMS):
                yield np.ascontiguousarray(ft.raw(r0, r1)), np.ascontiguousarray(base.read(r0, r1)), code


def codec_speed(base_dir, ft_dir, names, threads, repeat) -> tuple:
    """(bytes coded, encode s, decode s, coded bytes) of every frame at keep 1, in memory."""
    frames = list(_frames(base_dir, ft_dir, names))
    raw = sum(ft.nbytes for ft, _, _ in frames)
    encode_s, decode_s, coded = [], [], None
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = list(pool.map(lambda job: encode_frame(job[0], job[1], None, job[2]), frames))
            encode_s.append(time.perf_counter() - t0)
            coded = out

            def decode(i):
                ft, base, code = frames[i]
                f = out[i]
                got = FrameDecoder(f.data, *ft.shape, code, f.kept, 0).values(base.reshape(-1))
                return np.array_equal(got.view(ft.dtype), ft.reshape(-1))

            t0 = time.perf_counter()
            ok = list(pool.map(decode, range(len(frames))))
            decode_s.append(time.perf_counter() - t0)
            if not all(ok):
                sys.exit("a decoded frame differs from the fine-tune")
    return raw, min(encode_s), min(decode_s), sum(len(f.data) for f in coded)


def zipnn_and_zstd(base_dir, ft_dir, names, threads, repeat) -> dict:
    """ZipNN plain and delta, and zstd -3, per tensor, summed: sizes and seconds."""
    import zstandard

    try:
        from zipnn import ZipNN
    except ImportError:
        sys.exit("the comparison needs ZipNN: pip install zipnn (a benchmark-only dependency)")
    result = {"zipnn": [0, 0.0, 0.0], "zipnn delta": [0, 0.0, 0.0], "zstd -3": [0, 0.0, 0.0]}
    with Checkpoint.open(str(base_dir)) as b, Checkpoint.open(str(ft_dir)) as f:
        for name, bname, code in names:
            ft = np.ascontiguousarray(f.array(name)).tobytes()
            base_arr = b.array(bname)
            if b.info(bname).dtype != code:
                base_arr = kenstream.dtypes.convert(base_arr, b.info(bname).dtype, code)
            base = np.ascontiguousarray(base_arr).tobytes()
            kind = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[code]
            for label in ("zipnn", "zipnn delta"):
                kw = dict(input_format="byte", bytearray_dtype=kind, threads=threads)
                delta = label.endswith("delta")
                if delta:
                    kw["delta_compressed_type"] = "byte"
                best_c = best_d = None
                for _ in range(repeat):
                    x, y = bytes(bytearray(ft)), bytes(bytearray(base))  # zipnn edits inputs
                    t0 = time.perf_counter()
                    blob = (ZipNN(**kw).compress(x, delta_second_data=y) if delta
                            else ZipNN(**kw).compress(x))
                    tc = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    back = (ZipNN(**kw).decompress(blob, delta_second_data=bytes(bytearray(base)))
                            if delta else ZipNN(**kw).decompress(blob))
                    td = time.perf_counter() - t0
                    if bytes(back) != ft:
                        sys.exit(f"ZipNN did not round-trip {name}")
                    best_c = tc if best_c is None else min(best_c, tc)
                    best_d = td if best_d is None else min(best_d, td)
                result[label][0] += len(blob)
                result[label][1] += best_c
                result[label][2] += best_d
            t0 = time.perf_counter()
            blob = zstandard.ZstdCompressor(level=3).compress(ft)
            result["zstd -3"][1] += time.perf_counter() - t0
            result["zstd -3"][0] += len(blob)
    return result


def real_pair(directory: Path, work: Path) -> dict:
    """{label: (base dir, fine-tune dir)} of the MiniLM pair in float32 and bfloat16."""
    if not (directory / "finetuned" / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "quality" / "finetune.py"), "--out",
                        str(directory)], check=True)
    pairs = {"MiniLM f32": (directory / "base", directory / "finetuned")}
    import torch

    sys.path.insert(0, str(ROOT / "tools" / "quality"))
    from harness import cast_pair  # the quality harness's bf16 pair, made the same way

    cast = cast_pair(directory, work / "minilm-bf16", torch.bfloat16)
    pairs["MiniLM bf16"] = (cast / "base", cast / "finetuned")
    return pairs


def synthetic_pair(size: str, pairs: Path) -> tuple:
    """The pair tools/bench_e2e.py makes (and reuses) for ``size``."""
    pair = pairs / size.lower() / "pair"
    if not (pair / "finetuned" / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), str(pair),
                        "--params", size, "--dtype", "bf16", "--quiet", "--overwrite"],
                       check=True)
    return pair / "base", pair / "finetuned"


def report(label, names, sizes, speed, others, keeps, threads) -> None:
    raw, enc, dec, coded = speed
    mb = raw / 1e6
    print(f"\n{label}: {len(names)} shared tensors, {raw / 1e6:.1f} MB of fine-tune; "
          f"{threads} threads")
    print(f"{'':<34}{'size / fine-tune':>18}{'encode MB/s':>13}{'decode MB/s':>13}")
    for keep in keeps:
        print(f"{f'kenstream format 2, keep {keep:g}':<34}{sizes[2, keep]:>18.4f}"
              + (f"{mb / enc:>13.0f}{mb / dec:>13.0f}" if keep == 1 else ""))
    for keep in keeps:
        print(f"{f'kenstream format 1, keep {keep:g}':<34}{sizes[1, keep]:>18.4f}")
    for name, (size, tc, td) in others.items():
        speeds = f"{mb / tc:>13.0f}" + (f"{mb / td:>13.0f}" if td else "")
        print(f"{name + ' of the fine-tune':<34}{size / raw:>18.4f}{speeds}")
    delta = others["zipnn delta"][0] / raw
    print(f"keep 1 against ZipNN delta: size {sizes[2, 1.0] / delta:.2f}x, encode speed "
          f"{(mb / enc) / (mb / others['zipnn delta'][1]):.2f}x")
    if 0.25 in keeps:
        print(f"keep 0.25 against format 1: {sizes[2, 0.25] / sizes[1, 0.25]:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", default="/tmp/kenstream-quality/pair",
                    help="folder of the tools/quality pair (made there if missing)")
    ap.add_argument("--no-real", action="store_true", help="skip the real pair")
    ap.add_argument("--params", default="", help="synthetic pairs to add, e.g. 1B,7B")
    ap.add_argument("--keeps", default="1,0.5,0.25,0.1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sample", type=int, default=1,
                    help="synthetic pairs: use every N-th tensor (sizes and speeds are ratios)")
    ap.add_argument("--dir", default="/tmp/kenstream-codec")
    ap.add_argument("--pairs", default="/tmp/kenstream-bench",
                    help="where the synthetic pairs are (shared with tools/bench_e2e.py)")
    args = ap.parse_args(argv)
    keeps = [float(k) for k in args.keeps.split(",")]
    if 1.0 not in keeps:
        keeps.insert(0, 1.0)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    pairs = {} if args.no_real else real_pair(Path(args.real), work)
    for size in filter(None, args.params.split(",")):
        pairs[f"synthetic {size} bf16"] = synthetic_pair(size, Path(args.pairs))
    with kernels.threads(args.threads):
        for label, (base, ft) in pairs.items():
            sample = 1 if label.startswith("MiniLM") else args.sample
            names = shared_tensors(base, ft, sample)
            method = "ken" if label.startswith("MiniLM") else "random"
            print(f"{label}: diff sizes ({method}) ...", flush=True)
            sizes = diff_sizes(base, ft, names, keeps, method, work)
            print(f"{label}: codec speed ...", flush=True)
            speed = codec_speed(base, ft, names, args.threads, args.repeat)
            print(f"{label}: ZipNN and zstd ...", flush=True)
            others = zipnn_and_zstd(base, ft, names, args.threads, args.repeat)
            report(label, names, sizes, speed, others, keeps, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
