"""Write a synthetic base / fine-tune checkpoint pair shaped like a Llama decoder.

    python tools/make_checkpoint.py OUT --params 7B --dtype bf16 --shard-size 5GB --seed 0

writes ``OUT/base/`` and ``OUT/finetuned/``, each laid out like a hub checkpoint:
``model-0000i-of-0000N.safetensors`` shards, ``model.safetensors.index.json`` and a
LlamaForCausalLM-like ``config.json``. Both hold the same names, shapes and dtype.

Values. Matrices: base ~ N(0, 0.02); norm vectors: base ~ 1 + N(0, 0.02). Fine-tune =
base + N(0, 1) * delta_std * s_row, where s_row = exp(z / 2) is a per-row log-normal
scale, 1 row in 64 is "hot" (s_row * 8) and 1 in 64 is frozen (s_row = 0, so the row is
bit-identical in both files); norm vectors use 5 x delta_std. Both are computed in float32
and only then rounded to the storage dtype, so the bf16 / f16 files are exactly the f32
files rounded (bf16: round to nearest even on the float32 bits, NaN -> 0x7FC0).

Determinism. Each tensor is cut into chunks of whole rows (about 2**20 elements; a 1-D
tensor is one row); chunk c of the t-th tensor draws from its own PCG64 stream keyed by
(seed, t, c). The bytes therefore depend on the seed, layout, dtype and delta_std only,
never on the thread count or the shard size.

Streaming. All shapes are known up front, so each shard's safetensors header is written
first and the tensor bytes follow chunk by chunk; a chunk's base and fine-tune bytes are
made together and each written once. Worker threads make chunks (numpy releases the GIL)
while the main thread writes them in order, holding a bounded window of chunks: memory
stays at a few tens of MB whatever the model size. Shards are written to ``*.partial``
and renamed when complete; the index is written last.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kenstream.errors import KenstreamError, OutputError, SelectionError

CHUNK_ELEMS = 1 << 20  # part of the byte-level spec: changing it changes every value
BASE_STD = 0.02
NORM_DELTA_FACTOR = 5.0
HOT_FRACTION = 1.0 / 64
FROZEN_FRACTION = 1.0 / 64
HOT_FACTOR = 8.0

# name: (safetensors tag, bytes per element, config torch_dtype)
DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "f16": ("F16", 2, "float16"), "f32": ("F32", 4, "float32")}


@dataclass(frozen=True)
class Layout:
    """A Llama decoder's sizes (multi-head attention, untied embeddings)."""

    hidden: int
    inter: int
    layers: int
    heads: int
    vocab: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in the order they are written."""
        h, i = self.hidden, self.inter
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
            out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h))]
            out += [(p + "mlp.down_proj.weight", (h, i))]
            out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def per_layer(self) -> int:
        return 4 * self.hidden**2 + 3 * self.hidden * self.inter + 2 * self.hidden

    @property
    def n_params(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden + self.layers * self.per_layer


PRESETS = {
    "tiny": Layout(hidden=64, inter=172, layers=2, heads=4, vocab=320),
    "1b": Layout(hidden=2048, inter=5504, layers=19, heads=32, vocab=32000),  # 1.09e9
    "7b": Layout(hidden=4096, inter=11008, layers=32, heads=32, vocab=32000),  # 6.74e9
}
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_params(text: str) -> Layout:
    """``tiny`` / ``1B`` / ``7B``, or a count like ``300M`` met by scaling the 1B layout's layers."""
    key = str(text).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmbgt]?)", key)
    if m is None:
        raise SelectionError(f"--params {text!r} is neither a preset nor a count",
                             hint="use tiny, 1B, 7B or a number such as 300M or 2.5B")
    target = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    base = PRESETS["1b"]
    layers = max(1, round((target - (base.n_params - base.layers * base.per_layer)) / base.per_layer))
    return Layout(base.hidden, base.inter, int(layers), base.heads, base.vocab)


def parse_size(text) -> int:
    """Bytes from ``5GB`` / ``500MB`` (decimal), ``1GiB`` (binary) or a plain integer."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([a-z]*)", str(text).strip().lower())
    unit = m.group(2).upper() if m else None
    if m is None or (unit and unit not in _SIZE_UNITS):
        raise SelectionError(f"--shard-size {text!r} is not a size", hint="use e.g. 5GB or 500MB")
    size = int(float(m.group(1)) * _SIZE_UNITS[unit or "B"])
    if size < 1:
        raise SelectionError(f"--shard-size {text!r} must be at least one byte")
    return size


def plan_shards(tensors, itemsize: int, shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in order: a shard takes tensors while it stays within ``shard_size``
    bytes of data; a tensor larger than that gets a shard of its own. Cost O(#tensors)."""
    shards, current, used = [], [], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * itemsize
        if current and used + nbytes > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append((name, shape))
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_header(entries, dtype: str) -> tuple[bytes, int]:
    """The 8-byte little-endian length plus JSON header of one shard, and its data size.

    Offsets are contiguous in ``entries`` order; the JSON is padded with spaces to a
    multiple of 8 bytes so the data that follows stays aligned."""
    tag, itemsize, _ = DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        end = offset + int(np.prod(shape)) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offset


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 array -> bfloat16 bit patterns (uint16, same shape).

    Round to nearest, ties to even, on the float32 bits: add 0x7FFF plus the lowest kept
    bit, keep the high half. Overflow rounds to +-inf as it should; NaN becomes the
    canonical 0x7FC0. Two uint32 temporaries of x's size; no float64. O(n)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    acc = bits >> 16
    acc &= 1
    acc += 0x7FFF
    acc += bits  # wraps only for negative NaNs, which are overwritten below
    acc >>= 16
    out = acc.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def encode(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> little-endian storage array of ``dtype`` (bf16 as uint16 bits)."""
    if dtype == "bf16":
        return round_bf16(x32).astype("<u2", copy=False)
    if dtype == "f16":
        return x32.astype("<f2")
    return x32.astype("<f4", copy=False)


def chunk_rows(shape) -> tuple[int, int, int]:
    """(rows, cols, rows per chunk) of a tensor viewed as a matrix (1-D: one row)."""
    rows, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], int(np.prod(shape[1:])))
    return rows, cols, max(1, CHUNK_ELEMS // cols)


def make_chunk(seed: int, tensor_index: int, chunk_index: int, rows: int, cols: int,
               is_norm: bool, delta_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Base and fine-tune float32 values of one chunk, both shape [rows, cols].

    Draw order (part of the spec): base normals, row log-normal z, row uniforms, delta
    normals. About 2 * rows * cols normal draws; peak memory 2 float32 chunks."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(tensor_index, chunk_index))))
    base = rng.standard_normal((rows, cols), dtype=np.float32)
    base *= BASE_STD
    if is_norm:
        base += 1.0
    scale = rng.standard_normal(rows, dtype=np.float32)
    scale *= 0.5
    np.exp(scale, out=scale)
    u = rng.random(rows, dtype=np.float32)
    scale[u < HOT_FRACTION] *= HOT_FACTOR
    scale[(u >= HOT_FRACTION) & (u < HOT_FRACTION + FROZEN_FRACTION)] = 0.0
    scale *= delta_std * (NORM_DELTA_FACTOR if is_norm else 1.0)
    ft = rng.standard_normal((rows, cols), dtype=np.float32)
    ft *= scale[:, None]
    ft += base
    return base, ft


def _chunk_bytes(job, seed, dtype, delta_std):
    t, c, n, cols, is_norm = job
    base, ft = make_chunk(seed, t, c, n, cols, is_norm, delta_std)
    return encode(base, dtype), encode(ft, dtype)


@dataclass
class PairInfo:
    """What ``make_pair`` wrote."""

    base: Path
    finetuned: Path
    layout: Layout
    n_params: int
    bytes_per_checkpoint: int
    n_shards: int
    seconds: float


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} "


def _config(layout: Layout, dtype: str, role: str, seed: int, delta_std: float) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": layout.hidden, "intermediate_size": layout.inter,
        "num_hidden_layers": layout.layers, "num_attention_heads": layout.heads,
        "num_key_value_heads": layout.heads, "vocab_size": layout.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_theta": 10000.0, "initializer_range": BASE_STD, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, "torch_dtype": DTYPES[dtype][2],
        "kenstream_synthetic": {"role": role, "seed": seed, "delta_std": delta_std},
    }


def _prepare_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise OutputError("exists and is not a directory", file=path)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputError("is not empty", file=path, hint="choose another OUT or pass --overwrite")
        # Only what this script writes: a stale shard with another -of-N must not linger.
        for old in [*path.glob("model-*-of-*.safetensors*"), path / "model.safetensors.index.json",
                    path / "config.json"]:
            if old.is_file():
                old.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot be created: {exc.strerror}", file=path) from exc


def _check_space(out: Path, need: int) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OutputError(f"needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free",
                          file=probe, hint="free some space or pick a smaller --params")


def make_pair(out_dir, params="1B", dtype="bf16", shard_size="5GB", seed=0, *,
              delta_std: float = 1e-3, threads: int | None = None, quiet: bool = False,
              overwrite: bool = False) -> PairInfo:
    """Write ``out_dir/base`` and ``out_dir/finetuned`` (see the module docstring).

    Cost: 2 normal draws per parameter (the bulk of the CPU time, split over ``threads``
    workers) and 2 x params x itemsize bytes written; memory O(threads x 2**20) elements."""
    if dtype not in DTYPES:
        raise SelectionError(f"unknown dtype {dtype!r}", hint="use bf16, f16 or f32")
    layout = params if isinstance(params, Layout) else parse_params(params)
    size_limit = parse_size(shard_size)
    seed = int(seed)
    if seed < 0:
        raise SelectionError(f"seed {seed} must be >= 0")
    if not (np.isfinite(delta_std) and delta_std >= 0):
        raise SelectionError(f"delta_std {delta_std} must be finite and >= 0")
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, int(threads or 1))
    out = Path(out_dir)
    itemsize = DTYPES[dtype][1]
    tensors = layout.tensors()
    shards = plan_shards(tensors, itemsize, size_limit)
    total = sum(int(np.prod(s)) for _, s in tensors) * itemsize
    dirs = {"base": out / "base", "finetuned": out / "finetuned"}
    n = len(shards)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    if not quiet:
        print(f"llama layout: hidden {layout.hidden}, intermediate {layout.inter}, "
              f"{layout.layers} layers, {layout.heads} heads, vocab {layout.vocab}")
        print(f"params: {layout.n_params:,} ({_human(layout.n_params)}); {dtype}: {total:,} bytes "
              f"per checkpoint in {n} shard(s), {_human(2 * total)}B for the pair")
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a directory", file=out)
    for d in dirs.values():
        _prepare_dir(d, overwrite)
    _check_space(out, 2 * total + (1 << 20))

    t0 = time.perf_counter()
    try:
        _stream(shards, names, list(dirs.values()), tensors, dtype, seed, delta_std, threads,
                total, quiet)
        for role, d in dirs.items():
            (d / "config.json").write_text(json.dumps(_config(layout, dtype, role, seed, delta_std), indent=2))
            # The index last: its presence marks a complete checkpoint.
            idx = {"metadata": {"total_size": total},
                   "weight_map": {name: names[k] for k, entries in enumerate(shards) for name, _ in entries}}
            (d / "index.partial").write_text(json.dumps(idx, indent=2))
            os.replace(d / "index.partial", d / "model.safetensors.index.json")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError("the disk is full", file=exc.filename or out) from exc
        raise
    return PairInfo(dirs["base"], dirs["finetuned"], layout, layout.n_params, total, n,
                    time.perf_counter() - t0)


def _stream(shards, names, dirs, tensors, dtype, seed, delta_std, threads, total, quiet) -> None:
    """Make every chunk on ``threads`` workers and write them in file order to the shard
    pair being filled (``dirs`` = [base, finetuned]); at most 2 * threads + 2 chunks wait."""
    from tqdm import tqdm

    position = {name: t for t, (name, _) in enumerate(tensors)}
    jobs = []  # (shard, tensor position, chunk index, rows, cols, is_norm), in file order
    for k, entries in enumerate(shards):
        for name, shape in entries:
            rows, cols, step = chunk_rows(shape)
            for c, r0 in enumerate(range(0, rows, step)):
                jobs.append((k, position[name], c, min(step, rows - r0), cols, len(shape) == 1))
    todo, pending, files, current = iter(jobs), deque(), [], -1
    bar = tqdm(total=2 * total, unit="B", unit_scale=True, unit_divisor=1000, disable=quiet,
               desc="writing pair", dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:

            def submit(job):
                if job is not None:
                    pending.append((job[0], pool.submit(_chunk_bytes, job[1:], seed, dtype, delta_std)))

            for job in itertools.islice(todo, 2 * threads + 2):
                submit(job)
            while pending:
                k, fut = pending.popleft()
                submit(next(todo, None))
                if k != current:
                    if files:
                        _finish(files, shards[current], dtype)
                    head = shard_header(shards[k], dtype)[0]
                    files = [open(str(d / (names[k] + ".partial")), "wb") for d in dirs]
                    for f in files:
                        f.write(head)
                    current = k
                for f, arr in zip(files, fut.result()):
                    f.write(memoryview(arr).cast("B"))
                    bar.update(arr.nbytes)
            if files:
                _finish(files, shards[current], dtype)
                files = []
    finally:
        bar.close()
        for f in files:  # only after a failure: drop the unfinished shard
            f.close()
            Path(f.name).unlink(missing_ok=True)


def _finish(files, entries, dtype) -> None:
    """Close a shard pair, check its size against its header, rename it into place."""
    head, data = shard_header(entries, dtype)
    for f in files:
        f.close()
        got = os.path.getsize(f.name)
        if got != len(head) + data:
            raise OutputError(f"wrote {got} bytes, expected {len(head) + data}", file=f.name)
        os.replace(f.name, f.name[: -len(".partial")])


def main(argv=None) -> int:
    """CLI entry: parse ``argv``, write the pair, print a summary; exit code 0 or the error's."""
    ap = argparse.ArgumentParser(prog="make_checkpoint.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output directory; base/ and finetuned/ are made inside")
    ap.add_argument("--params", default="1B", help="tiny, 1B, 7B, or a count such as 300M (default 1B)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--shard-size", default="5GB", help="max data bytes per shard, e.g. 5GB, 500MB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delta-std", type=float, default=1e-3, help="fine-tune perturbation std (default 1e-3)")
    ap.add_argument("--threads", type=int, default=None, help="generator threads (default: all cores)")
    ap.add_argument("--overwrite", action="store_true", help="replace a pair already in OUT")
    ap.add_argument("--quiet", action="store_true", help="no layout lines, no progress bar")
    ap.add_argument("--debug", action="store_true", help="show a traceback on error")
    args = ap.parse_args(argv)
    try:
        info = make_pair(args.out, args.params, args.dtype, args.shard_size, args.seed,
                         delta_std=args.delta_std, threads=args.threads, quiet=args.quiet,
                         overwrite=args.overwrite)
    except KenstreamError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    pair = 2 * info.bytes_per_checkpoint
    print(f"wrote {info.base} and {info.finetuned}: {info.n_params:,} params, "
          f"{info.bytes_per_checkpoint:,} bytes each, {info.n_shards} shard(s); "
          f"{info.seconds:.1f} s ({pair / 1e6 / max(info.seconds, 1e-9):.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
