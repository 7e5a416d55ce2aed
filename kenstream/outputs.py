"""Output directories: refuse unsafe targets, clear our own files on --overwrite, copy
model files beside the weights, and write small JSON files atomically."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

from .errors import OutputError

# Everything kenstream itself may write into an output directory (diff or rebuilt model).
OWN_PATTERNS = ("kendiff-*.kdiff", "kendiff-*.kdiff.partial", "kenstream-diff*.json",
                "kenstream-diff*.json.partial", "model.safetensors", "model-*.safetensors",
                "*.safetensors.partial", "model.safetensors.index.json",
                "kenstream-rebuild.partial.json", "README.md")

EXTRA_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "vocab.txt", "vocab.json",
               "merges.txt", "added_tokens.json", "preprocessor_config.json",
               "chat_template.json", "chat_template.jinja")


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _input_paths(inputs):
    for ckpt in inputs:
        if ckpt is None:
            continue
        yield Path(ckpt.root).resolve()
        for f in ckpt.files:
            yield Path(f).resolve()


def prepare_output(out: Path, *, inputs, resume: bool, overwrite: bool, marker: str,
                   index: str) -> str:
    """Make ``out`` ready; returns ``'fresh'``, ``'resume'`` or ``'complete'``.

    Refuses an output equal to or inside an input, or holding an input; refuses a non-empty
    directory unless resuming (our own unfinished run) or overwriting (our own files only).
    """
    target = out.resolve()
    for path in _input_paths(inputs):
        if target == path or _is_within(target, path) or _is_within(path, target):
            raise OutputError("the output must not be, contain, or be inside an input",
                              file=out, hint="choose another -o directory")
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a directory", file=out)
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if entries:
        if resume:
            if (out / marker).exists():
                return "resume"
            if (out / index).exists():
                return "complete"
            raise OutputError("nothing to resume here (no unfinished kenstream run)", file=out)
        if not overwrite:
            raise OutputError("exists and is not empty",
                              file=out, hint="pass --overwrite to replace it, or --resume")
        for name in entries:
            if any(fnmatch.fnmatch(name, p) for p in OWN_PATTERNS) or name in EXTRA_NAMES:
                (out / name).unlink()
        return "fresh"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create: {exc.strerror}", file=out) from exc
    return "fresh"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` through a temporary name, fsynced, then renamed."""
    temp = path.with_name(path.name + ".partial")
    try:
        with open(temp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OutputError(f"write failed: {exc.strerror}", file=path) from exc


def copy_files(paths, out: Path) -> None:
    """Copy files into ``out`` through temporary names (skipping ones already there)."""
    for src in paths:
        dst = out / Path(src).name
        temp = dst.with_name(dst.name + ".partial")
        try:
            shutil.copyfile(src, temp)
            os.replace(temp, dst)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise OutputError(f"copy failed: {exc.strerror}", file=dst) from exc


def model_card(base_identity: dict, command) -> str:
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


def copy_extra_files(ckpt, out: Path, *, base_model: dict, command) -> None:
    """Copy the fine-tune's config/tokenizer files and write the diff's README.md."""
    copy_files(ckpt.extra_files(), out)
    card = out / "README.md"
    temp = card.with_name("README.md.partial")
    temp.write_text(model_card(base_model, command), encoding="utf-8")
    os.replace(temp, card)
