"""Verify a diff against its inputs, and summarise what a diff holds."""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import numpy as np

from . import dtypes, format as fmt
from .diff import DiffReader
from .errors import VerifyError
from .io.checkpoint import Checkpoint
from .progress import bar
from .rebuilder import rebuilt_tensor

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(name: str) -> str:
    """The first number between dots in a tensor name (its block), or ``'other'``."""
    m = _LAYER.search(name)
    return m.group(1) if m else "other"


def _bits(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.dtype(f"u{a.itemsize}")) if a.size else a.reshape(-1)


def verify(diff, base, finetuned=None, *, force=False, quiet=False) -> dict:
    """Check shard hashes and the base's identity; with ``finetuned``, every kept value.

    Returns ``{"ok", "problems", "tensors": {name: {"kept_fraction", "rel_error"}}}`` and
    raises VerifyError (exit 1) listing the first problem when anything mismatches.
    """
    problems, tensors = [], OrderedDict()
    with DiffReader(diff) as d, Checkpoint.open(str(base)) as b:
        d.check_hashes()
        d.check_base(b, force=force)
        ft = Checkpoint.open(str(finetuned)) if finetuned is not None else None
        try:
            total = sum(r["rows"] * r["cols"] for r in d.records.values())
            with bar(total if ft else 0, "verify", quiet or ft is None) as progress:
                for name, rec in d.records.items():
                    arr = rebuilt_tensor(name, rec, d, b)
                    n = max(1, rec["rows"] * rec["cols"])
                    row = {"encoding": rec["encoding"],
                           "kept_fraction": rec["kept"] / n if rec["encoding"] != "unchanged" else 0.0}
                    if ft is not None:
                        if name not in ft.names():
                            problems.append(f"{name}: not in the fine-tune")
                        else:
                            row.update(_compare(name, rec, arr, d.entries(name), ft, b, problems))
                        ft.release(name)
                        progress.update(rec["rows"] * rec["cols"])
                    tensors[name] = row
                    d.release(name)
                    if rec.get("base_name"):
                        b.release(rec["base_name"])
        finally:
            if ft is not None:
                ft.close()
    report = {"ok": not problems, "problems": problems, "tensors": tensors}
    if problems:
        err = VerifyError(f"{len(problems)} mismatch(es); first: {problems[0]}", file=diff)
        err.report = report
        raise err
    return report


def _compare(name, rec, rebuilt, entries, ft, base, problems) -> dict:
    """Kept positions equal the fine-tune and the rest equal the base, bit for bit."""
    info = ft.info(name)
    if list(info.shape) != list(rec["shape"]) or info.dtype != rec["dtype"]:
        problems.append(f"{name}: fine-tune has {info.dtype}{list(info.shape)}, diff has "
                        f"{rec['dtype']}{rec['shape']}")
        return {}
    shape = (rec["rows"], rec["cols"])
    out = _bits(rebuilt).reshape(shape)
    ft_arr = ft.array(name).reshape(shape)
    kept = fmt.kept_rows(rec, entries, 0, rec["rows"])
    if not np.array_equal(out[kept], _bits(np.ascontiguousarray(ft_arr)).reshape(shape)[kept]):
        problems.append(f"{name}: a kept value differs from the fine-tune")
    base_arr = _base_as(rec, base)
    if base_arr is not None:
        base_bits = _bits(np.ascontiguousarray(base_arr)).reshape(shape)
        if not np.array_equal(out[~kept], base_bits[~kept]):
            problems.append(f"{name}: a reset value differs from the base")
    if rec["encoding"] == "unchanged" and not np.array_equal(
            out, _bits(np.ascontiguousarray(ft_arr)).reshape(shape)):
        problems.append(f"{name}: recorded unchanged but the fine-tune differs from the base")
    if base_arr is None:
        return {"rel_error": 0.0}
    ftf = _as_f64(ft_arr, rec["dtype"])
    outf = _as_f64(rebuilt.reshape(shape), rec["dtype"])
    basef = _as_f64(base_arr, rec["dtype"])
    change = float(np.linalg.norm(ftf - basef))
    err = float(np.linalg.norm(outf - ftf))
    return {"rel_error": err / change if change > 0 else (0.0 if err == 0 else math.inf)}


def _as_f64(arr, code) -> np.ndarray:
    """Values of ``arr`` (storage dtype of ``code``) as float64, for error norms."""
    arr = np.ascontiguousarray(arr)
    if code == "F64" or not dtypes.is_float(code):
        return arr.astype(np.float64)
    return dtypes.widen_to_f32(arr, code).astype(np.float64)


def _base_as(rec, base):
    if rec.get("base_name") is None:
        return None
    binfo = base.info(rec["base_name"])
    arr = base.array(rec["base_name"])
    if binfo.dtype != rec["dtype"]:
        arr = dtypes.convert(arr, binfo.dtype, rec["dtype"])
    return arr.reshape(rec["rows"], rec["cols"])


def info(diff) -> dict:
    """Totals and per-layer breakdown of a diff, from its index alone (no shard is read)."""
    with DiffReader(diff) as d:
        idx = d.index
        layers = OrderedDict()
        rows = []
        for name, rec in d.records.items():
            n = rec["rows"] * rec["cols"]
            selected = rec["encoding"] in ("bitmask", "indices")
            kept = rec["kept"] if rec["encoding"] != "unchanged" else 0
            rows.append({"name": name, "encoding": rec["encoding"], "reason": rec.get("reason"),
                         "shape": rec["shape"], "dtype": rec["dtype"], "params": n,
                         "kept": kept, "bytes": rec.get("nbytes", 0)})
            layer = layers.setdefault(layer_of(name), {"params": 0, "selected": 0, "kept": 0,
                                                       "bytes": 0})
            layer["params"] += n
            layer["bytes"] += rec.get("nbytes", 0)
            if selected:
                layer["selected"] += n
                layer["kept"] += rec["kept"]
        totals = dict(idx.get("totals", {}))
        selected = totals.get("selected", 0)
        totals["reset_percent"] = 100.0 * totals.get("reset", 0) / selected if selected else 0.0
        ftb = totals.get("finetuned_bytes", 0)
        totals["diff_to_finetuned"] = totals.get("diff_bytes", 0) / ftb if ftb else 0.0
        return {"path": str(d.path), "selection": idx["selection"],
                "base": idx["base"].get("source"), "finetuned": (idx.get("finetuned") or {}).get("source"),
                "alignment": idx.get("alignment"), "totals": totals, "layers": layers,
                "tensors": rows}
