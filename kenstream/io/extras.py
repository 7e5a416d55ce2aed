"""Config, tokenizer and generation files that travel beside the weights, and their copying.

Such files are found in an input folder by name (:data:`EXTRA_PATTERNS`), and, for a
sentence-transformers model, in the module folders its ``modules.json`` names (``1_Pooling/``,
``2_Dense/``: every file there, the module's small weights included); they are copied into
an output folder under the same relative names. Other subfolders (``onnx/``, ``openvino/``:
other exports of the same weights) are not copied, and a warning names them. Three rules
keep the copy from leaking what is not part of the model:

- a symbolic link is followed only when it stays inside the folder, or, for a snapshot of
  the Hugging Face cache (``models--ORG--NAME/snapshots/REV``, whose files are links to
  ``../../blobs/...``), inside that repository's cache folder; any other link is skipped
  with a warning, as is anything that is not a regular file;
- a module path must be relative and stay inside the folder (no ``..``);
- a copy is created fresh (never through a link at its name or at one of its folders) with
  mode ``0644`` narrowed to the source's own read permissions, then the umask: a file only
  its owner could read is not made readable by everyone.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat
import warnings
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, OutputError
from ..format.spec import TEMP_SUFFIX
from .safefs import (create_exclusive, is_within, open_dir_inside, open_regular,
                     read_regular, safe_relative)

EXTRA_PATTERNS = (
    "*.json", "*.model", "*.model.v*", "*.spm", "*.codes", "*.tiktoken", "*.txt",
    "chat_template*", "*.jinja",
    "*.py", "*.md", "LICENSE*", "NOTICE*", "COPYING*", "USE_POLICY*",
)
"""Files of a model folder that travel beside its weights: configs (model, generation,
processor, tokenizer), vocabularies (``tokenizer.model`` and Mistral's
``tokenizer.model.v3``, sentencepiece's ``spiece.model`` and ``sentencepiece.bpe.model``,
Marian's ``source.spm`` / ``target.spm``, BPE ``bpe.codes``, ``merges.txt``) and chat templates, custom code (``modeling_*.py``,
``configuration_*.py``, so ``trust_remote_code`` models load), the card and the licence."""

NOT_EXTRA = ("*.index.json", "kenstream-*.json")
"""Files that match `EXTRA_PATTERNS` but are not companions: weight indexes (the weights
are what a diff replaces) and kenstream's own records."""

MAX_EXTRA_BYTES = 100 * 10**6
"""A companion larger than this (a data set left in a model folder) is skipped with a
warning rather than copied."""

MODULES_NAME = "modules.json"
"""A sentence-transformers model's list of modules; each names the folder it loads from."""

MAX_MODULE_BYTES = 2 * 10**9
"""A file in a module folder is part of the model (a ``2_Dense/model.safetensors``), so the
limit is the size of a plausible module, not of a config; a larger file is skipped with a
warning."""

_MAX_DEPTH = 4  # folder levels walked below a module folder (links may make loops)


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


def extra_files(folder) -> list[str]:
    """The files of ``folder`` that travel beside its weights, as sorted relative POSIX
    names: the companions at its top level, then every file of the module folders its
    ``modules.json`` names. Links that leave the folder and entries that are not regular
    files are skipped with a warning; so, in one warning, are other subfolders."""
    folder = Path(folder)
    roots = link_roots(folder)
    found, folders = [], []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if is_extra(path.name):
            st = _entry_stat(path, roots)
            if st is not None and stat.S_ISREG(st.st_mode) and _small(path, st, MAX_EXTRA_BYTES):
                found.append(path.name)
        elif not path.name.startswith(".") and path.is_dir():
            folders.append(path.name)  # .cache/, .git/ hold tools' state, not the model
    modules = module_folders(folder) if MODULES_NAME in found else []
    for module in modules:
        found += _module_files(folder, module, roots)
    left = [f"{name}/" for name in folders
            if not any(PurePosixPath(m).parts[0] == name for m in modules)]
    if left:
        warnings.warn(f"{folder}: not copied: {', '.join(left)} (subfolders that are "
                      f"neither the weights nor a module in {MODULES_NAME})", stacklevel=2)
    return sorted(set(found))


def module_paths(raw: bytes, where) -> list[str]:
    """The folders a ``modules.json`` (its bytes ``raw``) names, in its order: each module's
    ``path`` that is a safe relative path; the root module (``""``) has none. ``where``
    names the file in the warning for a list that is not one or a path that leaves it."""
    try:
        modules = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        modules = None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        warnings.warn(f"{where}: not a list of modules; no module folder is copied",
                      stacklevel=3)
        return []
    paths = []
    for module in modules:
        path = module.get("path", "")
        if path in ("", None):
            continue
        if not safe_relative(path):
            warnings.warn(f"{where}: module path {path!r} leaves the folder; not copied",
                          stacklevel=3)
            continue
        if path not in paths:
            paths.append(path)
    return paths


def read_modules(path) -> bytes:
    """The bytes of the ``modules.json`` at ``path`` (a regular file of at most 1 MiB), or
    CheckpointError naming it."""
    return read_regular(path, 1 << 20, error=CheckpointError, what=MODULES_NAME)


def module_folders(folder) -> list[str]:
    """The module folders the ``modules.json`` of ``folder`` names (see `module_paths`)."""
    where = Path(folder) / MODULES_NAME
    try:
        raw = read_modules(where)
    except CheckpointError as exc:
        warnings.warn(f"{exc}; no module folder is copied", stacklevel=2)
        return []
    return module_paths(raw, where)


def _module_files(folder: Path, module: str, roots) -> list[str]:
    """Every regular file below ``folder/module`` (relative names), to `_MAX_DEPTH` levels."""
    path = folder / module
    if not os.path.lexists(path):
        warnings.warn(f"{path}: named in {MODULES_NAME} but missing; not copied", stacklevel=3)
        return []
    for depth in range(1, len(PurePosixPath(module).parts) + 1):
        st = _entry_stat(folder.joinpath(*PurePosixPath(module).parts[:depth]), roots)
        if st is None:
            return []
        if not stat.S_ISDIR(st.st_mode):
            warnings.warn(f"{path}: named in {MODULES_NAME} but not a folder; not copied",
                          stacklevel=3)
            return []
    found = []

    def walk(where: Path, rel: str, depth: int) -> None:
        for entry in sorted(where.iterdir(), key=lambda p: p.name):
            if entry.name.startswith("."):  # tool state: not looked at, not named
                continue
            st = _entry_stat(entry, roots)
            if st is None:
                continue
            name = f"{rel}/{entry.name}"
            if stat.S_ISDIR(st.st_mode):
                if depth < _MAX_DEPTH:
                    walk(entry, name, depth + 1)
                else:
                    warnings.warn(f"{entry}: nested too deep in a module folder; not copied",
                                  stacklevel=4)
            elif _small(entry, st, MAX_MODULE_BYTES):
                found.append(name)

    walk(path, module, 1)
    return found


def _entry_stat(path: Path, roots):
    """The stat of ``path`` (of its target for a link that stays inside ``roots``), or None
    with a warning for a link that leaves them or leads nowhere, or an entry that is
    neither a regular file nor a folder."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = path.resolve(strict=True)
            if not any(is_within(target, root) for root in roots):
                warnings.warn(f"{path}: links outside its folder (to {target}); not copied",
                              stacklevel=3)
                return None
            st = os.stat(target)
    except (OSError, RuntimeError):  # a dangling link or a loop
        warnings.warn(f"{path}: a link that leads nowhere; not copied", stacklevel=3)
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        warnings.warn(f"{path}: not a regular file; not copied", stacklevel=3)
        return None
    return st


def _small(path: Path, st, limit: int) -> bool:
    if st.st_size <= limit:
        return True
    warnings.warn(f"{path}: {st.st_size:,} bytes, too large for a file beside the weights; "
                  "not copied", stacklevel=3)
    return False


def copy_files(folder, names, out: Path, rename: dict | None = None) -> None:
    """Copy the files ``names`` (relative POSIX names, as `extra_files` gives them) of
    ``folder`` into ``out``, each through a fresh temporary name, renamed when complete;
    ``rename`` maps a name to the one it gets in ``out``. Subfolders are made as needed and
    entered without following links, so nothing is written outside ``out``.

    The copy's mode is 0644 narrowed to the source's read permissions (a 0600 source gives
    a 0600 copy), then masked by the umask."""
    for name in names:
        dst = (rename or {}).get(name, name)
        parts = PurePosixPath(dst).parts
        temp = parts[-1] + TEMP_SUFFIX
        with os.fdopen(open_regular(Path(folder) / name, error=CheckpointError), "rb") as fin:
            mode = 0o644 & (os.fstat(fin.fileno()).st_mode | 0o600)
            try:
                fd = open_dir_inside(out, parts[:-1], create=True)
            except OSError as exc:
                raise OutputError.from_os(exc, "copy", file=Path(out) / dst) from exc
            try:
                with create_exclusive(temp, mode, dir_fd=fd) as fout:
                    shutil.copyfileobj(fin, fout)
                os.replace(temp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
            except OSError as exc:
                try:
                    os.unlink(temp, dir_fd=fd)
                except OSError:
                    pass
                raise OutputError.from_os(exc, "copy", file=Path(out) / dst) from exc
            finally:
                os.close(fd)


def copy_stale(folder, names, out: Path, rename: dict | None = None) -> list[str]:
    """Copy again (`copy_files`) those of ``names`` whose copy in ``out`` is lost, edited
    or replaced by a link (`stale_copies`); returns their names, for the caller to say."""
    stale = stale_copies(folder, names, out, rename)
    copy_files(folder, stale, out, rename)
    return stale


def stale_copies(folder, names, out: Path, rename: dict | None = None) -> list[str]:
    """Those of ``names`` whose copy in ``out`` (under the name ``rename`` gives it) is
    missing, is not a regular file (a link is not followed) or differs from ``folder``'s
    file byte for byte: what `copy_files` must copy again to make ``out`` whole.

    Cost: reads both copies of every file (the companions of a model: a few MB)."""
    stale = []
    for name in names:
        parts = PurePosixPath((rename or {}).get(name, name)).parts
        with os.fdopen(open_regular(Path(folder) / name, error=CheckpointError), "rb") as src:
            try:
                fd = open_dir_inside(out, parts[:-1])
                try:
                    copy = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                                   dir_fd=fd)
                finally:
                    os.close(fd)
            except OSError:  # missing, a link, or under a link
                stale.append(name)
                continue
            with os.fdopen(copy, "rb") as dst:
                if not stat.S_ISREG(os.fstat(dst.fileno()).st_mode) or not _same_bytes(src, dst):
                    stale.append(name)
    return stale


def _same_bytes(a, b, chunk: int = 1 << 20) -> bool:
    """Whether the open binary files ``a`` and ``b`` hold the same bytes."""
    if os.fstat(a.fileno()).st_size != os.fstat(b.fileno()).st_size:
        return False
    while True:
        x, y = a.read(chunk), b.read(chunk)
        if x != y:
            return False
        if not x:
            return True
