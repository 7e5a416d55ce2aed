"""kenstream.compress refuses, before it reads or writes anything, a format it does not
write and a coding that no reader accepts (the command line's choices do not reach these:
the API's callers can)."""

from __future__ import annotations

import pytest

import kenstream
from kenstream.errors import SelectionError
from tests.test_reliability import pair  # noqa: F401


@pytest.mark.parametrize("settings, message", [
    ({"format_version": 3}, "format version 3 is not one this kenstream writes"),
    ({"format_version": 0}, "format version 0 is not one this kenstream writes"),
    ({"frame_elems": 0}, "frame_elems must be at least 1"),
    ({"level": 20}, "--level must be a zstd level from 1 to 19"),
])
def test_compress_refuses_a_format_or_coding_it_does_not_write(pair, settings, message):
    b, f, out = pair
    with pytest.raises(SelectionError, match=message):
        kenstream.compress(b, f, out, keep=0.5, quiet=True, **settings)
    assert not out.exists()
