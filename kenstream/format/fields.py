"""Checks of single JSON fields, shared by the record parsers: each returns the value or
raises DiffError naming the field."""

from __future__ import annotations

from ..errors import DiffError
from ..text import short
from . import spec


def is_int(value) -> bool:
    """A JSON integer (JSON true/false arrive as bool, which is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def count(value, what: str, *, optional=False) -> int | None:
    """A JSON integer in [0, 2**63), or None where ``optional``."""
    if value is None and optional:
        return None
    if not is_int(value) or not 0 <= value <= spec.MAX_COUNT:
        raise DiffError(f"{what} {short(value)} is not a count")
    return value


def text(value, what: str, *, optional=False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise DiffError(f"{what} {short(value)} is not a string")
    return value


def json_object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise DiffError(f"{what} is missing or not a JSON object")
    return value


def is_shard_file_name(name) -> bool:
    """A plain ``*.kdiff`` file name: no folder part, nothing a path could climb with."""
    return (isinstance(name, str) and name.endswith(spec.SHARD_SUFFIX) and "/" not in name
            and "\\" not in name and name not in (".", "..") and "\x00" not in name)
