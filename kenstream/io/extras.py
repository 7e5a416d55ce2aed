"""Config, tokenizer and generation files that travel beside the weights, and their copying.

Such files are found in an input folder by name (:data:`EXTRA_PATTERNS`) and copied into an
output folder. Two rules keep the copy from leaking what is not part of the model:

- a symbolic link is followed only when it stays inside the folder, or, for a snapshot of
  the Hugging Face cache (``models--ORG--NAME/snapshots/REV``, whose files are links to
  ``../../blobs/...``), inside that repository's cache folder; any other link is skipped
  with a warning, as is anything that is not a regular file;
- a copy is created fresh (never through a link at its name) with mode ``0644`` narrowed to
  the source's own read permissions, then the umask: a file only its owner could read is
  not made readable by everyone.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
import warnings
from pathlib import Path

from ..errors import CheckpointError, OutputError
from ..format.spec import TEMP_SUFFIX
from .safefs import create_exclusive, is_within, open_regular

EXTRA_PATTERNS = (
    "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "chat_template*", "*.jinja",
    "*.py", "*.md", "LICENSE*", "NOTICE*", "COPYING*", "USE_POLICY*",
)
"""Files of a model folder that travel beside its weights: configs (model, generation,
processor, tokenizer), vocabularies and chat templates, custom code (``modeling_*.py``,
``configuration_*.py``, so ``trust_remote_code`` models load), the card and the licence."""

NOT_EXTRA = ("*.index.json", "kenstream-*.json")
"""Files that match `EXTRA_PATTERNS` but are not companions: weight indexes (the weights
are what a diff replaces) and kenstream's own records."""

MAX_EXTRA_BYTES = 100 * 10**6
"""A companion larger than this (a data set left in a model folder) is skipped with a
warning rather than copied."""


def is_extra(name: str) -> bool:
    """Whether ``name`` is a file copied beside the weights."""
    return (any(fnmatch.fnmatchcase(name, p) for p in EXTRA_PATTERNS)
            and not any(fnmatch.fnmatchcase(name, p) for p in NOT_EXTRA))


def link_roots(folder: Path) -> list:
    """Folders a link in ``folder`` may lead into: the folder, and for a hub cache snapshot
    the repository's cache folder (the snapshot's grandparent, which holds ``blobs/``)."""
    folder = Path(folder)
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots" and "--" in folder.parent.parent.name:
        roots.append(folder.parent.parent.resolve())
    return roots


def extra_files(folder) -> list:
    """The extra files of ``folder`` that may be copied, sorted by name; links that leave
    the folder and entries that are not regular files are skipped with a warning."""
    folder = Path(folder)
    roots = link_roots(folder)
    found = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not is_extra(path.name):
            continue
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                target = path.resolve(strict=True)
                if not any(is_within(target, root) for root in roots):
                    warnings.warn(f"{path}: links outside its folder (to {target}); not copied",
                                  stacklevel=2)
                    continue
                st = os.stat(target)
        except (OSError, RuntimeError):  # a dangling link or a loop
            warnings.warn(f"{path}: a link that leads nowhere; not copied", stacklevel=2)
            continue
        if not stat.S_ISREG(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                warnings.warn(f"{path}: not a regular file; not copied", stacklevel=2)
            continue
        if st.st_size > MAX_EXTRA_BYTES:
            warnings.warn(f"{path}: {st.st_size:,} bytes, too large for a file beside the "
                          "weights; not copied", stacklevel=2)
            continue
        found.append(path)
    return found


def copy_files(paths, out: Path, rename: dict | None = None) -> None:
    """Copy files into ``out``, each through a fresh temporary name, renamed when complete;
    ``rename`` maps a source name to the name it gets in ``out``.

    The copy's mode is 0644 narrowed to the source's read permissions (a 0600 source gives
    a 0600 copy), then masked by the umask."""
    for src in paths:
        dst = Path(out) / (rename or {}).get(Path(src).name, Path(src).name)
        temp = dst.with_name(dst.name + TEMP_SUFFIX)
        with os.fdopen(open_regular(src, error=CheckpointError), "rb") as fin:
            mode = 0o644 & (os.fstat(fin.fileno()).st_mode | 0o600)
            try:
                with create_exclusive(temp, mode) as fout:
                    shutil.copyfileobj(fin, fout)
                os.replace(temp, dst)
            except OSError as exc:
                temp.unlink(missing_ok=True)
                raise OutputError.from_os(exc, "copy", file=dst) from exc
