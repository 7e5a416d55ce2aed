"""Tensor and global budgets end to end: the positions a diff keeps are those of the slow
twin (tests/slow_budget.py, one sort over every tensor in RAM), counts are exact, a tensor
of 100 times the scale does not take the budget, bytes do not depend on runs or threads,
and the setting is recorded, shown, checked on --resume and refused where it has no
meaning."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

import kenstream
from kenstream.cli import main
from tests.ckpt import save_dir
from tests.slow_budget import slow_budget
from tests.test_outputs import executor_module, interrupt_after

KEEP = 0.2


def tensors(seed=0):
    """(base, fine-tune): a matrix, one of 100 times the scale, a vector, an unchanged one."""
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(24, 40, generator=g) * 0.02,
            "big.weight": torch.randn(16, 30, generator=g) * 2.0,
            "c.bias": torch.randn(40, generator=g) * 0.01,
            "same.weight": torch.randn(8, 8, generator=g)}
    scale = {"a.weight": 1e-3, "big.weight": 0.1, "c.bias": 1e-3}
    ft = {n: t + torch.randn(t.shape, generator=g) * scale[n] if n in scale else t.clone()
          for n, t in base.items()}
    # heavier tails in some rows, so that budgets across rows differ from the row budget
    ft["a.weight"][3] += torch.randn(40, generator=g) * 0.01
    ft["big.weight"][:, 5] += 0.5
    return base, ft


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    base, ft = tensors()
    return save_dir(root / "base", base), save_dir(root / "ft", ft), base, ft


def compress(pair, out, *extra) -> int:
    b, f = pair[:2]
    return main(["compress", str(b), str(f), "-o", str(out), "--keep", str(KEEP), "-q",
                 *map(str, extra)])


def kept_masks(pair, diff, tmp) -> dict:
    """name -> kept mask, from the rebuilt model: a position is kept iff it holds the
    fine-tune's value (every changed tensor changed everywhere)."""
    b, _, base, ft = pair
    assert main(["rebuild", str(b), str(diff), "-o", str(tmp), "-q"]) == 0
    rebuilt = load_file(str(tmp / "model.safetensors"))
    out = {}
    for name, t in ft.items():
        if torch.equal(t, base[name]):
            continue
        assert bool((t != base[name]).all()), name
        out[name] = rebuilt[name] == t.numpy()
    return out


def twin(pair, method, budget, ties="scrambled"):
    _, _, base, ft = pair
    rows = [(n, ft[n].numpy().reshape(ft[n].shape[0], -1) if ft[n].ndim > 1
             else ft[n].numpy().reshape(1, -1),
             base[n].numpy().reshape(ft[n].shape[0], -1) if ft[n].ndim > 1
             else base[n].numpy().reshape(1, -1))
            for n in ft if not torch.equal(ft[n], base[n])]
    targets = {n: int(round(KEEP * f.size)) for n, f, _ in rows}
    return {n: m.reshape(ft[n].shape) for n, m in
            slow_budget(rows, method, budget, targets, ties=ties).items()}, targets


@pytest.mark.parametrize("method, ties", [
    ("delta", "scrambled"), ("magnitude", "scrambled"), ("random", "scrambled"),
    ("delta", "positions"), ("random", "positions"), ("delta", "values")])
@pytest.mark.parametrize("budget", ["tensor", "global"])
def test_budget_keeps_the_slow_twins_positions(pair, tmp_path, method, budget, ties):
    d = tmp_path / "diff"
    assert compress(pair, d, "--method", method, "--budget", budget, "--ties", ties) == 0
    want, targets = twin(pair, method, budget, ties)
    got = kept_masks(pair, d, tmp_path / "rebuilt")
    assert set(got) == set(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    index = kenstream.info(d)
    kept = sum(r["kept"] for r in index["tensors"] if r["name"] in want)
    if method == "delta":  # the pair has ties in its cut bins: the modes differ on it
        other = twin(pair, method, budget, "values" if ties == "positions" else "positions")
        assert any(not np.array_equal(other[0][n], want[n]) for n in want)
    if ties == "values":  # the whole cut bin: more, never less
        assert kept == sum(int(m.sum()) for m in want.values()) >= sum(targets.values())
        return
    assert kept == sum(targets.values())  # exact in all
    if budget == "tensor":
        for name in want:
            assert int(got[name].sum()) == targets[name]


def test_global_budget_is_not_taken_by_a_tensor_of_larger_scale(pair, tmp_path):
    """big.weight changes 100 times more than a.weight; unnormalised, |ft - base| would
    give it every kept value. Normalised, its share stays near everybody's."""
    d = tmp_path / "diff"
    assert compress(pair, d, "--method", "delta", "--budget", "global") == 0
    got = kept_masks(pair, d, tmp_path / "rebuilt")
    shares = {name: mask.mean() for name, mask in got.items()}
    assert shares["big.weight"] < 2 * KEEP, shares
    assert all(share > 0.4 * KEEP for share in shares.values()), shares
    # the budget did move between rows: the heavy row of a.weight keeps more than k
    assert got["a.weight"][3].sum() > KEEP * 40 * 1.5


@pytest.mark.parametrize("budget", ["tensor", "global"])
def test_a_cut_bin_of_equal_changes_is_spread_over_rows(tmp_path, budget):
    """Every value of a bf16 matrix changed by one step: the whole tensor is one bin.
    ``positions`` keeps its first rows; the default spreads the keep over every row and
    both halves of the columns."""
    base = torch.full((64, 32), 1.0, dtype=torch.bfloat16)
    ft = base + torch.tensor(2.0 ** -7, dtype=torch.bfloat16)
    b, f = save_dir(tmp_path / "base", {"w": base}), save_dir(tmp_path / "ft", {"w": ft})
    masks = {}
    for ties in ("scrambled", "positions"):
        d = tmp_path / ties
        assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.25", "-q",
                     "--method", "delta", "--budget", budget, "--ties", ties]) == 0
        assert main(["rebuild", str(b), str(d), "-o", str(tmp_path / f"m-{ties}"), "-q"]) == 0
        rebuilt = load_torch(str(tmp_path / f"m-{ties}" / "model.safetensors"))["w"]
        masks[ties] = (rebuilt == ft).numpy()
    assert masks["positions"][:16].all() and not masks["positions"][16:].any()
    per_row = masks["scrambled"].sum(axis=1)
    assert int(per_row.sum()) == 512 and set(per_row.tolist()) == {8}
    assert masks["scrambled"][:, :16].sum() == masks["scrambled"][:, 16:].sum() == 256


def shards(diff) -> dict:
    """The shards' hashes (the index records the command line, which differs)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(diff.iterdir()) if p.suffix == ".kdiff"}


def test_budget_bytes_do_not_depend_on_run_or_threads(pair, tmp_path):
    for j in ("1", "2", "2"):
        d = tmp_path / f"diff-{j}"
        if d.exists():
            d = tmp_path / "diff-again"
        assert compress(pair, d, "--method", "delta", "--budget", "global", "-j", j) == 0
    assert shards(tmp_path / "diff-1") == shards(tmp_path / "diff-2") \
        == shards(tmp_path / "diff-again")


@pytest.mark.parametrize("extra, needle", [
    (["--budget", "global"], "ken chooses within each row"),
    (["--budget", "tensor", "--method", "delta", "--format-version", "1"], "needs format 2"),
])
def test_budget_refuses_what_it_cannot_do(pair, tmp_path, capsys, extra, needle):
    assert compress(pair, tmp_path / "diff", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "diff").exists()


def test_budget_must_be_a_known_one(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compress(pair, tmp_path / "diff", "--budget", "layer")
    assert exc.value.code == 2
    assert "invalid choice: 'layer'" in capsys.readouterr().err


def test_resume_refuses_another_budget(pair, tmp_path, capsys, monkeypatch):
    d = tmp_path / "diff"
    base = ["--method", "delta", "--shard-size", "1kB"]
    interrupt_after(monkeypatch, executor_module, "write_shard", 1)
    assert compress(pair, d, *base, "--budget", "global") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert compress(pair, d, *base, "--budget", "tensor", "--resume") == 2
    err = capsys.readouterr().err
    assert "selection setting budget is 'tensor' here but 'global'" in err, err
    assert compress(pair, d, *base, "--budget", "global", "--resume") == 0
    assert compress(pair, d, *base, "--resume") == 2  # finished, but not with this budget
    assert "selection setting budget is None here but 'global'" in capsys.readouterr().err


def test_resume_refuses_a_plan_of_other_cuts(pair, tmp_path, capsys, monkeypatch):
    """The cuts decide which positions are kept: a plan whose cut counts differ, or one
    written before they were recorded (three numbers), is not finished with these."""
    d = tmp_path / "diff"
    base = ["--method", "delta", "--budget", "global", "--shard-size", "1kB"]
    interrupt_after(monkeypatch, executor_module, "write_shard", 1)
    assert compress(pair, d, *base) == 130
    monkeypatch.undo()
    plan_path = d / "kenstream-diff.partial.json"
    plan = json.loads(plan_path.read_text())
    assert all(len(cut) == 4 for cut in plan["budget"].values())
    for edit, needle in ((lambda cut: cut[:3], "[shift, bin, quota, count]"),
                         (lambda cut: [*cut[:3], cut[3] + 1], "budget cuts differ")):
        changed = dict(plan, budget={n: edit(c) for n, c in plan["budget"].items()})
        plan_path.write_text(json.dumps(changed))
        capsys.readouterr()
        assert compress(pair, d, *base, "--resume") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) <= 2 and needle in err[0] and "partial.json" in err[0], err
    plan_path.write_text(json.dumps(plan))
    assert compress(pair, d, *base, "--resume") == 0


def test_info_shows_the_budget_and_help_its_default(pair, tmp_path, capsys):
    d = tmp_path / "diff"
    assert compress(pair, d, "--method", "random", "--budget", "tensor") == 0
    capsys.readouterr()
    assert main(["info", str(d)]) == 0
    assert "budget=tensor" in capsys.readouterr().out
    assert kenstream.info(d)["selection"]["budget"] == "tensor"
    row = tmp_path / "row"
    assert compress(pair, row, "--method", "delta") == 0
    assert kenstream.info(row)["selection"]["budget"] == "row"
    recorded = json.loads((row / "kenstream-diff.json").read_text())["selection"]
    assert "budget" not in recorded  # the default is recorded as before budgets
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--budget {row,tensor,global}" in text and "row (default)" in text


def test_no_row_warnings_under_a_budget_across_rows(pair, tmp_path, capsys):
    """'keeps one value a row' speaks of the row budget; a global one keeps what it keeps."""
    b, f = pair[:2]
    argv = ["compress", str(b), str(f), "--keep", "0.01", "--method", "delta", "-q"]
    assert main([*argv, "-o", str(tmp_path / "row")]) == 0
    assert "keeps one value a row" in capsys.readouterr().err
    assert main([*argv, "-o", str(tmp_path / "global"), "--budget", "global"]) == 0
    assert "warning" not in capsys.readouterr().err
