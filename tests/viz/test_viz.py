"""KENviz: the pictures show exactly what the diff kept.

A real diff is made by ``kenstream.compress`` from a tiny base / fine-tune pair. The kept
mask each test expects is decoded here, independently of the viz code, straight from the
shard bytes (``::mask`` bits or ``::index`` columns) with NumPy; neighbour counts come from
a slow double loop over that mask, block fractions from explicit per-block slices.
"""

from __future__ import annotations

import json
from pathlib import Path
import math
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import kenstream  # noqa: E402
from kenstream import viz  # noqa: E402
from kenstream.viz import draw  # noqa: E402
from kenstream.cli import main  # noqa: E402
from kenstream.errors import KenstreamError  # noqa: E402
from tests.format import reference_v2  # noqa: E402

SHAPES = {
    "enc.layer.0.w": (6, 8),
    "enc.layer.1.w": (6, 8),
    "enc.layer.2.w": (6, 8),
    "enc.layer.0.odd": (7, 13),
    "enc.layer.1.bias": (13,),
    "emb.big": (3000, 2000),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diff dir, base dir, base arrays, fine-tune arrays) of one real compress run."""
    root = tmp_path_factory.mktemp("viz")
    rng = np.random.default_rng(7)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    ft = {n: a + rng.standard_normal(a.shape).astype(np.float32) * np.float32(0.05)
          for n, a in base.items()}
    for sub, tensors in (("base", base), ("ft", ft)):
        (root / sub).mkdir()
        save_file(tensors, str(root / sub / "model.safetensors"))
    kenstream.compress(root / "base", root / "ft", root / "diff", keep=0.4, quiet=True)
    return root / "diff", root / "base", base, ft


def stored_mask(diff, name) -> np.ndarray:
    """Bool [rows, cols] kept mask decoded from the shard by hand (docs/format.md 2.2 and 6)."""
    rec = json.loads((diff / "kenstream-diff.json").read_text())["tensors"][name]
    if "frames" in rec:
        return reference_v2.stored_mask(diff, name)
    rows, cols = rec["rows"], rec["cols"]
    with safe_open(str(diff / rec["shard"]), "np") as sf:  # the position entries only
        entries = {k: sf.get_tensor(k) for k in sf.keys()
                   if k.startswith(name + "::") and not k.endswith("::values")}
    mask = np.zeros((rows, cols), dtype=bool)
    if rec["encoding"] == "bitmask":
        packed = entries[f"{name}::mask"]
        j = np.arange(cols)
        mask[:] = (packed[:, j // 8] >> (j % 8).astype(np.uint8)) & 1
    else:
        assert rec["encoding"] == "indices"
        counts = entries.get(f"{name}::counts", np.full(rows, rec["row_kept"]))
        cols_of = entries[f"{name}::index"]
        pos = 0
        for r in range(rows):
            for j in cols_of[pos:pos + int(counts[r])]:
                mask[r, int(j)] = True
            pos += int(counts[r])
    return mask


def slow_neighbors(mask) -> np.ndarray:
    rows, cols = mask.shape
    out = np.full((rows, cols), np.nan)
    for r in range(rows):
        for c in range(cols):
            if mask[r, c]:
                out[r, c] = sum(1 for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                                if 0 <= r + dr < rows and 0 <= c + dc < cols
                                and mask[r + dr, c + dc])
    return out


def slow_block_mean(values, weights, br, bc) -> np.ndarray:
    """Per-block sum(values) / sum(weights), NaN where the weights sum to 0."""
    rows, cols = values.shape
    out = np.full((math.ceil(rows / br), math.ceil(cols / bc)), np.nan)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            w = weights[i * br:(i + 1) * br, j * bc:(j + 1) * bc].sum()
            if w:
                out[i, j] = values[i * br:(i + 1) * br, j * bc:(j + 1) * bc].sum() / w
    return out


def is_white(rgba) -> np.ndarray:
    return np.all(rgba[..., :3] > 0.99, axis=-1)


# -- matrix view ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["enc.layer.0.odd", "enc.layer.1.bias", "enc.layer.2.w"])
def test_matrix_image_is_the_stored_mask(pair, name):
    diff, *_ = pair
    mask = stored_mask(diff, name)
    img = viz.matrix_image(diff, name)
    assert img.kind == "mask" and img.block == (1, 1) and img.shape == mask.shape
    assert img.kept == mask.sum()
    np.testing.assert_array_equal(np.isfinite(img.data), mask)


def test_raw_png_is_non_white_exactly_where_kept(pair, tmp_path):
    diff, *_ = pair
    mask = stored_mask(diff, "enc.layer.0.odd")
    assert 0 < mask.sum() < mask.size
    out = viz.render(diff, "enc.layer.0.odd", "matrix", tmp_path / "m.png", raw=True)
    pixels = mpimg.imread(out)
    assert pixels.shape[:2] == (7, 13)
    np.testing.assert_array_equal(~is_white(pixels), mask)


def test_figure_draws_the_mask_and_saves_a_png(pair, tmp_path):
    diff, *_ = pair
    mask = stored_mask(diff, "enc.layer.0.odd")
    fig = viz.figure(diff, "enc.layer.0.odd", "matrix")
    drawn = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(~np.ma.getmaskarray(drawn), mask)
    out = viz.render(diff, "enc.layer.0.odd", "matrix", tmp_path / "fig.png")
    pixels = mpimg.imread(out)
    kept_rgb = np.array(matplotlib.colors.to_rgb(draw.KEPT_COLOR))
    # The kept colour fills about as many screen pixels as the mask's share of the axes.
    painted = np.all(np.abs(pixels[..., :3] - kept_rgb) < 0.02, axis=-1).sum()
    assert painted > 0 and pixels.shape[0] > 100


@pytest.mark.parametrize("color", ["value", "change"])
def test_colours_by_value_or_change_from_the_base(pair, color):
    diff, base_dir, base, ft = pair
    name = "enc.layer.0.odd"
    mask = stored_mask(diff, name)
    img = viz.matrix_image(diff, name, base=base_dir, color=color)
    want = ft[name] - (base[name] if color == "change" else 0)
    assert img.kind == color
    np.testing.assert_array_equal(np.isfinite(img.data), mask)
    np.testing.assert_allclose(img.data[mask], want[mask], rtol=1e-6)


def test_aggregated_change_is_the_block_mean_over_kept_positions(pair):
    diff, base_dir, base, ft = pair
    name = "enc.layer.0.odd"
    mask = stored_mask(diff, name)
    img = viz.matrix_image(diff, name, base=base_dir, color="change", max_pixels=4)
    assert img.block == (2, 4) and img.kind == "mean change" and img.data.shape == (4, 4)
    change = np.where(mask, ft[name] - base[name], 0.0)
    np.testing.assert_allclose(img.data, slow_block_mean(change, mask, 2, 4), rtol=1e-5)


def test_big_tensor_fraction_per_pixel_is_the_block_mean(pair):
    diff, *_ = pair
    mask = stored_mask(diff, "emb.big")
    # Small row blocks: the streaming path must stitch many of them.
    img = viz.matrix_image(diff, "emb.big", max_pixels=256, block_elems=50_000)
    assert img.block == (12, 8) and img.data.shape == (250, 250) and img.kind == "fraction"
    ones = np.ones(mask.shape)
    np.testing.assert_allclose(img.data, slow_block_mean(mask.astype(float), ones, 12, 8))
    assert "1 pixel = 12 x 8 positions" in img.scale
    fig = viz.figure(diff, "emb.big", "matrix", max_pixels=256)
    texts = [t.get_text() for ax in fig.axes for t in (ax.xaxis.label, ax.title)]
    assert any("1 pixel = 12 x 8 positions" in t for t in texts)


def test_partial_edge_blocks_use_their_true_size(pair):
    diff, *_ = pair
    mask = stored_mask(diff, "emb.big")
    img = viz.matrix_image(diff, "emb.big", max_pixels=7)  # 3000/429, 2000/286: ragged edges
    br, bc = img.block
    assert 3000 % br and 2000 % bc
    np.testing.assert_allclose(img.data, slow_block_mean(mask.astype(float), np.ones(mask.shape),
                                                         br, bc))


# -- neighbours -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["enc.layer.0.odd", "enc.layer.1.bias", "enc.layer.0.w"])
def test_neighbor_counts_match_a_double_loop(pair, name):
    diff, *_ = pair
    mask = stored_mask(diff, name)
    img = viz.neighbor_image(diff, name)
    np.testing.assert_array_equal(img.data, slow_neighbors(mask))


def test_neighbor_kernel_on_a_hand_made_mask():
    mask = np.array([[1, 1, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=bool)
    want = np.array([[1, 2, -1], [-1, 2, -1], [1, 3, 2], [-1, -1, 1]], dtype=np.int8)
    np.testing.assert_array_equal(viz.neighbor_counts(mask), want)


def test_raw_neighbor_png_uses_one_colour_per_count(pair, tmp_path):
    diff, *_ = pair
    want = slow_neighbors(stored_mask(diff, "enc.layer.0.odd"))
    pixels = mpimg.imread(viz.render(diff, "enc.layer.0.odd", "neighbors", tmp_path / "n.png",
                                     raw=True))[..., :3]
    palette = np.array([matplotlib.colors.to_rgb(c) for c in draw.NEIGHBOR_COLORS])
    for r in range(want.shape[0]):
        for c in range(want.shape[1]):
            if np.isnan(want[r, c]):
                assert is_white(pixels[r, c])
            else:
                np.testing.assert_allclose(pixels[r, c], palette[int(want[r, c])], atol=1 / 255)


def test_aggregated_neighbors_stream_with_overlap(pair):
    diff, *_ = pair
    mask = stored_mask(diff, "emb.big")
    # row blocks of 24 rows: many seams
    img = viz.neighbor_image(diff, "emb.big", max_pixels=250, block_elems=60_000)
    assert img.block == (12, 8) and img.kind == "mean neighbors"
    m = mask.astype(np.int32)
    counts = np.zeros_like(m)
    counts[1:] += m[:-1]
    counts[:-1] += m[1:]
    counts[:, 1:] += m[:, :-1]
    counts[:, :-1] += m[:, 1:]
    # Spot-check the vectorised reference against the double loop on a corner.
    np.testing.assert_array_equal(np.where(mask, counts, np.nan)[:30, :30],
                                  slow_neighbors(mask[:31, :31])[:30, :30])
    np.testing.assert_allclose(img.data, slow_block_mean(np.where(mask, counts, 0), m, 12, 8))


# -- layers -----------------------------------------------------------------------------

def test_layer_templates():
    names = ["m.layers.10.q.weight", "m.layers.2.q.weight", "m.layers.2.k.weight",
             "m.layers.0.q.weight", "m.layers.x.q.weight"]
    want = {0: "m.layers.0.q.weight", 2: "m.layers.2.q.weight", 10: "m.layers.10.q.weight"}
    assert viz.layer_tensors(names, "m.layers.{n}.q.weight") == want
    assert viz.layer_tensors(names, "m.layers.2.q.weight") == want
    with pytest.raises(KenstreamError, match=r"\{n\}"):
        viz.layer_tensors(names, "lm_head.weight")


def test_layers_figure_has_one_panel_per_layer(pair):
    diff, *_ = pair
    for tensor in ("enc.layer.{n}.w", "enc.layer.1.w"):
        fig = viz.figure(diff, tensor, "layers")
        titles = sorted(ax.get_title() for ax in fig.axes if ax.get_title())
        assert titles == ["layer 0", "layer 1", "layer 2"]
        for ax in fig.axes:
            if ax.get_title():
                n = int(ax.get_title().split()[1])
                drawn = ax.images[0].get_array()
                np.testing.assert_array_equal(~np.ma.getmaskarray(drawn),
                                              stored_mask(diff, f"enc.layer.{n}.w"))


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_layer_grid_is_about_square(n):
    img = viz.MatrixImage(np.ones((3, 4)), "mask", (1, 1), (3, 4), 12)
    fig = draw.layers_figure({i: img for i in range(n)}, "x.{n}.w")
    panels = [ax for ax in fig.axes if ax.get_title().startswith("layer ")]
    assert len(panels) == n
    rows, cols = panels[0].get_subplotspec().get_gridspec().get_geometry()
    assert cols == math.ceil(math.sqrt(n)) and rows * cols >= n > (rows - 1) * cols


# -- summary ----------------------------------------------------------------------------

def test_summary_has_one_bar_per_tensor_and_layer(pair):
    diff, *_ = pair
    records = json.loads((diff / "kenstream-diff.json").read_text())["tensors"]
    fig = viz.figure(diff, None, "summary")
    by_title = {ax.get_title(): ax for ax in fig.axes}
    per_tensor = by_title["kept fraction per tensor"]
    assert len(per_tensor.patches) == len(records) == len(SHAPES)
    widths = [p.get_width() for p in per_tensor.patches]
    want = [r["kept"] / (r["rows"] * r["cols"]) for r in records.values()]
    np.testing.assert_allclose(widths, want)
    assert len(by_title["diff bytes per tensor"].patches) == len(records)
    labels = [t.get_text() for t in by_title["kept fraction per layer"].get_xticklabels()]
    assert labels == ["0", "1", "2", "other"]


@pytest.mark.parametrize("version", [1, 2])
def test_summary_colours_tensors_by_how_the_diff_holds_them(tmp_path, version):
    """A pruned tensor, one stored whole (new in the fine-tune) and one unchanged have
    their own colours and legend entries in either format (format 2 codes every stored
    tensor, so its encoding told them apart no more)."""
    import matplotlib.colors as mcolors

    rng = np.random.default_rng(3)
    base = {"a.w": rng.standard_normal((6, 8)).astype(np.float32),
            "same.w": rng.standard_normal((4, 8)).astype(np.float32)}
    ft = {"a.w": base["a.w"] + np.float32(0.1), "same.w": base["same.w"],
          "head.w": rng.standard_normal((3, 8)).astype(np.float32)}
    for sub, tensors in (("b", base), ("f", ft)):
        (tmp_path / sub).mkdir()
        save_file(tensors, str(tmp_path / sub / "model.safetensors"))
    diff = tmp_path / "d"
    kenstream.compress(tmp_path / "b", tmp_path / "f", diff, keep=0.5, quiet=True,
                       format_version=version)
    fig = viz.figure(diff, None, "summary")
    ax = {a.get_title(): a for a in fig.axes}["kept fraction per tensor"]
    names = [t.get_text() for t in ax.get_yticklabels()]
    colour = {n: mcolors.to_hex(p.get_facecolor()) for n, p in zip(names, ax.patches)}
    assert len(set(colour.values())) == 3, colour
    assert colour["a.w"] == draw.KEPT_COLOR.lower()
    legend = fig.axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["selected by the rule",
                                                          "stored whole"]
    handles = legend.legend_handles
    assert mcolors.to_hex(handles[1].get_facecolor()) == colour["head.w"]


def test_summary_groups_by_first_layer_number():
    from kenstream.format.records import TensorRecord

    def rec(shape, kept, nbytes):
        rows, cols = (1, shape[0]) if len(shape) == 1 else shape
        return TensorRecord("b", "bitmask", "selected", "F32", shape, rows, cols, 1, kept, None,
                            "s.kdiff", nbytes)

    records = {"a.3.w": rec((2, 5), 4, 40), "a.3.b": rec((5,), 1, 10),
               "a.10.w": rec((2, 5), 10, 5), "head.w": rec((4,), 0, 0)}
    tensors, layers = viz.summary_table(records)
    assert list(layers) == ["3", "10", "other"]
    assert layers["3"] == {"params": 15, "kept": 5, "bytes": 50, "fraction": 5 / 15}
    assert tensors["a.10.w"]["fraction"] == 1.0


# -- command line and errors ------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    ["--tensor", "enc.layer.0.odd"],
    ["--tensor", "enc.layer.0.odd", "--view", "neighbors"],
    ["--tensor", "enc.layer.{n}.w", "--view", "layers"],
    ["--view", "summary"],
    ["--tensor", "emb.big", "--max-pixels", "64", "--color", "change"],
])
def test_cli_writes_a_png(pair, tmp_path, extra):
    diff, base_dir, *_ = pair
    out = tmp_path / "sub" / "v.png"
    argv = ["viz", str(diff), "-o", str(out), "-q", *extra]
    if "--color" in extra:
        argv += ["--base", str(base_dir)]
    assert main(argv) == 0
    pixels = mpimg.imread(out)
    assert pixels.ndim == 3 and (~is_white(pixels)).any() and is_white(pixels).any()


def test_cli_unknown_tensor_is_a_one_line_error(pair, tmp_path, capsys):
    diff, *_ = pair
    out = tmp_path / "x.png"
    assert main(["viz", str(diff), "--tensor", "enc.layer.0.odds", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and "enc.layer.0.odds" in err
    assert "enc.layer.0.odd'" in err  # the close match is suggested
    assert not out.exists()


def test_cli_layers_without_a_match_and_summary_needs_no_tensor(pair, tmp_path, capsys):
    diff, *_ = pair
    assert main(["viz", str(diff), "--tensor", "dec.{n}.w", "--view", "layers",
                 "-o", str(tmp_path / "l.png")]) == 2
    assert "matches" in capsys.readouterr().err
    assert main(["viz", str(diff), "-o", str(tmp_path / "m.png")]) == 2
    assert "--tensor" in capsys.readouterr().err


def test_unknown_picture_format_is_a_one_line_error(pair, tmp_path, capsys):
    diff, *_ = pair
    assert main(["viz", str(diff), "--view", "summary", "-o", str(tmp_path / "s.pnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ".pnx" in err and ".png" in err


def test_change_without_a_base_is_refused(pair, tmp_path, capsys):
    diff, *_ = pair
    assert main(["viz", str(diff), "--tensor", "enc.layer.0.w", "--color", "change",
                 "-o", str(tmp_path / "c.png")]) == 2
    assert "--base" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_missing_matplotlib_says_how_to_install(pair, tmp_path, monkeypatch, capsys):
    diff, *_ = pair
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(KenstreamError, match=r"pip install 'kenstream\[viz\]'"):
        viz.render(diff, "enc.layer.0.odd", "matrix", tmp_path / "a.png")
    assert main(["viz", str(diff), "--tensor", "enc.layer.0.odd",
                 "-o", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'kenstream[viz]'" in err


@pytest.mark.parametrize("case,name", [("ken-k3-values", "model.layers.1.coarse.weight"),
                                       ("random-keep0.01", "model.embed.weight"),
                                       ("random-keep0.01", "model.layers.1.long.bias")])
def test_indices_tensors_draw_their_stored_columns(case, name):
    """Tensors stored as column indices (with and without per-row counts, U16 and U32
    columns) draw exactly the positions their index entries list."""
    diff = Path(__file__).resolve().parents[1] / "data" / "v1" / case
    rec = json.loads((diff / "kenstream-diff.json").read_text())["tensors"][name]
    assert rec["encoding"] == "indices"
    mask = stored_mask(diff, name)
    img = viz.matrix_image(diff, name, max_pixels=100_000, block_elems=500)
    np.testing.assert_array_equal(img.data, np.where(mask, 1.0, np.nan))
    neighbors = viz.neighbor_image(diff, name, max_pixels=100_000, block_elems=500)
    np.testing.assert_array_equal(neighbors.data, slow_neighbors(mask))
