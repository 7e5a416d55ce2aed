"""Pair fine-tune tensor names with base tensor names.

Real pairs differ by a consistent prefix: a ``BertModel`` base has ``encoder.layer.0...``
where a ``BertForSequenceClassification`` fine-tune has ``bert.encoder.layer.0...``. Exact
names are paired first; the remaining names are then paired through the one prefix
(added on either side) that pairs the most of them. Last, an output head the fine-tune
unties from its input embedding (``lm_head.weight`` present only in the fine-tune, the
base tying it to ``embed_tokens``) is paired with that embedding: it was the head's value.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

HEADS = ("lm_head.weight",)
"""Output heads that a base may tie to its input embedding (storing only the embedding)."""
EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
              "embed_in.weight", "tok_embeddings.weight")
"""Names (ends of names) of input embeddings a tied head shares."""


@dataclass
class Alignment:
    """``pairs`` maps fine-tune name -> base name; ``new`` are fine-tune-only, ``dropped`` base-only."""

    pairs: dict
    new: list
    dropped: list
    finetuned_prefix: str = ""
    base_prefix: str = ""
    exact: int = 0
    tied: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {
            "exact": self.exact,
            "matched": len(self.pairs),
            "finetuned_prefix": self.finetuned_prefix,
            "base_prefix": self.base_prefix,
            "new": list(self.new),
            "dropped": list(self.dropped),
        }
        if self.tied:
            out["tied"] = dict(self.tied)
        return out


def _prefixes(name: str):
    """Every dotted prefix of ``name`` (``'a.b.c'`` -> ``'a.'``, ``'a.b.'``)."""
    start = 0
    while True:
        dot = name.find(".", start)
        if dot < 0:
            return
        yield name[: dot + 1]
        start = dot + 1


def align(finetuned_names, base_names) -> Alignment:
    """Align names; O(total characters). Order of ``finetuned_names`` is kept in ``pairs``."""
    ft = list(finetuned_names)
    base = list(base_names)
    base_set = set(base)
    exact = {n: n for n in ft if n in base_set}
    rest_ft = [n for n in ft if n not in exact]
    rest_base = [n for n in base if n not in exact]
    rest_base_set = set(rest_base)
    rest_ft_set = set(rest_ft)

    votes = Counter()
    for name in rest_ft:  # a prefix the fine-tune added
        for p in _prefixes(name):
            if name[len(p):] in rest_base_set:
                votes[(p, "")] += 1
    for name in rest_base:  # a prefix the fine-tune removed
        for p in _prefixes(name):
            if name[len(p):] in rest_ft_set:
                votes[("", p)] += 1

    ft_prefix = base_prefix = ""
    extra = {}
    if votes:
        # Most pairs wins; on a tie the shorter prefix, then the alphabetically first.
        (ft_prefix, base_prefix), _ = min(
            votes.items(), key=lambda kv: (-kv[1], len(kv[0][0]) + len(kv[0][1]), kv[0]))
        for name in rest_ft:
            if not name.startswith(ft_prefix):
                continue
            candidate = base_prefix + name[len(ft_prefix):]
            if candidate in rest_base_set:
                extra[name] = candidate
    used = set(exact.values()) | set(extra.values())
    pairs = {n: exact.get(n, extra.get(n)) for n in ft if n in exact or n in extra}
    return Alignment(
        pairs=pairs,
        new=[n for n in ft if n not in pairs],
        dropped=[n for n in base if n not in used],
        finetuned_prefix=ft_prefix if extra else "",
        base_prefix=base_prefix if extra else "",
        exact=len(exact),
    )


def tie_heads(alignment: Alignment, base_names) -> Alignment:
    """Pair each unpaired fine-tune output head with the base's input embedding, when the
    base has no head of its own (it ties them). Recorded in ``alignment.tied``."""
    embeddings = [n for n in base_names if n.endswith(EMBEDDINGS)]
    if len(embeddings) != 1 or any(n.endswith(HEADS) for n in base_names):
        return alignment
    for name in list(alignment.new):
        if name.endswith(HEADS):
            alignment.pairs[name] = embeddings[0]
            alignment.tied[name] = embeddings[0]
            alignment.new.remove(name)
            break
    return alignment

