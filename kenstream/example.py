"""The built-in example: a small BERT-shaped base / fine-tune pair, and the demo that runs
compress, info, rebuild and verify on it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .text import printable

BERT_SMALL = dict(vocab=2000, hidden=128, inter=512, layers=4, positions=128, labels=3)


def bert_tensors(cfg=BERT_SMALL, seed=0) -> dict:
    """A BertModel-like state dict (float32, plus the int position_ids buffer)."""
    rng = np.random.default_rng(seed)
    h, i = cfg["hidden"], cfg["inter"]

    def w(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    t = {
        "embeddings.word_embeddings.weight": w(cfg["vocab"], h),
        "embeddings.position_embeddings.weight": w(cfg["positions"], h),
        "embeddings.token_type_embeddings.weight": w(2, h),
        "embeddings.LayerNorm.weight": np.ones(h, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(h, np.float32),
        "embeddings.position_ids": np.arange(cfg["positions"], dtype=np.int64)[None, :],
    }
    for n in range(cfg["layers"]):
        p = f"encoder.layer.{n}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            t[p + part + ".weight"] = w(h, h)
            t[p + part + ".bias"] = w(h)
        t[p + "attention.output.LayerNorm.weight"] = np.ones(h, np.float32)
        t[p + "attention.output.LayerNorm.bias"] = np.zeros(h, np.float32)
        t[p + "intermediate.dense.weight"] = w(i, h)
        t[p + "intermediate.dense.bias"] = w(i)
        t[p + "output.dense.weight"] = w(h, i)
        t[p + "output.dense.bias"] = w(h)
        t[p + "output.LayerNorm.weight"] = np.ones(h, np.float32)
        t[p + "output.LayerNorm.bias"] = np.zeros(h, np.float32)
    t["pooler.dense.weight"] = w(h, h)
    t["pooler.dense.bias"] = w(h)
    return t


def finetune_of(base: dict, cfg=BERT_SMALL, seed=1) -> dict:
    """A BertForSequenceClassification-like fine-tune: ``bert.`` prefix, a new head, small
    changes to float weights; the position_ids buffer and embedding LayerNorm stay equal."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, arr in base.items():
        if arr.dtype == np.float32 and "embeddings.LayerNorm" not in name:
            arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(2e-3)
        out["bert." + name] = arr
    out["classifier.weight"] = rng.standard_normal((cfg["labels"], cfg["hidden"]),
                                                   dtype=np.float32) * np.float32(0.02)
    out["classifier.bias"] = np.zeros(cfg["labels"], np.float32)
    return out


def write_pair(directory, cfg=BERT_SMALL) -> tuple:
    """Write ``directory/base`` and ``directory/finetuned`` (model.safetensors + config.json)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    base = bert_tensors(cfg)
    ft = finetune_of(base, cfg)
    config = {"architectures": ["BertModel"], "model_type": "bert",
              "hidden_size": cfg["hidden"], "intermediate_size": cfg["inter"],
              "num_hidden_layers": cfg["layers"], "num_attention_heads": 4,
              "vocab_size": cfg["vocab"], "max_position_embeddings": cfg["positions"],
              "type_vocab_size": 2}
    for sub, tensors, arch in (("base", base, "BertModel"),
                               ("finetuned", ft, "BertForSequenceClassification")):
        d = directory / sub
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(dict(config, architectures=[arch]), indent=2))
    return directory / "base", directory / "finetuned"


def run_demo(directory, *, keep=0.5, quiet=False) -> int:
    """Generate the example pair and run the whole tool on it, saying what happens."""
    from .io.outputs import claim_output
    from .settings import Settings

    Settings(keep=keep)  # a bad --keep is refused before the example is written
    directory = Path(directory)
    # The folder must be new, empty, or a previous demo (its marker lists the pair's files):
    # the demo never replaces files it did not write.
    pair = [f"{sub}/{name}" for sub in ("base", "finetuned")
            for name in ("model.safetensors", "config.json")]
    with claim_output(directory, inputs=[], resume=False, overwrite=True, plan="", index="",
                      files=pair):
        return _demo(directory, keep, quiet)


def _demo(directory: Path, keep, quiet) -> int:
    import kenstream as ks
    from .reports import print_info

    def step(text: str) -> None:  # -q: only the result line
        if not quiet:
            print(text)

    step(f"1. writing a small BERT-shaped base / fine-tune pair under {printable(directory)}/")
    base, ft = write_pair(directory)
    diff, rebuilt = directory / "diff", directory / "rebuilt"
    step(f"2. compress: keep {keep:.0%} of every row of every changed matrix (KEN rule)")
    t0 = time.perf_counter()
    ks.compress(base, ft, diff, keep=keep, overwrite=True, quiet=quiet,
                command=["kenstream", "compress", str(base), str(ft), "-o", str(diff),
                         "--keep", str(keep)])
    step(f"   done in {time.perf_counter() - t0:.1f} s")
    step("3. info:")
    if not quiet:
        print_info(ks.info(diff))
    step(f"4. rebuild: base + diff -> {printable(rebuilt)}/ (a standard model directory)")
    ks.rebuild(base, diff, rebuilt, overwrite=True, quiet=quiet)
    step("5. verify: hashes, base identity, and every kept value against the fine-tune")
    report = ks.verify(diff, base, ft, quiet=quiet)
    worst = max((r.get("rel_error") or 0.0 for r in report["tensors"].values()), default=0.0)
    print(f"{'' if quiet else '   '}OK: {len(report['tensors'])} tensors checked bit for bit; "
          f"largest relative reconstruction error ||rebuilt - ft|| / ||ft - base|| = "
          f"{worst:.3f}")
    step(printable(f"Try: kenstream info {diff}    kenstream verify {base} {diff} "
                   f"--finetuned {ft}"))
    return 0
