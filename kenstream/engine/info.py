"""Summarise what a diff holds, from its index alone (no shard is read)."""

from __future__ import annotations

import re
from collections import OrderedDict

from ..io.diff_reader import DiffReader

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(name: str) -> str:
    """The first number between dots in a tensor name (its block), or ``'other'``."""
    m = _LAYER.search(name)
    return m.group(1) if m else "other"


def info(diff) -> dict:
    """Totals, per-layer and per-tensor breakdown of a diff. Cost O(number of tensors)."""
    with DiffReader(diff) as d:
        idx = d.index
        layers = OrderedDict()
        rows = []
        for name, rec in d.records.items():
            kept = rec.kept if rec.encoding != "unchanged" else 0
            rows.append({"name": name, "encoding": rec.encoding, "reason": rec.reason,
                         "shape": list(rec.shape), "dtype": rec.dtype, "params": rec.params,
                         "kept": kept, "bytes": rec.nbytes})
            layer = layers.setdefault(layer_of(name), {"params": 0, "selected": 0, "kept": 0,
                                                       "bytes": 0})
            layer["params"] += rec.params
            layer["bytes"] += rec.nbytes
            if rec.selected:
                layer["selected"] += rec.params
                layer["kept"] += rec.kept
        totals = idx.totals.to_json()
        selected = totals["selected"]
        totals["reset_percent"] = 100.0 * totals["reset"] / selected if selected else 0.0
        ftb = totals["finetuned_bytes"]
        totals["diff_to_finetuned"] = totals["diff_bytes"] / ftb if ftb else 0.0
        return {"path": str(d.path), "selection": idx.selection.to_json(),
                "base": idx.base.source,
                "finetuned": idx.finetuned.source if idx.finetuned else None,
                "alignment": idx.alignment, "totals": totals, "layers": layers,
                "tensors": rows}
