"""Summarise what a diff holds, from its index alone (no shard is read)."""

from __future__ import annotations

import re

from ..io.diff_reader import DiffReader
from ..text import natural_key

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(name: str) -> str:
    """The first number between dots in a tensor name (its block), or ``'other'``."""
    m = _LAYER.search(name)
    return m.group(1) if m else "other"


def layer_order(layers) -> list:
    """``layer_of`` values in numeric order (2 before 10), ``'other'`` last."""
    return sorted(layers, key=lambda n: (not n.isdigit(), natural_key(n)))


def split_bytes(rec) -> tuple[int, int]:
    """(bytes of positions, bytes of values) a record stores; format 1's from its
    encoding (values raw, the rest positions)."""
    if rec.version >= 2:
        return rec.positions_bytes or 0, rec.values_bytes or 0
    values = rec.kept * rec.itemsize if rec.encoding != "unchanged" else 0
    return rec.nbytes - values, values


def info(diff) -> dict:
    """Totals, per-layer and per-tensor breakdown of a diff, from its index alone: kept
    fractions, and bytes split into positions and values against the fine-tune's own
    bytes. Cost O(number of tensors)."""
    with DiffReader(diff) as d:
        idx = d.index
        layers = {}
        rows = []
        for name, rec in sorted(d.records.items(), key=lambda kv: natural_key(kv[0])):
            kept = rec.kept if rec.encoding != "unchanged" else 0
            pos, val = split_bytes(rec)
            ft_bytes = rec.params * rec.itemsize
            rows.append({"name": name, "base_name": rec.base_name,
                         "base_digest": rec.base_digest, "encoding": rec.encoding,
                         "reason": rec.reason,
                         "shape": list(rec.shape), "dtype": rec.dtype, "params": rec.params,
                         "kept": kept, "bytes": rec.nbytes, "positions_bytes": pos,
                         "values_bytes": val, "finetuned_bytes": ft_bytes,
                         "ratio": rec.nbytes / ft_bytes if ft_bytes else 0.0})
            layer = layers.setdefault(layer_of(name), {"params": 0, "selected": 0, "kept": 0,
                                                       "bytes": 0})
            layer["params"] += rec.params
            layer["bytes"] += rec.nbytes
            if rec.selected:
                layer["selected"] += rec.params
                layer["kept"] += rec.kept
        layers = {n: layers[n] for n in layer_order(layers)}
        totals = idx.totals.to_json()
        if idx.format_version == 1:
            totals["positions_bytes"] = sum(r["positions_bytes"] for r in rows)
            totals["values_bytes"] = sum(r["values_bytes"] for r in rows)
        selected = totals["selected"]
        totals["reset_percent"] = 100.0 * totals["reset"] / selected if selected else 0.0
        ftb = totals["finetuned_bytes"]
        totals["diff_to_finetuned"] = totals["diff_bytes"] / ftb if ftb else 0.0
        return {"path": str(d.path), "format_version": idx.format_version,
                "coding": None if idx.coding is None else idx.coding.to_json(),
                "selection": dict(idx.selection.to_json(), budget=idx.selection.budget),
                "base": idx.base.named, "base_identity": idx.base.to_json(),
                "finetuned": idx.finetuned.named if idx.finetuned else None,
                "alignment": idx.alignment, "totals": totals, "layers": layers,
                "tensors": rows}
