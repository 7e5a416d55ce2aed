"""Model cards (README.md) that kenstream writes beside what it produces."""

from __future__ import annotations

import json


def diff_card(base_identity: dict, command) -> str:
    """The README.md of a diff: where its base comes from and how it was made."""
    base_model = base_identity.get("repo_id") or base_identity.get("source")
    cmd = " ".join(command) if command else "(Python API)"
    return (
        "---\n"
        f"base_model: {json.dumps(str(base_model))}\n"
        "library_name: kenstream\n"
        "tags:\n- kenstream\n- ken-pruning\n"
        "---\n\n"
        "# kenstream diff\n\n"
        "A KEN-pruned fine-tune stored as a sparse diff against its base model. Rebuild the\n"
        "model with:\n\n"
        f"    kenstream rebuild {base_model} THIS_DIRECTORY -o OUT\n\n"
        f"Made with:\n\n    {cmd}\n"
    )
