"""Progress bars: tqdm over parameters, silent with --quiet or when stderr is not a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(total: int, desc: str, quiet: bool = False):
    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="param", unit_scale=True, disable=disable,
                dynamic_ncols=True, leave=False)


def say(message: str, quiet: bool = False) -> None:
    """A status line on stderr (stdout stays for results such as --json)."""
    if not quiet:
        print(message, file=sys.stderr)
