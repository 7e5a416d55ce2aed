"""Quality harness: what pruning costs a real model, per selection rule and keep fraction.

    python tools/quality/harness.py --work /tmp/kq [--keeps 0.75,0.5,0.25,0.1,0.05]
        [--methods ken,delta,magnitude,random] [--seeds 0,1,2] [--results docs/results.md]

Uses the pair from ``finetune.py`` (made on first use): all-MiniLM-L6-v2 as the base and its
drug-review classifier fine-tune. For every method and keep fraction it runs the real CLI
(``python -m kenstream compress`` then ``rebuild``), loads the rebuilt directory with
``AutoModelForSequenceClassification`` and scores the test split; it also measures the global
reconstruction error ``||rebuilt - ft|| / ||ft - base||`` over the pruned tensors from the files
themselves. The two ends are the full fine-tune and the all-base model (every aligned tensor
reset to the base, the new classifier head kept). ``random`` runs once per seed; the table shows
its mean and spread. The table is printed and written between markers in ``--results``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
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
    subprocess.run([sys.executable, "-m", "kenstream", *map(str, args), "-q"], check=True)


def run_one(work: Path, method: str, keep: float, seed: int, split, ft, base, ref) -> dict:
    base_dir, ft_dir = work / "base", work / "finetuned"
    diff, rebuilt = work / "runs" / "diff", work / "runs" / "rebuilt"
    t0 = time.perf_counter()
    kenstream("compress", base_dir, ft_dir, "-o", diff, "--keep", keep, "--method", method,
              "--seed", seed, "--overwrite")
    kenstream("rebuild", base_dir, diff, "-o", rebuilt, "--overwrite")
    seconds = time.perf_counter() - t0
    sc = score(rebuilt, split, ref)
    err = reconstruction_error(load_model_dir(rebuilt), ft, base)
    size = sum(p.stat().st_size for p in diff.glob("*.kdiff"))
    return {"method": method, "keep": keep, "seed": seed, "accuracy": sc["accuracy"],
            "loss": sc["loss"], "agreement": sc["agreement"], "rel_error": err,
            "diff_bytes": size, "seconds": seconds}


def table(rows, ends) -> str:
    lines = ["| method | keep | reset | test accuracy | agreement with fine-tune | test loss "
             "| rel. reconstruction error | diff MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    full, allb = ends["full"], ends["all_base"]
    lines.append(f"| full fine-tune | 1.00 | 0% | {full['accuracy']:.3f} | 1.000 | "
                 f"{full['loss']:.3f} | 0.000 | |")
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["keep"]), []).append(r)
    order = sorted(groups, key=lambda mk: (-mk[1], ["ken", "delta", "magnitude", "random"].index(mk[0])
                                           if mk[0] in ("ken", "delta", "magnitude", "random") else 9))
    for method, keep in order:
        g = groups[(method, keep)]
        accs = [r["accuracy"] for r in g]
        errs = [r["rel_error"] for r in g]
        if len(g) > 1:
            acc = (f"{statistics.mean(accs):.3f} ± {statistics.pstdev(accs):.3f} "
                   f"({min(accs):.3f}-{max(accs):.3f}, {len(g)} seeds)")
            err = f"{statistics.mean(errs):.3f}"
        else:
            acc, err = f"{accs[0]:.3f}", f"{errs[0]:.3f}"
        mb = statistics.mean(r["diff_bytes"] for r in g) / 1e6
        agree = statistics.mean(r["agreement"] for r in g)
        loss = statistics.mean(r["loss"] for r in g)
        lines.append(f"| {method} | {keep:.2f} | {1 - keep:.0%} | {acc} | {agree:.3f} | "
                     f"{loss:.3f} | {err} | {mb:.1f} |")
    lines.append(f"| all-base (head kept) | 0.00 | 100% | {allb['accuracy']:.3f} | "
                 f"{allb['agreement']:.3f} | {allb['loss']:.3f} | 1.000 | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kenstream-quality"))
    ap.add_argument("--keeps", default="0.75,0.5,0.25,0.1,0.05")
    ap.add_argument("--methods", default="ken,delta,magnitude,random")
    ap.add_argument("--seeds", default="0,1,2", help="seeds for the random method")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args(argv)

    work = args.work
    if not (work / "split.json").exists():
        print(f"fine-tuning into {work} ...", flush=True)
        finetune.finetune(work, epochs=args.epochs)
    split = json.loads((work / "split.json").read_text())
    ft = load_model_dir(work / "finetuned")
    base = load_model_dir(work / "base")
    write_all_base(work / "finetuned", base, ft, work / "runs" / "allbase")
    full = score(work / "finetuned", split)
    ref = full.pop("logits")
    allb = score(work / "runs" / "allbase", split, ref)
    allb.pop("logits")
    ends = {"full": full, "all_base": allb}
    print(f"full fine-tune acc {full['accuracy']:.3f}   all-base acc {allb['accuracy']:.3f}",
          flush=True)
    rows = []
    for keep in [float(x) for x in args.keeps.split(",")]:
        for method in args.methods.split(","):
            seeds = [int(s) for s in args.seeds.split(",")] if method == "random" else [0]
            for seed in seeds:
                r = run_one(work, method, keep, seed, split, ft, base, ref)
                rows.append(r)
                print(f"{method:>9} keep={keep:.2f} seed={seed}: acc {r['accuracy']:.3f}  "
                      f"agree {r['agreement']:.3f}  loss {r['loss']:.3f}  "
                      f"err {r['rel_error']:.3f}  {r['diff_bytes'] / 1e6:.1f} MB  "
                      f"({r['seconds']:.0f} s)", flush=True)
    text = table(rows, ends)
    print(text)
    (work / "results.json").write_text(json.dumps({"ends": ends, "rows": rows}, indent=2))
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
