"""Model cards (README.md) that kenstream writes beside what it produces.

A diff's card says where its base comes from (the hub repository and revision when the base
came from the hub cache, else the path given), how the diff was made and under which
licence the fine-tune was published. A rebuilt model's card says what it is (base + diff,
with the diff's identity) and then carries the fine-tune's own card. Paths and arguments go
through `printable`, so a path that is not UTF-8 or holds a newline cannot break a card.
"""

from __future__ import annotations

import json
import re

from .. import __version__
from ..reports import selection
from ..text import printable

FINETUNED_CARD = "README.finetuned.md"
"""Where a diff keeps the fine-tune's own README.md (its README.md is the diff's card)."""

_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


def front_matter(card: str) -> tuple[str, str]:
    """(YAML front matter, body) of a model card; an empty front matter if it has none."""
    m = _FRONT.match(card)
    return (m.group(1), card[m.end():]) if m else ("", card)


def card_license(card: str | None) -> str | None:
    """The ``license:`` of a card's front matter, if it states one on one line."""
    return _front_field(card, "license")


def _front_field(card: str | None, key: str) -> str | None:
    """The value of ``key:`` in a card's front matter, if it states one on one line."""
    if not card:
        return None
    m = re.search(rf"^{key}:\s*(\S[^\n]*)$", front_matter(card)[0], re.M)
    return m.group(1).strip().strip("'\"") if m else None


def _base_model(identity: dict) -> tuple[str, str | None]:
    """(the base as a card names it: hub repo id or path, its revision if known)."""
    if identity.get("kind") == "hub" and identity.get("repo_id"):
        return identity["repo_id"], identity.get("revision")
    return str(identity.get("source")), None


def _hub_id(identity: dict) -> str | None:
    """The base's hub repo id, for a card's ``base_model``; None for a local base."""
    return identity.get("repo_id") if identity.get("kind") == "hub" else None


def _yaml(base_model: str | None, license: str | None, extra: str = "", *,
          library: str | None = "kenstream", tags=("kenstream", "ken-pruning")) -> str:
    """Front matter; ``base_model`` only for a hub base (the hub links it as a model id:
    a local path there would point at some other repository, or none)."""
    lines = ["---", *([f"base_model: {json.dumps(printable(base_model))}"]
                      if base_model is not None else [])]
    if license:
        lines.append(f"license: {json.dumps(printable(license))}")
    if library:
        lines.append(f"library_name: {json.dumps(printable(library))}")
    lines += ["tags:", *(f"- {t}" for t in tags)]
    return "\n".join(lines) + extra + "\n---\n\n"


def diff_card(base_identity: dict, command, license: str | None = None,
              has_card: bool = False) -> str:
    """The README.md of a diff: its base (hub id and revision when the base came from the
    hub), how it was made, and the fine-tune's licence (``has_card``: the fine-tune's own
    card is in the diff as `FINETUNED_CARD`)."""
    base_model, revision = _base_model(base_identity)
    cmd = " ".join(printable(a) for a in command) if command else "(Python API)"
    at = f"@{revision}" if revision else ""
    return (
        _yaml(_hub_id(base_identity), license,
              f"\nbase_model_revision: {json.dumps(revision)}"
              if revision else "")
        + "# kenstream diff\n\n"
        "A fine-tune stored as an entropy-coded sparse diff against its base model (kept\n"
        "positions and their values; every other position takes the base's value). Rebuild\n"
        "the model with:\n\n"
        f"    kenstream rebuild {printable(base_model)}{at} THIS_DIRECTORY -o OUT\n\n"
        f"Made with:\n\n    {cmd}\n"
        + (f"\nThe fine-tune's own card is in `{FINETUNED_CARD}`.\n" if has_card else "")
    )


def rebuilt_card(index: dict, diff_sha256: str, original: str | None) -> str:
    """The README.md of a rebuilt model: base + diff, the diff's identity and settings,
    then the fine-tune's own card (without its front matter, whose licence is kept)."""
    base_model, revision = _base_model(index.get("base") or {})
    sel = index.get("selection") or {}
    # The weights are the fine-tune's kind of model (library_name from its card, where it
    # says), pruned only where the diff reset a value: a lossless rebuild is the fine-tune.
    reset = (index.get("totals") or {}).get("reset")
    pruned = ["pruned", *(["ken-pruning"] if sel.get("method") == "ken" else [])] \
        if isinstance(reset, int) and reset > 0 else []
    text = (
        _yaml(_hub_id(index.get("base") or {}), card_license(original),
              f"\nbase_model_revision: {json.dumps(revision)}" if revision else "",
              library=_front_field(original, "library_name"), tags=["kenstream", *pruned])
        + "# A fine-tune rebuilt by kenstream\n\n"
        "These weights are the base model with a kenstream diff applied: kept positions hold\n"
        "the fine-tuned values, every other position the base's.\n\n"
        f"- base: {printable(base_model)}" + (f" (revision {printable(revision)})"
                                             if revision else "") + "\n"
        f"- diff: format {index.get('format_version')}, index sha256 {diff_sha256}\n"
        f"- selection: {selection(sel)}\n"
        f"- rebuilt by kenstream {__version__}\n"
    )
    if original:
        text += "\n## The fine-tune's card\n\n" + front_matter(original)[1].lstrip("\n")
    return text
