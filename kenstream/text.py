"""Text that came from files or the command line, made safe to print or to write as UTF-8.

Tensor names, sources, commands and paths are data: they may hold newlines, terminal escape
codes, or lone surrogates (a path with bytes that are not UTF-8 arrives as
``surrogateescape`` text). Printed raw, the first two split or repaint the terminal and the
last raises ``UnicodeEncodeError``. :func:`printable` is the one place that turns such text
into something safe to show.
"""

from __future__ import annotations

import re
import unicodedata

_DIGITS = re.compile(r"(\d+)")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Control characters, format characters (bidi overrides, zero-width marks), line and
# paragraph separators, and surrogates: nothing here is ever printed as it is.
_UNSAFE = ("Cc", "Cf", "Cs", "Zl", "Zp")


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text) -> str:
    """``text`` (any object, through ``str``) with every control, format or separator
    character and every lone surrogate written as a backslash escape (``\\n``, ``\\x1b``,
    ``\\u202e``; a non-UTF-8 byte from a path as ``\\xe9``). Plain text comes back unchanged,
    so the result is one line, encodes as UTF-8, and moves no terminal cursor. O(len)."""
    text = str(text)
    if text.isprintable() and text.isascii():
        return text  # the common case, without a per-character walk
    return "".join(_escape(ch) if unicodedata.category(ch) in _UNSAFE else ch for ch in text)


def shortened(text, limit: int = 120) -> str:
    """`printable` ``text`` cut to at most ``limit`` characters by an ellipsis in the middle,
    for pictures: laying out a megabyte-long label takes matplotlib minutes."""
    text = printable(text if len(str(text)) <= 4 * limit else
                     str(text)[:2 * limit] + str(text)[-2 * limit:])
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return text[:half] + "\u2026" + text[len(text) - (limit - 1 - half):]


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside names by value: ``layers.2`` before
    ``layers.10``, as a model's depth reads; ``2`` before ``02`` where they are equal."""
    return [_number(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(name))]


def _number(digits: str) -> tuple:
    """A run of digits as a key that orders by value without ``int()`` (which refuses
    more than 4300 digits, and a name is data): fewer significant digits first, then the
    digits themselves, then the shorter run (``2`` before ``02``)."""
    significant = digits.lstrip("0")
    return len(significant), significant, len(digits), digits


def short(value) -> str:
    """``repr(value)`` cut to 40 characters, for messages about hostile fields or values a
    caller passed."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural (an added ``s``) unless ``n`` is 1: "1 pass", "3 tensors"."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}{'es' if noun.endswith('s') else 's'}"
