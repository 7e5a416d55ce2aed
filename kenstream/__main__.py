"""``python -m kenstream`` and the ``kenstream`` command: load the command line, then run it.

Kept to the standard library until the command line is loaded, so that a Ctrl-C while it
loads (the slowest moment of a short command) still ends in one line, never a traceback.
"""

import sys

_LOST = []
"""Ctrl-Cs that Python reported as ignored while the command line loaded."""


def _remember(info):
    """Until the entry point installs its own handling: a Ctrl-C whose KeyboardInterrupt
    lands in a callback of the import machinery (a lock's weakref callback) is not raised
    but printed by Python as an ignored exception; keep it instead, to end in one line."""
    if isinstance(info.exc_value, KeyboardInterrupt):
        _LOST.append(info.exc_value)
        return
    sys.__unraisablehook__(info)


def run() -> None:
    sys.unraisablehook = _remember
    try:
        from .cli import entry
    except KeyboardInterrupt:  # Ctrl-C while the command line loads
        _LOST.append(None)
    if _LOST:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    sys.unraisablehook = sys.__unraisablehook__
    entry()


if __name__ == "__main__":
    run()
