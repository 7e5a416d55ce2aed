"""Quality harness: what pruning costs a real model, per selection rule and keep fraction.

    python tools/quality/harness.py --work /tmp/kq [--pair DIR] [--sizes 1/4,1/8,1/16,1/32]
        [--keeps 0.25,0.1] [--rules ken,delta,magnitude,random,delta:global] [--seeds 0]
        [--dtypes float32,bfloat16] [--results docs/results.md]
        [--plot docs/images/accuracy-bytes.png]

Uses the pair from ``finetune.py`` (made on first use): all-MiniLM-L6-v2 as the base and its
drug-review classifier fine-tune, as it is (float32) and cast to bfloat16. Every point is a
diff *size* (``--size``, a share of the fine-tune's bytes; or a keep fraction with
``--keeps``) for a rule (a method, with ``:tensor`` or ``:global`` for its budget), and is
reported against the diff's bytes: it runs the real CLI (``python -m kenstream compress``
then ``rebuild``), loads the rebuilt directory with
``AutoModelForSequenceClassification`` and scores the test split; it also measures the global
reconstruction error ``||rebuilt - ft|| / ||ft - base||`` over the pruned tensors from the files
themselves. The two ends are the full fine-tune and the all-base model (every aligned tensor
reset to the base, the new classifier head kept), and the lossless diff (keep 1) gives the
size at which nothing is lost. ``random`` runs once per seed; the table shows its mean and
spread. The table is printed and written between markers in ``--results``, and accuracy
against diff bytes is drawn, one panel a dtype, into ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import finetune  # noqa: E402  (tools/quality is not a package on the path)

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load_model_dir(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(path / f)))
        return out
    return load_file(str(path / "model.safetensors"))


def aligned_base(base: dict, name: str):
    """The base tensor for fine-tune name ``name`` (the fine-tune adds a ``bert.`` prefix)."""
    return base.get(name[len("bert."):] if name.startswith("bert.") else name)


def reconstruction_error(rebuilt: dict, ft: dict, base: dict) -> float:
    num = den = 0.0
    for name, t in ft.items():
        b = aligned_base(base, name)
        if b is None or b.shape != t.shape or not t.is_floating_point():
            continue
        f64, b64, r64 = t.double(), b.to(t.dtype).double(), rebuilt[name].double()
        num += float(((r64 - f64) ** 2).sum())
        den += float(((f64 - b64) ** 2).sum())
    return (num / den) ** 0.5 if den else 0.0


def write_all_base(ft_dir: Path, base: dict, ft: dict, out: Path) -> None:
    """The fine-tune with every tensor the base also has reset to the base (head kept)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in ft.items():
        b = aligned_base(base, name)
        state[name] = (b.to(t.dtype) if b is not None and b.shape == t.shape else t).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ft_dir.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copyfile(f, out / f.name)


def score(model_dir: Path, split, reference=None) -> dict:
    """Accuracy, mean cross-entropy, and agreement with ``reference`` logits (the fine-tune)."""
    logits, labels = finetune.predict(model_dir, split)
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    pred = logits.argmax(axis=1)
    out = {"accuracy": float((pred == labels).mean()),
           "loss": float(-logp[np.arange(len(labels)), labels].mean()), "logits": logits}
    if reference is not None:
        out["agreement"] = float((pred == reference.argmax(axis=1)).mean())
    return out


def kenstream(*args) -> None:
    subprocess.run([sys.executable, "-m", "kenstream", *map(str, args), "-q"], check=True,
                   stdout=subprocess.DEVNULL)


def parse_rule(text: str) -> tuple:
    """``delta`` -> ("delta", "row"); ``delta:global`` -> ("delta", "global")."""
    method, _, budget = text.partition(":")
    return method, budget or "row"


def label(method: str, budget: str) -> str:
    return method if budget == "row" else f"{method} --budget {budget}"


def run_one(pair: Path, work: Path, method: str, budget: str, seed: int, split, ft, base,
            ref, *, keep=None, size=None) -> dict:
    """Compress at ``keep`` or at ``size`` (a --size value), rebuild, score."""
    diff, rebuilt = work / "runs" / "diff", work / "runs" / "rebuilt"
    t0 = time.perf_counter()
    what = ["--keep", keep] if keep is not None else ["--size", size]
    kenstream("compress", pair / "base", pair / "finetuned", "-o", diff, *what, "--method",
              method, "--budget", budget, "--seed", seed, "--overwrite")
    kenstream("rebuild", pair / "base", diff, "-o", rebuilt, "--overwrite")
    seconds = time.perf_counter() - t0
    sc = score(rebuilt, split, ref)
    err = reconstruction_error(load_model_dir(rebuilt), ft, base)
    index = json.loads((diff / "kenstream-diff.json").read_text())
    size_bytes = sum(p.stat().st_size for p in diff.glob("*.kdiff"))
    return {"method": method, "budget": budget, "asked": size if size is not None else keep,
            "keep": index["selection"]["keep"], "seed": seed, "accuracy": sc["accuracy"],
            "loss": sc["loss"], "agreement": sc["agreement"], "rel_error": err,
            "diff_bytes": size_bytes, "finetuned_bytes": index["totals"]["finetuned_bytes"],
            "seconds": seconds}


def table(results: dict) -> str:
    """One table for every dtype: each point against its diff bytes."""
    lines = ["| pair | rule | asked | keep chosen | diff MB | share of fine-tune bytes "
             "| test accuracy | vs full (points) | agreement | test loss | rel. error |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for dtype, res in results.items():
        full, allb, lossless = res["ends"]["full"], res["ends"]["all_base"], res["lossless"]
        ftb = lossless["finetuned_bytes"]
        lines.append(f"| {dtype} | full fine-tune | | 1 | {ftb / 1e6:.1f} | 1.000 | "
                     f"{full['accuracy']:.3f} | 0.0 | 1.000 | {full['loss']:.3f} | 0.000 |")
        lines.append(f"| {dtype} | lossless diff (keep 1) | | 1 | "
                     f"{lossless['diff_bytes'] / 1e6:.1f} | {lossless['diff_bytes'] / ftb:.3f} | "
                     f"{lossless['accuracy']:.3f} | "
                     f"{100 * (lossless['accuracy'] - full['accuracy']):+.1f} | "
                     f"{lossless['agreement']:.3f} | {lossless['loss']:.3f} | "
                     f"{lossless['rel_error']:.3f} |")
        groups = {}
        for r in res["rows"]:
            groups.setdefault((r["method"], r["budget"], str(r["asked"])), []).append(r)
        for (method, budget, asked), g in sorted(
                groups.items(), key=lambda kv: (-statistics.mean(r["diff_bytes"]
                                                                 for r in kv[1]), kv[0])):
            acc = statistics.mean(r["accuracy"] for r in g)
            spread = (f" ± {statistics.pstdev([r['accuracy'] for r in g]):.3f} ({len(g)} seeds)"
                      if len(g) > 1 else "")
            mb = statistics.mean(r["diff_bytes"] for r in g)
            lines.append(
                f"| {dtype} | {label(method, budget)} | {asked} | "
                f"{statistics.mean(r['keep'] for r in g):.4f} | {mb / 1e6:.2f} | {mb / ftb:.4f} "
                f"| {acc:.3f}{spread} | {100 * (acc - full['accuracy']):+.1f} | "
                f"{statistics.mean(r['agreement'] for r in g):.3f} | "
                f"{statistics.mean(r['loss'] for r in g):.3f} | "
                f"{statistics.mean(r['rel_error'] for r in g):.3f} |")
        lines.append(f"| {dtype} | all-base (head kept) | | 0 | | | {allb['accuracy']:.3f} | "
                     f"{100 * (allb['accuracy'] - full['accuracy']):+.1f} | "
                     f"{allb['agreement']:.3f} | {allb['loss']:.3f} | 1.000 |")
    return "\n".join(lines)


def plot(results: dict, path: Path, majority: float | None) -> None:
    """Accuracy against diff bytes (as a share of the fine-tune's), one panel a dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), sharey=True,
                             squeeze=False)
    for ax, (dtype, res) in zip(axes[0], results.items()):
        full, lossless = res["ends"]["full"]["accuracy"], res["lossless"]
        ftb = lossless["finetuned_bytes"]
        series = {}
        for r in res["rows"]:
            series.setdefault(label(r["method"], r["budget"]), {}).setdefault(
                str(r["asked"]), []).append(r)
        for name, points in series.items():
            xy = sorted((statistics.mean(r["diff_bytes"] for r in g) / ftb,
                         statistics.mean(r["accuracy"] for r in g)) for g in points.values())
            ax.plot(*zip(*xy), marker="o", label=name)
        ax.axhspan(full - 0.01, full + 0.01, color="0.9", zorder=0)
        ax.axhline(full, color="k", lw=1, label=f"full fine-tune ({full:.3f}) ± 1 point")
        if majority is not None:
            ax.axhline(majority, color="0.5", ls=":", lw=1, label=f"majority class ({majority:.3f})")
        ax.plot([lossless["diff_bytes"] / ftb], [lossless["accuracy"]], marker="*", ms=14,
                color="k", ls="none", label="lossless diff (keep 1)")
        for share, name in ((1 / 8, "1/8"), (1 / 16, "1/16")):
            ax.axvline(share, color="0.6", ls="--", lw=0.8)
            ax.annotate(f"{name} of the bytes", (share, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=7, color="0.4")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("diff bytes / fine-tune bytes")
        ax.set_title(f"all-MiniLM-L6-v2 drug-review fine-tune, {dtype}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def cast_pair(pair: Path, out: Path, dtype) -> Path:
    """``pair``'s base and fine-tune with every float tensor cast to ``dtype``."""
    for side in ("base", "finetuned"):
        dst = out / side
        if (dst / "model.safetensors").exists():
            continue
        dst.mkdir(parents=True, exist_ok=True)
        state = {n: (t.to(dtype) if t.is_floating_point() else t).contiguous()
                 for n, t in load_model_dir(pair / side).items()}
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
        for f in (pair / side).iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json")):
                shutil.copyfile(f, dst / f.name)
    return out


def measure(pair: Path, work: Path, split, args) -> dict:
    """Every point on one pair: the two ends, the lossless diff, each rule at each size."""
    ft, base = load_model_dir(pair / "finetuned"), load_model_dir(pair / "base")
    write_all_base(pair / "finetuned", base, ft, work / "runs" / "allbase")
    full = score(pair / "finetuned", split)
    ref = full.pop("logits")
    allb = score(work / "runs" / "allbase", split, ref)
    allb.pop("logits")
    print(f"{pair}: full fine-tune acc {full['accuracy']:.3f}   all-base acc "
          f"{allb['accuracy']:.3f}", flush=True)
    lossless = run_one(pair, work, "delta", "row", 0, split, ft, base, ref, keep=1)
    print(f"lossless diff: {lossless['diff_bytes'] / 1e6:.2f} MB, acc "
          f"{lossless['accuracy']:.3f}", flush=True)
    rows = []
    points = [("size", s) for s in args.sizes.split(",") if s] + \
             [("keep", float(k)) for k in args.keeps.split(",") if k]
    for kind, value in points:
        for rule in args.rules.split(","):
            method, budget = parse_rule(rule)
            seeds = [int(x) for x in args.seeds.split(",")] if method == "random" else [0]
            for seed in seeds:
                what = ({"size": f"{100 * float(Fraction(value)):.6g}%"} if kind == "size"
                        else {"keep": value})  # a size as asked: "1/8" of the bytes
                try:
                    r = run_one(pair, work, method, budget, seed, split, ft, base, ref, **what)
                except subprocess.CalledProcessError as exc:  # one point, not the whole run
                    print(f"{label(method, budget)} {kind} {value}: failed ({exc})", flush=True)
                    continue
                r["asked"] = value
                rows.append(r)
                print(f"{label(method, budget):>24} {kind} {value} seed={seed}: keep "
                      f"{r['keep']:.4f} {r['diff_bytes'] / 1e6:.2f} MB acc {r['accuracy']:.3f} "
                      f"agree {r['agreement']:.3f} loss {r['loss']:.3f} "
                      f"err {r['rel_error']:.3f} ({r['seconds']:.0f} s)", flush=True)
    return {"ends": {"full": full, "all_base": allb}, "lossless": lossless, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kenstream-quality"))
    ap.add_argument("--pair", type=Path,
                    help="folder with base/, finetuned/ and split.json (default: --work; "
                         "made there by finetune.py when absent)")
    ap.add_argument("--sizes", default="1/4,1/8,1/16,1/32",
                    help="diff sizes as shares of the fine-tune's bytes (--size)")
    ap.add_argument("--keeps", default="", help="keep fractions too (--keep), e.g. 0.25,0.1")
    ap.add_argument("--rules", default="ken,delta,magnitude,random,delta:global",
                    help="methods, each with an optional :budget")
    ap.add_argument("--seeds", default="0", help="seeds for the random method")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="the pair as it is (float32) and cast to bfloat16")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "accuracy-bytes.png")
    args = ap.parse_args(argv)

    work = args.work
    pair = args.pair or work
    if not (pair / "split.json").exists():
        print(f"fine-tuning into {pair} ...", flush=True)
        finetune.finetune(pair, epochs=args.epochs)
    split = json.loads((pair / "split.json").read_text())
    results = {}
    for dtype in args.dtypes.split(","):
        if dtype == "float32":
            results[dtype] = measure(pair, work / dtype, split, args)
        else:
            cast = cast_pair(pair, work / f"{dtype}-pair", getattr(torch, dtype))
            results[dtype] = measure(cast, work / dtype, split, args)
        for res in results.values():
            for end in res["ends"].values():
                end.pop("logits", None)
        (work / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    print(text)
    plot(results, args.plot, split.get("accuracy", {}).get("majority_class"))
    print(f"plot written to {args.plot}")
    if args.results.exists():
        doc = args.results.read_text()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            args.results.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
            print(f"table written into {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
