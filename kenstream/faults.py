"""Signals of the ``kenstream`` process: SIGTERM, SIGINT outside the work, and bus errors.

Installed by the command line's entry point only (never on import, never by the library):

- SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so a terminated run cleans up
  exactly as one stopped with Ctrl-C (temporary file deleted, plan file kept) and says so.
- Both are remembered (:func:`raise_pending`): a raise that lands in a finalizer is lost,
  so every output file raises the interrupt again before it is committed.
- A bus error (SIGBUS) comes from reading a memory-mapped input that another program cut
  short. Python cannot recover from it (returning from the handler faults again), so a
  C-level handler prints one ``error:`` line naming the file that shrank and ends the
  process with exit code 2 at once. The readers check file sizes before each block
  (``SafetensorsFile.check_intact``), so this is only the last line of defence for a file
  cut during the read of one block. What is left is an unfinished output (no index), as
  after a kill.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""

    exit_code = 143


_pending = None
"""The interrupt a handler raised (KeyboardInterrupt or Terminated), kept because the raise
can be lost: a signal handled while a finalizer or weakref callback runs raises there,
and Python prints "Exception ignored" and goes on."""


def _on_int(signum, frame):
    global _pending
    _pending = KeyboardInterrupt
    raise KeyboardInterrupt


def _on_term(signum, frame):
    global _pending
    _pending = Terminated
    raise Terminated()


def _unraisable(info) -> None:
    """sys.unraisablehook: an interrupt raised inside a finalizer is remembered (and raised
    again by `raise_pending`), so it is not printed as an ignored exception."""
    if _pending is not None and isinstance(info.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(info)


def raise_pending() -> None:
    """Raise again an interrupt this process received, whether or not its first raise got
    through. Called before a file is committed, so a Ctrl-C or SIGTERM swallowed by a
    finalizer still ends the run as interrupted (resumable, no index), never as finished.
    A no-op off the main thread, and in a process whose handlers are not installed."""
    if _pending is not None and threading.current_thread() is threading.main_thread():
        raise _pending()


_fired = False
_bus_handler = None  # the ctypes callback must outlive installation


def _shrunk_file() -> str | None:
    """The first memory-mapped file now shorter than when it was opened, if any."""
    reader = sys.modules.get("kenstream.io.safetensors_file")
    for path, size in list(getattr(reader, "MAPPED", {}).values()):
        try:
            if os.stat(path).st_size < size:
                return os.fsencode(path).decode("utf-8", "backslashreplace")
        except OSError:
            return os.fsencode(path).decode("utf-8", "backslashreplace")
    return None


def _on_bus(signum):
    global _fired
    if _fired:  # another thread faulted too: the first one speaks
        os._exit(2)
    _fired = True
    try:
        path = _shrunk_file()
        where = f"{path}: " if path else ""
        line = (f"error: {where}the file shrank while it was being read (bus error); the "
                "output is unfinished (rerun with --resume once the file is complete)\n")
        os.write(2, line.encode("utf-8", "backslashreplace"))
    finally:
        os._exit(2)


def install() -> None:
    """Install the SIGINT, SIGTERM and SIGBUS handlers (main thread of the CLI process
    only)."""
    global _bus_handler
    signal.signal(signal.SIGINT, _on_int)
    signal.signal(signal.SIGTERM, _on_term)
    sys.unraisablehook = _unraisable
    if not hasattr(signal, "SIGBUS"):
        return
    try:
        libc = ctypes.CDLL(None)
        kind = ctypes.CFUNCTYPE(None, ctypes.c_int)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, kind]
        _bus_handler = kind(_on_bus)
        libc.signal(signal.SIGBUS, _bus_handler)
    except (OSError, AttributeError):
        pass  # no C library to ask: a bus error then ends the process with signal 7


def ignore_interrupts() -> None:
    """The work is done: a late Ctrl-C or SIGTERM must not turn success into a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
