"""The command line as a user drives it: exit codes, --json reports, info's figures, the
demo, and interruption."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import pytest
import torch

import kenstream
from kenstream.cli import _recorded, build_parser, main
from tests.ckpt import save_dir, toy_pair
from tests.expect import assert_same_model, expected_model


@pytest.fixture()
def made(tmp_path):
    base, ft = toy_pair(torch.float32)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.3", "-q"]) == 0
    return b, f, d, ft


def test_verify_json_reports_every_tensor(made, capsys):
    b, f, d, ft = made
    assert main(["verify", str(d), "--base", str(b), "--finetuned", str(f), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["problems"] == []
    assert set(report["tensors"]) == set(ft)
    mlp = report["tensors"]["layer.0.mlp.weight"]
    assert mlp["encoding"] == "coded" and mlp["kept_fraction"] == pytest.approx(7 / 24)
    # Each error is ||rebuilt - ft|| / ||ft - base||, the rebuilt model from the slow rule.
    base = toy_pair(torch.float32)[0]
    rebuilt = expected_model(base, ft, keep=0.3)
    for name, row in report["tensors"].items():
        if name not in base or not ft[name].is_floating_point():
            continue
        f64 = ft[name].double()
        error = float((rebuilt[name].double() - f64).norm())
        change = float((f64 - base[name].double()).norm())
        want = error / change if change else (0.0 if error == 0 else float("inf"))
        assert row["rel_error"] == pytest.approx(want, rel=1e-9), name
    assert 0 < mlp["rel_error"] < 1
    # Without a fine-tune there is no error to measure, but the key is there: null (a
    # script reading it met a KeyError).
    assert main(["verify", str(d), "--base", str(b), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["tensors"]
    assert set(alone) == set(ft)
    assert all(row.keys() == mlp.keys() and row["rel_error"] is None for row in alone.values())


def spy_bar(monkeypatch, module: str) -> dict:
    """Replace ``module``'s progress bar with one that records its total, whether it was
    quiet, and the sum of its updates, into the dict returned."""
    import importlib
    from contextlib import contextmanager

    seen = {}

    class Bar:
        disable = False

        def update(self, n):
            seen["counted"] = seen.get("counted", 0) + n

    @contextmanager
    def bar(total, desc, quiet=False):
        seen.update(total=total, quiet=quiet)
        yield Bar()

    monkeypatch.setattr(importlib.import_module(module), "bar", bar)
    return seen


@pytest.mark.parametrize("with_finetuned", [True, False])
def test_verify_counts_every_parameter_on_its_bar(made, monkeypatch, with_finetuned):
    """verify shows progress whether or not it compares with a fine-tune (decoding a large
    diff alone takes minutes): its bar's total is every parameter, and all are counted."""
    b, f, d, ft = made
    seen = spy_bar(monkeypatch, "kenstream.engine.verify")
    kenstream.verify(d, b, f if with_finetuned else None)
    params = sum(t.numel() for t in ft.values())
    assert seen == {"total": params, "quiet": False, "counted": params}


def test_verify_finds_a_changed_kept_value(made, tmp_path, capsys):
    """A fine-tune that differs from the one the diff was made from, at kept positions of
    rows 29 and 33: exit 1, one error line naming the tensor and the first of those rows
    (in the diff's second frame), and --json still prints the report."""
    b, f, d, ft = made
    d2 = tmp_path / "framed"
    kenstream.compress(b, f, d2, keep=0.3, quiet=True, frame_elems=240)  # frames of 10 rows
    index = json.loads((d2 / "kenstream-diff.json").read_text())
    assert index["tensors"]["emb.weight"]["reason"] == "selected"
    changed = dict(ft)
    changed["emb.weight"] = ft["emb.weight"].clone()
    changed["emb.weight"][[29, 33]] += 1.0  # every position of the two rows, kept ones too
    other = save_dir(tmp_path / "other", changed)
    assert main(["verify", str(d2), "--base", str(b), "--finetuned", str(other), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "emb.weight: a kept value differs from the fine-tune (first in row 29)" in err
    assert main(["verify", str(d2), "--base", str(b), "--finetuned", str(other), "--json",
                 "-q"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["problems"] == \
        ["emb.weight: a kept value differs from the fine-tune (first in row 29)"]


def test_verify_takes_the_base_first_as_rebuild_does(made, tmp_path, capsys):
    """`verify BASE DIFF` (options anywhere, as rebuild takes them) checks against that
    base; `verify DIFF --base BASE` still works; any other count of paths is a usage
    error naming both forms."""
    b, f, d, ft = made
    assert main(["verify", str(b), "--finetuned", str(f), str(d), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and set(report["tensors"]) == set(ft)
    assert main(["verify", str(b), str(d), "-q"]) == 0
    assert main(["verify", str(d), "-q", "--base", str(b)]) == 0
    capsys.readouterr()
    other = save_dir(tmp_path / "other", {k: v + 1.0 for k, v in toy_pair(torch.float32)[0].items()})
    assert main(["verify", str(other), str(d), "-q"]) == 2  # the base given first is checked
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not the one this diff was made from" in err
    for argv in (["verify", str(d)], ["verify", str(b), str(d), "--base", str(b)],
                 ["verify", str(b), str(d), str(f)]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "BASE DIFF" in err and "--base" in err, argv
    with pytest.raises(SystemExit):  # an unknown option is still refused
        main(["verify", str(b), str(d), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_info_per_layer_figures_add_up(made, capsys):
    b, f, d, _ = made
    assert main(["info", str(d), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    records = json.loads((d / "kenstream-diff.json").read_text())["tensors"]
    want = defaultdict(lambda: {"params": 0, "selected": 0, "kept": 0, "bytes": 0})
    for name, rec in records.items():
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        layer = want[m.group(1) if m else "other"]
        layer["params"] += rec["rows"] * rec["cols"]
        layer["bytes"] += rec["nbytes"]
        if rec["k"] is not None:  # selected
            layer["selected"] += rec["rows"] * rec["cols"]
            layer["kept"] += rec["kept"]
    assert report["layers"] == dict(want)
    assert main(["info", str(d)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.split()[:1] == ["0"])
    layer0 = want["0"]
    assert f"{layer0['params']:,}" in row
    assert f"{100 * layer0['kept'] / layer0['selected']:.1f}" in row


def test_ctrl_c_exits_130_with_one_line(made, monkeypatch, capsys):
    b, f, d, _ = made

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kenstream, "compress", interrupted, raising=False)
    assert main(["compress", str(b), str(f), "-o", str(d.parent / "x"), "--keep", "0.3",
                 "-q"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted") and err.count("\n") == 1 and "--resume" in err


def test_demo_runs_the_whole_tool(tmp_path, capsys):
    """-q leaves the result line alone (it printed every step and the info table); a bad
    --keep is refused before the example is written (it was written first)."""
    assert main(["demo", str(tmp_path / "bad"), "--keep", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--keep must be a fraction in (0, 1]" in err[0], err
    assert not (tmp_path / "bad").exists()
    assert main(["demo", str(tmp_path / "demo"), "-q"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("OK:"), captured.out
    assert "checked bit for bit" in lines[0] and captured.err == ""
    demo = tmp_path / "demo"
    assert (demo / "diff" / "kenstream-diff.json").exists()
    assert (demo / "rebuilt" / "model.safetensors.index.json").exists()
    assert kenstream.verify(demo / "diff", demo / "base", demo / "finetuned", quiet=True)["ok"]


def test_compress_defaults_to_scrambled_ties(tmp_path):
    """Without --ties, compress keeps exactly k per row with scrambled ties (issue 14): the
    index records it and the rebuilt bf16 model is what the slow twin expects."""
    base, ft = toy_pair(torch.bfloat16)
    b = save_dir(tmp_path / "base", base)
    f = save_dir(tmp_path / "ft", ft)
    d, out = tmp_path / "diff", tmp_path / "out"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.25", "-q"]) == 0
    index = json.loads((d / "kenstream-diff.json").read_text())
    assert index["selection"]["ties"] == "scrambled"
    assert main(["rebuild", str(b), str(d), "-o", str(out), "-q"]) == 0
    assert_same_model(out, expected_model(base, ft, keep=0.25, ties="scrambled"))


def test_executor_thread_and_display_flags_are_not_recorded():
    """They change no byte of a diff, so its recorded command leaves them out (as --resume,
    also written with = or abbreviated, or as -j2)."""
    argv = ["compress", "b", "f", "-o", "d", "--executor", "ray", "--ray-address=h:6379",
            "--keep", "0.5", "--res", "--ray-a", "h:1", "--exe=local", "-q", "-j", "2",
            "-j2", "--threads=4", "--thr", "1", "--quiet", "--debug", "--seed", "-3"]
    assert _recorded(argv) == ["compress", "b", "f", "-o", "d", "--keep", "0.5", "--seed", "-3"]
    # Bundled short options, split as argparse reads them: -q and -j go, -o stays whole.
    for bundle, want in ((["-qj", "2", "-o", "d"], ["-o", "d"]), (["-qj2", "-o", "d"], ["-o", "d"]),
                         (["-qo", "d"], ["-o", "d"]), (["-qod"], ["-o", "d"])):
        assert _recorded(["compress", "b", "f", "--k", "3", *bundle]) == \
            ["compress", "b", "f", "--k", "3", *want], bundle
        parsed = build_parser().parse_args(["compress", "b", "f", "--k", "3", *bundle])
        assert parsed.output == "d"


def test_thread_counts_make_the_same_diff_files(tmp_path):
    """-j 1 and -j 2 (and -q) write the same bytes, index and card included."""
    base, ft = toy_pair(torch.float32)
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    made = {}
    for extra in (["-j", "1", "-q"], ["-j2"]):
        cwd = tmp_path / extra[0]
        cwd.mkdir()
        argv = ["compress", str(b), str(f), "-o", "diff", "--keep", "0.3", *extra]
        old = os.getcwd()
        try:
            os.chdir(cwd)
            assert main(argv) == 0
        finally:
            os.chdir(old)
        made[extra[0]] = {p.name: p.read_bytes() for p in (cwd / "diff").iterdir()
                          if p.is_file() and not p.name.startswith(".")}
    assert made["-j"] == made["-j2"]


@pytest.mark.parametrize("command", ["compress", "rebuild"])
def test_help_names_the_switch_that_turns_direct_reads_off(command, capsys):
    from kenstream.io import direct

    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"{direct.SWITCH}=0" in text and "O_DIRECT" in text


def test_info_lists_blocks_in_numeric_order(tmp_path, capsys):
    """Twelve blocks: block 2 comes before block 10, and the tensors outside every block
    last; `info --tensors`, verify and its JSON list names with their numbers in the same
    order."""
    g = torch.Generator().manual_seed(3)
    base = {f"enc.{i}.w": torch.randn(4, 8, generator=g) for i in range(12)}
    base["embed.w"] = torch.randn(4, 8, generator=g)
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    d = tmp_path / "d"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "1", "-q"]) == 0
    assert main(["info", str(d), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["layers"]) == [str(i) for i in range(12)] + ["other"]
    assert [row["name"] for row in report["tensors"]] == ["embed.w"] + [f"enc.{i}.w" for i in range(12)]
    assert main(["info", str(d)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    assert [line.split()[0] for line in lines[head + 1:head + 14]] == [str(i) for i in range(12)] + ["other"]
    assert main(["verify", str(b), str(d), "--finetuned", str(f)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["tensor"])
    assert [line.split()[0] for line in lines[head + 1:head + 14]] == \
        ["embed.w"] + [f"enc.{i}.w" for i in range(12)]
    assert main(["verify", str(b), str(d), "--finetuned", str(f), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["tensors"]) == \
        ["embed.w"] + [f"enc.{i}.w" for i in range(12)]


def test_verify_json_stays_json_with_infinities_and_nans(tmp_path, capsys):
    """A lossless diff of a fine-tune holding an inf the base lacks and a NaN both share:
    verify --json is strict JSON (no Infinity or NaN), and the tensor's rel_error is 0.0,
    since the rebuilt tensor is the fine-tune bit for bit."""
    g = torch.Generator().manual_seed(8)
    base = {"w": torch.randn(6, 8, generator=g), "v": torch.randn(4, 8, generator=g)}
    base["w"][0, 0] = float("nan")
    ft = {n: t + 0.01 for n, t in base.items()}
    ft["w"][0, 0] = float("nan")
    ft["w"][1, 1] = float("inf")
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "1", "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", str(b), str(d), "--finetuned", str(f), "--json", "-q"]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    report = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert report["tensors"]["w"]["rel_error"] == 0.0
    assert main(["verify", str(b), str(d), "--finetuned", str(f)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("w "))
    assert row.split()[-1] == "0.0000"
    # The base given as the fine-tune: ||ft - base|| is 0 where the rebuilt tensor differs,
    # so the ratio is no number: null in JSON, '-' in the table, and exit 1 as a mismatch.
    assert main(["verify", str(b), str(d), "--finetuned", str(b), "--json", "-q"]) == 1
    report = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert report["tensors"]["v"]["rel_error"] is None and not report["ok"]


def test_names_with_numbers_of_thousands_of_digits(tmp_path, capsys):
    """int() refuses more than 4300 digits; names are data, so info and verify order a
    5000-digit block number by value all the same (after block 2), and 2 before 02."""
    huge = "model.layers.1" + "9" * 5000 + ".x"
    g = torch.Generator().manual_seed(6)
    base = {n: torch.randn(2, 4, generator=g) for n in (huge, "model.layers.2.x",
                                                        "model.layers.02.y")}
    ft = {n: t + 0.1 for n, t in base.items()}
    b, f = save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "1", "-q"]) == 0
    assert main(["info", str(d), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in report["tensors"]] == ["model.layers.2.x", "model.layers.02.y",
                                                      huge]
    assert list(report["layers"]) == ["2", "02", "1" + "9" * 5000]
    assert main(["info", str(d), "--tensors"]) == 0
    assert main(["verify", str(b), str(d), "--finetuned", str(f)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "verify: OK"
