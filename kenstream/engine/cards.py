"""Model cards (README.md) that kenstream writes beside what it produces."""

from __future__ import annotations

import json

from ..text import printable


def diff_card(base_identity: dict, command) -> str:
    """The README.md of a diff: where its base comes from and how it was made.

    Paths and arguments are written through `printable`: a path that is not UTF-8, or
    holds a newline, is escaped rather than breaking the card (plain text is unchanged)."""
    base_model = base_identity.get("repo_id") or base_identity.get("source")
    cmd = " ".join(printable(a) for a in command) if command else "(Python API)"
    return (
        "---\n"
        f"base_model: {json.dumps(str(base_model))}\n"
        "library_name: kenstream\n"
        "tags:\n- kenstream\n- ken-pruning\n"
        "---\n\n"
        "# kenstream diff\n\n"
        "A KEN-pruned fine-tune stored as a sparse diff against its base model. Rebuild the\n"
        "model with:\n\n"
        f"    kenstream rebuild {printable(base_model)} THIS_DIRECTORY -o OUT\n\n"
        f"Made with:\n\n    {cmd}\n"
    )
