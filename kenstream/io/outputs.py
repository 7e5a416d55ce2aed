"""Output directories: refuse unsafe targets, lock the directory while a run writes it, and
replace on --overwrite only what kenstream can prove it wrote.

The proof is the marker file ``.kenstream-output`` (:data:`MARKER_NAME`), a JSON list of the
files a run writes into the directory, made before any of them. ``--overwrite`` deletes
exactly the files the marker lists (and their temporary names); a non-empty folder without
a marker is someone else's and is refused, whatever its files are called. The marker is a
function of the run's plan (sorted names), so a resumed run leaves the same marker as an
uninterrupted one and whole-directory comparisons need not exclude it.

While a command writes, it holds an exclusive lock on the directory (:class:`DirLock` on
the empty file ``.kenstream.lock``, which stays): a second writer is refused in one line.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from ..errors import OutputError
from ..format.spec import TEMP_SUFFIX
from .jsonfile import read_json_file, write_json_atomic
from .safefs import DirLock, is_within, open_dir_inside, safe_relative

MARKER_NAME = ".kenstream-output"
"""The marker: ``{"format": "kenstream-output", "files": [relative paths]}``."""
MARKER_FORMAT = "kenstream-output"
LOCK_NAME = ".kenstream.lock"
SEARCH_NAME = ".kenstream-size"
"""A ``--size`` search's record (:mod:`kenstream.engine.size`); it stays once the search
has finished, so that a resume finds it done."""
HOUSEKEEPING = (MARKER_NAME, MARKER_NAME + TEMP_SUFFIX, LOCK_NAME, SEARCH_NAME,
                SEARCH_NAME + TEMP_SUFFIX)
"""Names in an output directory that are kenstream's bookkeeping, not its content."""

# Files whose presence makes a directory look finished; removed first on --overwrite so
# that a run killed while clearing leaves something that is plainly unfinished.
_COMPLETION_FILES = ("kenstream-diff.json", "model.safetensors.index.json", "model.safetensors")

_FOREIGN = "was not written by kenstream (it has no .kenstream-output marker)"


def refuse_link(out) -> None:
    """Refuse an output that is itself a symbolic link, before anything is created: files
    are written into an output folder without following links (:mod:`.safefs`), so a run
    into a link would leave its bookkeeping behind it and then fail. A link among the
    folders above ``out`` is fine."""
    out = Path(out)
    if not out.is_symlink():
        return
    hint = (f"pass the folder it points to, {out.resolve()}" if out.is_dir()
            else "choose another -o directory")
    raise OutputError("is a symbolic link, and kenstream does not write through links",
                      file=out, hint=hint)


def _input_paths(inputs):
    for ckpt in inputs:
        if ckpt is None:
            continue
        yield Path(ckpt.root).resolve()
        for f in ckpt.files:
            yield Path(f).resolve()


def read_marker(out: Path) -> list | None:
    """The files the marker of ``out`` lists, or None where there is no marker."""
    path = Path(out) / MARKER_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    hint = "remove the directory by hand, or choose another -o directory"
    if not stat.S_ISREG(st.st_mode):
        raise OutputError("the marker .kenstream-output is not a regular file", file=path,
                          hint=hint)
    obj = read_json_file(path, "marker", error=OutputError, hint=hint, limit=64 << 20)
    files = obj.get("files") if isinstance(obj, dict) else None
    if not (isinstance(obj, dict) and obj.get("format") == MARKER_FORMAT
            and isinstance(files, list) and all(safe_relative(f) for f in files)):
        raise OutputError("the marker .kenstream-output is damaged", file=path, hint=hint)
    return files


def write_marker(out: Path, files) -> None:
    """Record that kenstream writes ``files`` (relative paths) into ``out``."""
    write_json_atomic(Path(out) / MARKER_NAME,
                      {"format": MARKER_FORMAT, "files": sorted(set(files))})


class Claim:
    """An output directory held by this run: ``state`` is ``'fresh'``, ``'resume'`` or
    ``'complete'``; ``files`` what the marker lists."""

    def __init__(self, path: Path, state: str, files: list):
        self.path, self.state, self.files = path, state, list(files)

    def record(self, files) -> None:
        """Add ``files`` to the marker (a resumed run may write a file the first did not)."""
        merged = sorted(set(self.files) | set(files))
        if merged != sorted(set(self.files)):
            write_marker(self.path, merged)
        self.files = merged


@contextmanager
def claim_output(out, *, inputs, resume: bool, overwrite: bool, plan: str, index: str,
                 files, run: str = "run"):
    """Make ``out`` ready for a run that writes ``files`` and hold its lock; yields a Claim.

    Refuses an output that is a link (`refuse_link`), is or is inside an input, or holds
    one; a non-empty directory without kenstream's marker; a marked one unless resuming
    (an unfinished run: ``plan`` present) or overwriting (the listed files are deleted). A
    fresh directory gets the marker before anything else. Nothing is created or deleted
    in a folder that is refused. ``run`` names the command in a refusal ("rebuild").
    """
    out = Path(out)
    refuse_link(out)
    target = out.resolve()
    for path in _input_paths(inputs):
        if target == path or is_within(target, path) or is_within(path, target):
            raise OutputError("the output must not be, contain, or be inside an input",
                              file=out, hint="choose another -o directory")
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a directory", file=out)
    _refuse_foreign(out, *_survey(out), resume=resume, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create: {exc.strerror}", file=out,
                          hint="choose an -o in a folder you can write to") from exc
    with DirLock(out, LOCK_NAME):
        entries, marker = _survey(out)  # again: the folder may have changed before the lock
        _refuse_foreign(out, entries, marker, resume=resume, overwrite=overwrite)
        _refuse_clash(out, marker, files)
        state = _state(out, entries, marker, resume, overwrite, plan, index, run)
        if state == "fresh":
            write_marker(out, files)
            marker = sorted(set(files))
        claim = Claim(out, state, marker or [])
        earlier = _temporaries(out, claim.files)
        try:
            yield claim
        except BaseException:
            _sweep_temporaries(out, claim.files, keep=earlier)
            raise


def _temporaries(out: Path, names) -> set:
    """The listed names whose temporary file is in ``out`` now."""
    return {n for n in names if os.path.lexists(out / (n + TEMP_SUFFIX))}


def _sweep_temporaries(out: Path, names, *, keep) -> None:
    """Delete the temporary files of ``names`` after a failed or interrupted run. A writer
    removes its own on the way out, but a signal can land between a temporary file's
    creation and the code that would remove it. The lock is held, so a temporary file that
    was not there when the claim was taken is this run's; one left by an earlier, killed
    run (``keep``) is not touched, so a run refused after the claim changes nothing."""
    for name in sorted(set(names) - keep):
        try:
            _unlink_inside(out, name + TEMP_SUFFIX)
        except OSError:
            pass  # absent, or not ours to remove: the files themselves are untouched


def _survey(out: Path):
    """(entries other than bookkeeping, marker file list or None) of ``out``."""
    if not out.is_dir():
        return [], None
    return _entries(out), read_marker(out)


def _entries(out: Path) -> list:
    """Names in ``out`` other than bookkeeping, sorted ([] where it is no folder)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in HOUSEKEEPING)


def is_complete(out, *, plan: str, index: str) -> bool:
    """Whether a ``--resume`` run would find ``out`` finished (`claim_output`'s state
    ``'complete'``: its index, no plan file), asked without claiming it: so that a caller
    reports "found", not "wrote"."""
    return _complete(_entries(Path(out)), plan, index)


def _complete(entries, plan: str, index: str) -> bool:
    return index in entries and plan not in entries


def _refuse_foreign(out: Path, entries, marker, *, resume, overwrite) -> None:
    if not entries or marker is not None:
        return
    if resume:
        raise OutputError("nothing to resume here (no unfinished kenstream run)", file=out,
                          hint="drop --resume, or choose another -o directory")
    if overwrite:
        raise OutputError(f"{_FOREIGN}; kenstream replaces only its own output", file=out,
                          hint="choose a new or empty directory")
    raise OutputError("exists and is not empty", file=out,
                      hint="choose a new or empty directory")


def _refuse_clash(out: Path, marker, files) -> None:
    """Refuse a run that would replace a file kenstream did not write (one added to its
    output folder since, under a name this run writes)."""
    listed = set(marker or ())
    for name in sorted(set(files) - listed):
        if os.path.lexists(out / name) or os.path.lexists(out / (name + TEMP_SUFFIX)):
            raise OutputError(f"holds {name}, which this run would replace but kenstream did "
                              "not write", file=out,
                              hint="move that file away, or choose another directory")


def _state(out: Path, entries, marker, resume, overwrite, plan, index, run) -> str:
    if not entries:
        return "fresh"
    if resume:
        if _complete(entries, plan, index):
            return "complete"
        if plan in entries:
            return "resume"
        if all(n.endswith(TEMP_SUFFIX) and n[: -len(TEMP_SUFFIX)] in marker for n in entries):
            # Killed while its very first file was being written: nothing to keep.
            remove_listed(out, [n[: -len(TEMP_SUFFIX)] for n in entries])
            return "fresh"
        raise OutputError("nothing to resume here (no unfinished kenstream run)", file=out,
                          hint="drop --resume, or pass --overwrite to replace it")
    if not overwrite and plan in entries:
        raise OutputError(f"holds an interrupted {run} (its plan {plan} is here)", file=out,
                          hint="rerun with --resume to finish it, or --overwrite to start "
                               "again")
    if not overwrite:
        raise OutputError("exists and is not empty", file=out,
                          hint="pass --overwrite to replace it, or --resume")
    remove_listed(out, marker)
    return "fresh"


def remove_listed(out: Path, names) -> None:
    """Delete each listed file of ``out`` and its temporary name, completion files first.

    Parent folders are entered without following links, so a listed ``sub/file`` whose
    ``sub`` has become a link to elsewhere deletes nothing outside ``out``."""
    order = sorted(names, key=lambda n: (PurePosixPath(n).name not in _COMPLETION_FILES, n))
    for name in order:
        for victim in (name, name + TEMP_SUFFIX):
            try:
                _unlink_inside(out, victim)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as exc:
                raise OutputError(f"cannot delete: {exc.strerror}", file=out / victim,
                                  hint="remove it by hand") from exc
    _remove_emptied_folders(out, names)


def _remove_emptied_folders(out: Path, names) -> None:
    """Remove the subfolders of listed files (``1_Pooling/`` of ``1_Pooling/config.json``)
    that are empty now, deepest first; a folder that still holds anything stays."""
    folders = {PurePosixPath(n).parents[i] for n in names
               for i in range(len(PurePosixPath(n).parts) - 1)}
    for folder in sorted(folders, key=lambda f: (-len(f.parts), str(f))):
        try:
            fd = open_dir_inside(out, folder.parts[:-1])
        except OSError:
            continue
        try:
            os.rmdir(folder.name, dir_fd=fd)
        except OSError:
            pass  # not empty, or gone: either way nothing of ours is left to remove
        finally:
            os.close(fd)


def _unlink_inside(out: Path, name: str) -> None:
    parts = PurePosixPath(name).parts
    fd = open_dir_inside(out, parts[:-1])
    try:
        if stat.S_ISDIR(os.lstat(parts[-1], dir_fd=fd).st_mode):
            return  # a folder now stands where a file was listed: not ours to remove
        os.unlink(parts[-1], dir_fd=fd)
    finally:
        os.close(fd)
