"""verify's block comparison against a slow NumPy statement of it: the three flags on bit
patterns and the two norms of exact values, for every float width, integers, and tensors
without a base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kenstream import dtypes
from kenstream.engine.blocks import ThreadBuffers
from kenstream.kernels.compare import DIFFERS, KEPT_DIFFERS, RESET_DIFFERS, compare_block

CODES = ["BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2", "I32", "U8"]


def slow(got, want, base, kept, code):
    """The comparison as verify states it, with boolean arrays and float64 NumPy sums."""
    bits = np.dtype(f"u{got.itemsize}")
    g, w = got.view(bits), want.view(bits)
    flags = 0
    if (g != w).any():
        flags |= DIFFERS
    if (g != w)[kept].any():
        flags |= KEPT_DIFFERS
    if base is not None and (g != base.view(bits))[~kept].any():
        flags |= RESET_DIFFERS
    if base is None or not dtypes.is_float(code):
        return flags, 0.0, 0.0
    value = {"F64": lambda a: a.astype(np.float64)}.get(
        code, lambda a: torch.from_numpy(a.copy()).view(dtypes.torch_dtype(code)).double().numpy()
        if code in ("BF16", "F8_E4M3", "F8_E5M2") else a.astype(np.float64))
    fw, fb, fg = value(want), value(base), value(got)
    # Only positions whose bits differ count; a NaN difference counts as inf.
    with np.errstate(invalid="ignore", over="ignore"):
        dc = np.where(w != base.view(bits), fw - fb, 0.0)
        de = np.where(g != w, fg - fw, 0.0)
        sq = lambda d: np.where(np.isnan(d), np.inf, d * d)  # noqa: E731
        return flags, float(sq(dc).sum()), float(sq(de).sum())


def pair(code, rng, n=5000):
    """(base, fine-tune) in ``code``'s storage dtype: finite values a little apart."""
    entry = dtypes.lookup(code)
    if not entry.is_float:
        base = rng.integers(0, 100, n).astype(entry.storage)
        return base, (base + rng.integers(0, 3, n)).astype(entry.storage)
    x = rng.standard_normal(n) * 0.5
    y = x + rng.standard_normal(n) * 0.05
    if code in ("F64", "F32", "F16"):
        return x.astype(entry.storage), y.astype(entry.storage)
    t = dtypes.torch_dtype(code)
    to = lambda a: torch.from_numpy(a).to(t).view(torch.uint8 if entry.storage.itemsize == 1
                                                  else torch.int16).numpy().view(entry.storage)
    return to(x), to(y)


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("case", ["exact", "kept-wrong", "reset-wrong", "no-base"])
def test_compare_block_matches_the_slow_statement(code, case):
    rng = np.random.default_rng(CODES.index(code))
    base, ft = pair(code, rng)
    kept = rng.random(ft.size) < 0.3
    got = np.where(kept, ft, base)
    bits = np.dtype(f"u{got.itemsize}")
    if case == "kept-wrong":
        i = np.flatnonzero(kept)[7]
        got.view(bits)[i] ^= 1
    if case == "reset-wrong":
        i = np.flatnonzero(~kept & (ft.view(bits) != base.view(bits)))[3]
        got.view(bits)[i] = ft.view(bits)[i]
    if case == "no-base":
        base, got, kept = None, ft.copy(), np.ones(ft.size, bool)
    shape = (50, 100)
    args = [a if a is None else a.reshape(shape) for a in (got, ft, base, kept)]
    flags, change, error = compare_block(*args, code)
    want_flags, want_change, want_error = slow(got, ft, base, kept, code)
    assert flags == want_flags
    assert change == pytest.approx(want_change, rel=1e-12, abs=0)
    assert error == pytest.approx(want_error, rel=1e-12, abs=0)
    # The cases do what they say (the slow statement could share a mistake of the case).
    assert flags & ~DIFFERS == {"kept-wrong": KEPT_DIFFERS,
                                "reset-wrong": RESET_DIFFERS}.get(case, 0)
    assert bool(flags & DIFFERS) == bool((got.view(bits) != ft.view(bits)).any())
    if dtypes.is_float(code) and base is not None:
        assert change > 0 and error > 0


@pytest.mark.parametrize("code", ["F32", "BF16", "F16", "F64"])
def test_shared_infinities_and_nans_add_nothing(code):
    """An inf or a NaN at the same position of the fine-tune and the base (or of the
    rebuilt block and the fine-tune) adds nothing to either norm: a bit-exact lossless
    rebuild has error 0, not NaN or inf; one the base lacks makes the change inf."""
    rng = np.random.default_rng(9)
    base, ft = pair(code, rng, n=400)
    special = dtypes.convert(np.array([np.inf, np.nan, -np.inf], np.float64), "F64", code)
    ft[:3], base[:3] = special, special  # shared by both
    kept = np.ones(ft.size, bool)
    got = ft.copy()
    flags, change, error = compare_block(got.reshape(20, 20), ft.reshape(20, 20),
                                         base.reshape(20, 20), kept.reshape(20, 20), code)
    assert (flags, error) == (0, 0.0) and np.isfinite(change) and change > 0
    assert (flags, change, error) == pytest.approx(slow(got, ft, base, kept, code), rel=1e-12)
    ft[5] = special[0]  # the fine-tune alone holds an inf
    got = ft.copy()
    flags, change, error = compare_block(got.reshape(20, 20), ft.reshape(20, 20),
                                         base.reshape(20, 20), kept.reshape(20, 20), code)
    assert change == np.inf and error == 0.0


def test_compare_block_refuses_arrays_of_other_shapes():
    a = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError):
        compare_block(a, a, np.zeros((4, 5), np.float32), np.ones((4, 4), bool), "F32")


def test_thread_buffers_are_reused_per_thread_and_name():
    from concurrent.futures import ThreadPoolExecutor

    buffers = ThreadBuffers()
    first = buffers.get("x", (4, 8), np.float32)
    first[:] = 1
    again = buffers.get("x", (2, 8), np.uint16)  # smaller: the same memory
    assert np.shares_memory(first, again) and again.shape == (2, 8)
    other = buffers.get("y", (4, 8), np.float32)
    assert not np.shares_memory(first, other)
    grown = buffers.get("x", (64, 8), np.float64)
    assert grown.shape == (64, 8) and grown.flags.c_contiguous
    with ThreadPoolExecutor(1) as pool:
        theirs = pool.submit(buffers.get, "x", (4, 8), np.float32).result()
    assert not np.shares_memory(theirs, grown)
