"""KEN selection against the golden vectors in shared/golden (see its README.md).

Every case: `positions` exactly (order included), the value mask (ties="values"), the
position mask (ties="positions" keeps exactly the set of `positions`), the 2-D path
(cases with the same n and k stacked into one matrix), other input dtypes where the
golden row is exactly representable, and the helper fields (bandwidth, grid, rounded
densities through both density paths) to show where a divergence would start.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from kenstream.kernels import _density, _lattice, _rowprep
from kenstream.errors import SelectionError
from kenstream.kernels.ken import select_mask, select_positions

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
INDEX = json.loads((GOLDEN / "index.json").read_text())
NAMES = [case["name"] for case in INDEX["cases"]]


def load(name):
    with np.load(GOLDEN / f"{name}.npz") as z:
        return {key: z[key] for key in z.files}


@pytest.fixture(scope="module")
def cases():
    return {name: load(name) for name in NAMES}


def position_mask(n, positions):
    mask = np.zeros(n, bool)
    mask[positions] = True
    return mask


def test_index_lists_every_file():
    on_disk = sorted(p.stem for p in GOLDEN.glob("*.npz"))
    assert sorted(NAMES) == on_disk
    assert len(NAMES) >= 200


@pytest.mark.parametrize("name", NAMES)
def test_case(cases, name):
    c = cases[name]
    row, k = c["row"], int(c["k"])
    positions = select_positions(row, k)
    assert positions.dtype == np.int64
    np.testing.assert_array_equal(positions, c["positions"])
    np.testing.assert_array_equal(select_mask(row, k, ties="values"), c["mask"])
    by_position = select_mask(row, k)
    np.testing.assert_array_equal(by_position, position_mask(row.size, c["positions"]))
    assert by_position.sum() == min(k, row.size)


def _groups():
    groups = defaultdict(list)
    for case in INDEX["cases"]:
        groups[(case["n"], case["k"])].append(case["name"])
    return sorted(groups.items())


@pytest.mark.parametrize("ties", ["positions", "values"])
def test_matrix_path(cases, ties):
    """Rows of a matrix give each golden row's own result, whatever its neighbours."""
    stacked = 0
    for (n, k), names in _groups():
        names = names + names[:1]  # a repeated row too
        matrix = np.stack([cases[name]["row"] for name in names])
        masks = select_mask(matrix, k, ties=ties)
        for name, mask in zip(names, masks):
            c = cases[name]
            want = c["mask"] if ties == "values" else position_mask(n, c["positions"])
            np.testing.assert_array_equal(mask, want, err_msg=name)
        stacked += len(names)
    assert stacked > len(NAMES)


def test_other_dtypes_where_exact(cases):
    """float64 always, float16 and bfloat16 where the golden row survives the trip."""
    counts = defaultdict(int)
    for name in NAMES:
        c = cases[name]
        row, k, want = c["row"], int(c["k"]), c["positions"]
        np.testing.assert_array_equal(select_positions(row.astype(np.float64), k), want)
        counts["f64"] += 1
        half = row.astype(np.float16)
        if np.array_equal(half.astype(np.float32), row):
            np.testing.assert_array_equal(select_positions(half, k), want, err_msg=name)
            np.testing.assert_array_equal(select_mask(half, k, ties="values"), c["mask"])
            counts["f16"] += 1
        bits = row.view(np.uint32)
        if not np.any(bits & 0xFFFF):
            bf16 = (bits >> 16).astype(np.uint16)
            np.testing.assert_array_equal(select_positions(bf16, k), want, err_msg=name)
            np.testing.assert_array_equal(select_mask(bf16, k, ties="values"), c["mask"])
            tensor = torch.from_numpy(row.copy()).to(torch.bfloat16)
            np.testing.assert_array_equal(select_positions(tensor, k), want, err_msg=name)
            counts["bf16"] += 1
    # Every bf16_dups case is bf16-exact; many are also float16-exact.
    assert counts["bf16"] >= sum(name.startswith("bf16_dups") for name in NAMES)
    assert counts["f16"] >= 20


def _sorted_runs(row):
    v = np.sort(row, kind="stable")
    v[v == 0] = 0.0  # -0.0 sorts and ties with +0.0
    gend = np.searchsorted(v, v, side="right").astype(np.int32)
    return v, gend


@pytest.mark.parametrize("mode", [1, 2])
def test_helper_fields(cases, mode):
    """Bandwidth and grid bit for bit; rounded densities by the exact (1) and the lattice
    (2) density paths equal the golden `density_rounded`."""
    lattice_rows = 0
    for name in NAMES:
        c = cases[name]
        row, k = c["row"], int(c["k"])
        n = row.size
        h, _ = _rowprep.bandwidth(row, np.empty(n, np.float32), np.empty((64, 3), np.int64),
                                  np.empty(64, np.float32))
        assert h == c["bandwidth"], name
        grid = np.empty(k, np.float32)
        step = _rowprep.make_grid(row.min(), row.max(), grid)
        np.testing.assert_array_equal(grid.view(np.uint32), c["grid"].view(np.uint32))
        if k < 3:
            continue
        v, gend = _sorted_runs(row)
        R = np.empty(k)
        exact = _density.rounded_density(
            v, gend, grid, v[0], step, h, R, np.empty(k), np.empty(n), np.empty(n),
            np.empty(k + 3, np.int64),
            np.empty((k + 2, _lattice.MAX_MOMENTS)),
            np.empty((_lattice.MAX_MOMENTS, 4 * k + 3)), mode)
        np.testing.assert_array_equal(R, c["density_rounded"], err_msg=name)
        lattice_rows += exact < k
    if mode == 2:
        assert lattice_rows > 150  # the lattice path really ran on most cases


def test_error_cases():
    """errors/*.npz behave as shared/golden/README.md says kenstream defines them."""
    checked = 0
    for entry in INDEX["errors"]:
        c = load(entry["name"])
        row, k = c["row"], int(c["k"])
        n = row.size
        checked += 1
        if k < 1:
            for ties in ("positions", "values"):
                with pytest.raises(SelectionError):
                    select_mask(row, k, ties=ties)
            with pytest.raises(ValueError):
                select_positions(row, k)
            continue
        positions = select_positions(row, k)
        if k >= n:
            # Whole row kept; positions: every position once (grid points visited after
            # the row runs out of free positions take none).
            assert select_mask(row, k).all()
            assert select_mask(row, k, ties="values").all()
            np.testing.assert_array_equal(np.sort(positions), np.arange(n))
        if np.all(row == row[0]):
            # Zero spread: all grid points sit on the one value, all distances are 0, so
            # the lowest free position is taken each time.
            np.testing.assert_array_equal(positions, np.arange(min(k, n)))
            np.testing.assert_array_equal(select_mask(row, k),
                                          position_mask(n, np.arange(min(k, n))))
            assert select_mask(row, k, ties="values").all()
    assert checked == len(list((GOLDEN / "errors").glob("*.npz"))) == 5
