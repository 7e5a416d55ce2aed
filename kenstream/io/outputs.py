"""Output directories: refuse unsafe targets, clear our own files on --overwrite, and copy
model files beside the weights."""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from ..errors import OutputError
from ..format.spec import TEMP_SUFFIX
from .checkpoint import EXTRA_PATTERNS

# Everything kenstream itself may write into an output directory (diff or rebuilt model);
# each is first written as NAME + TEMP_SUFFIX and then renamed.
OWN_PATTERNS = ("kendiff-*.kdiff", "kenstream-diff*.json", "model.safetensors",
                "model-*.safetensors", "model.safetensors.index.json",
                "kenstream-rebuild.partial.json", "README.md")


def is_extra(name: str) -> bool:
    """Whether ``name`` is a config / tokenizer file copied beside the weights."""
    return any(fnmatch.fnmatchcase(name, p) for p in EXTRA_PATTERNS)


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


def _is_own(name: str) -> bool:
    """A name kenstream writes (a temporary one included; copied config files only as temps)."""
    if name.endswith(TEMP_SUFFIX):
        name = name[: -len(TEMP_SUFFIX)]
        if is_extra(name):
            return True
    return any(fnmatch.fnmatchcase(name, p) for p in OWN_PATTERNS)


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
    if entries and resume:
        if (out / marker).exists():
            return "resume"
        if (out / index).exists():
            return "complete"
        if all(n.endswith(TEMP_SUFFIX) and _is_own(n) for n in entries):
            # Killed while its very first file was being written: nothing to keep.
            _remove(out, entries)
            return "fresh"
        raise OutputError("nothing to resume here (no unfinished kenstream run)", file=out,
                          hint="drop --resume, or pass --overwrite to replace it")
    if entries:
        if not overwrite:
            raise OutputError("exists and is not empty",
                              file=out, hint="pass --overwrite to replace it, or --resume")
        _clear_own_files(out, entries)
        return "fresh"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create: {exc.strerror}", file=out) from exc
    return "fresh"


# Files whose presence makes a directory look finished; removed first on --overwrite so
# that a run killed while clearing leaves something that is plainly unfinished.
_COMPLETION_FILES = ("kenstream-diff.json", "model.safetensors.index.json", "model.safetensors")


def _clear_own_files(out: Path, entries) -> None:
    """Delete what kenstream wrote into ``out`` for --overwrite, and nothing else.

    README.md and config/tokenizer names are shared with hand-made folders, so they are
    deleted only beside weights or markers of kenstream's own; a folder holding such a
    file but none of those is refused rather than clobbered.
    """
    files = [n for n in entries if (out / n).is_file()]
    own = [n for n in files if _is_own(n) and n != "README.md"]
    shared = [n for n in files if n == "README.md" or is_extra(n)]
    if shared and not own:
        raise OutputError(f"holds {shared[0]} but was not written by kenstream; "
                          "--overwrite replaces only kenstream's own output",
                          file=out, hint="choose a new or empty -o directory")
    doomed = sorted(own + shared, key=lambda n: (n not in _COMPLETION_FILES, n))
    _remove(out, doomed)


def _remove(out: Path, names) -> None:
    for name in names:
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot delete: {exc.strerror}", file=out / name,
                              hint="remove it by hand") from exc


def copy_files(paths, out: Path) -> None:
    """Copy files into ``out`` through temporary names (skipping ones already there)."""
    for src in paths:
        dst = out / Path(src).name
        temp = dst.with_name(dst.name + TEMP_SUFFIX)
        try:
            shutil.copyfile(src, temp)
            os.replace(temp, dst)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise OutputError.from_os(exc, "copy", file=dst) from exc
