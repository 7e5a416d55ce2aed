"""File-system primitives that trust nothing already on disk.

- Inputs are opened with :func:`open_regular`: without blocking (a FIFO must not hang the
  open) and refused unless they are regular files, so a link to ``/dev/zero`` or a named
  pipe is reported, not read forever.
- Temporary files are made with :func:`create_exclusive`: any existing name is unlinked (an
  unlink removes a symbolic link, never its target) and the file is created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``, so a link planted at a temporary name is never written
  through.
- Paths inside an output folder are entered part by part with :func:`open_dir_inside`,
  each folder opened with ``O_NOFOLLOW``, so a link planted where a subfolder was
  expected leads nowhere outside.
- :class:`DirLock` is an exclusive ``flock`` on a file inside an output directory, which the
  kernel releases when the process ends, however it ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, OutputError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC


def is_within(child: Path, parent: Path) -> bool:
    """Whether path ``child`` is ``parent`` or lies below it (as spelled: resolve first)."""
    try:
        Path(child).relative_to(parent)
        return True
    except ValueError:
        return False


def safe_relative(name) -> bool:
    """Whether ``name`` is a relative POSIX path that stays inside its folder: a non-empty
    string with no root, no backslash or NUL, and no empty, ``.`` or ``..`` part."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and all(p not in ("", ".", "..") for p in path.parts)


def open_dir_inside(folder, parts, *, create: bool = False) -> int:
    """A descriptor of the folder ``folder/parts[0]/parts[1]/...``, each part entered without
    following a link; with ``create`` a missing part is made (mode 0755, then the umask).

    A part that is a link or not a folder raises OSError (``ELOOP`` or ``ENOTDIR``) for
    the caller to translate; the caller closes the descriptor.
    """
    fd = os.open(folder, _DIR_FLAGS)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path, *, error=CheckpointError, what: str = "file", hint=None) -> int:
    """A read-only descriptor of ``path`` once it is known to be a regular file.

    Raises ``error`` (a KenstreamError class) naming ``path`` when it is missing, is a
    directory, a FIFO, a device or a socket, or cannot be opened. Cost: one open, one fstat.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise error(f"{what} not found", file=path, hint=hint) from None
    except OSError as exc:
        raise error(f"{what} cannot be opened: {exc.strerror or exc}", file=path,
                    hint=hint) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise error(f"{what} is {kind}", file=path, hint=hint)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path, limit: int, *, error, what: str, hint=None) -> bytes:
    """Every byte of the regular file ``path``, refused (``error``) past ``limit`` bytes."""
    fd = open_regular(path, error=error, what=what, hint=hint)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise error(f"{what} is {size} bytes, more than any real one", file=path, hint=hint)
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise error(f"{what} grew past {limit} bytes while being read", file=path, hint=hint)
    return raw


def create_exclusive(path, mode: int = 0o644, *, dir_fd: int | None = None):
    """A new file ``path`` open for binary writing, created by this call and no other.

    An existing entry at ``path`` (a leftover temporary file, or a symbolic link someone
    planted) is unlinked first; the file is then created with ``O_EXCL | O_NOFOLLOW``, so
    nothing outside the directory can be written through it. ``mode`` is masked by the
    umask; ``dir_fd``, a folder descriptor, makes ``path`` relative to it. OSError
    propagates for the caller to translate.
    """
    path = str(path) if dir_fd is not None else Path(path)
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode,
                 dir_fd=dir_fd)
    return os.fdopen(fd, "wb")


class DirLock:
    """An exclusive lock on directory ``folder``, held through the file ``folder/name``.

    `acquire` takes it without waiting, or raises OutputError ("another kenstream run is
    writing here"). The kernel drops the lock when the process ends, so a killed run never
    leaves it stuck. The (empty) lock file stays: deleting it would let a run that opened
    it just before lock a file no other run can find.
    """

    def __init__(self, folder, name: str):
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd = None

    def acquire(self) -> "DirLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError("the lock file is a symbolic link", file=self.path,
                                  hint="remove it") from None
            raise OutputError.from_os(exc, "lock", file=self.path) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputError("the lock file is not a regular file", file=self.path,
                                  hint="remove it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError("another kenstream run is writing here", file=self.folder,
                                  hint="wait for it to finish, or stop it first") from None
            raise OutputError.from_os(exc, "lock", file=self.path) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
