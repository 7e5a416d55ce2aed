"""What a user trips over (issue 14): --help states defaults and explains choices, 25% is a
share, a finished diff refuses a --resume with other settings, settings that do not do what
they seem to ask are warned about, a closed pipe is no error, and the demo says it compiles
only when it will."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import kenstream
from kenstream.cli import build_parser, main
from kenstream.errors import DiffError
from kenstream.settings import METHODS
from tests.ckpt import save_dir, toy_pair


@pytest.fixture()
def pair(tmp_path):
    base, ft = toy_pair(torch.float32)
    return save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _option_block(text: str, flag: str) -> str:
    """The help lines of the option spelled ``flag`` (up to the next option)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.strip().startswith(flag) or f", {flag}" in line)
    end = start + 1
    while end < len(lines) and not lines[end].strip().startswith("-"):
        end += 1
    return " ".join(" ".join(lines[start:end]).split())


@pytest.mark.parametrize("command", ["compress", "rebuild", "verify", "info", "demo", "viz"])
def test_help_states_every_default_and_explains_every_option(command, capsys):
    sub = _subparsers(build_parser())[command]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help text"
        default = action.default
        if default is None or default is False:
            continue
        block = _option_block(text, action.option_strings[-1])
        assert "default" in block and str(default) in block, (command, block)


def test_method_help_explains_every_choice(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    block = _option_block(capsys.readouterr().out, "--method")
    for method in METHODS:
        assert f"{method}:" in block or f"{method} (default):" in block, method


def test_keep_takes_a_percentage(pair, tmp_path):
    b, f = pair
    a, c = tmp_path / "a", tmp_path / "c"
    assert main(["compress", str(b), str(f), "-o", str(a), "--keep", "25%", "-q"]) == 0
    assert main(["compress", str(b), str(f), "-o", str(c), "--keep", "0.25", "-q"]) == 0
    for name in ("kenstream-diff.json",):
        one, two = (json.loads((d / name).read_text()) for d in (a, c))
        assert one["selection"] == two["selection"] and one["selection"]["keep"] == 0.25
    assert sorted(p.name for p in a.glob("*.safetensors")) == \
        sorted(p.name for p in c.glob("*.safetensors"))
    for p in a.glob("*.safetensors"):
        assert p.read_bytes() == (c / p.name).read_bytes()


@pytest.mark.parametrize("text", ["a quarter", "1_0%", "0_5", "nan", "0x1", "\u0660.\u0665"])
def test_keep_refuses_what_is_no_share(pair, tmp_path, capsys, text):
    """Decimal notation only: float() alone takes '1_0', 'nan' and other scripts' digits."""
    b, f = pair
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(b), str(f), "-o", str(tmp_path / "d"), "--keep", text])
    assert exc.value.code == 2
    assert "0.25 or 25%" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_keep_reads_decimal_notation_and_percentages():
    from kenstream.settings import parse_keep

    for text, value in (("0.25", 0.25), (" .5 ", 0.5), ("1.", 1.0), ("2.5e-1", 0.25),
                        ("+0.5", 0.5), ("25%", 0.25), (" 25 % ", 0.25), ("1e1%", 0.1)):
        assert parse_keep(text) == value, text


@pytest.mark.parametrize("change, named", [
    (["--keep", "0.5"], "selection setting keep is 0.5 here but 0.3"),
    (["--keep", "0.3", "--ties", "positions"], "selection setting ties"),
    (["--keep", "0.3", "--level", "5"], "coding setting level is 5 here but"),
    (["--keep", "0.3", "--shard-size", "1GB"], "shard size is 1000000000 here"),
    (["--keep", "0.3", "--format-version", "1"], "format version is 1 here but 2"),
])
def test_resume_of_a_finished_diff_with_other_settings_refuses(pair, tmp_path, capsys, change,
                                                                named):
    b, f = pair
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.3", "-q"]) == 0
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    capsys.readouterr()
    assert main(["compress", str(b), str(f), "-o", str(d), *change, "--resume", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_resume_of_a_finished_diff_with_another_base_refuses(pair, tmp_path, capsys):
    b, f = pair
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.3", "-q"]) == 0
    capsys.readouterr()
    assert main(["compress", str(f), str(f), "-o", str(d), "--keep", "0.3", "--resume",
                 "-q"]) == 2
    assert "the base files differ from the finished diff" in capsys.readouterr().err


def test_resume_of_a_finished_diff_with_the_same_settings_is_a_no_op(pair, tmp_path, capsys):
    b, f = pair
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.3", "-q"]) == 0
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "30%", "--resume"]) == 0
    out = capsys.readouterr()
    assert "already a complete diff" in out.err and "wrote" not in out.out
    assert out.out.startswith(f"found {d}: kept "), out.out  # it said 'wrote': nothing was
    rebuilt = tmp_path / "rebuilt"
    assert main(["rebuild", str(b), str(d), "-o", str(rebuilt)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {rebuilt}: ")
    assert main(["rebuild", str(b), str(d), "-o", str(rebuilt), "--resume"]) == 0
    out = capsys.readouterr()
    assert "already rebuilt" in out.err and out.out.startswith(f"found {rebuilt}: "), out
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def _warnings(argv, capsys) -> list:
    assert main(argv) == 0
    return [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("warning: ")]


def test_warns_when_k_keeps_whole_rows(pair, tmp_path, capsys):
    """toy_pair's rows have 24 values, but for the conv's (35)."""
    b, f = pair
    lines = _warnings(["compress", str(b), str(f), "-o", str(tmp_path / "d"), "--k", "24",
                       "-q"], capsys)
    whole = [line for line in lines if "keeps every value" in line]
    assert len(whole) == 1 and "--k 24" in whole[0]
    index = json.loads((tmp_path / "d" / "kenstream-diff.json").read_text())
    # The plan counts the float tensors it would select, also those found identical later.
    selected = [r for r in index["tensors"].values() if r["reason"] == "selected"
                or (r["reason"] == "identical" and r["dtype"] in ("F32", "F16", "BF16"))]
    short = [r for r in selected if 1 < r["cols"] <= 24]
    assert 0 < len(short) and f"of {len(short)} of {len(selected)} selected" in whole[0]
    assert not _warnings(["compress", str(b), str(f), "-o", str(tmp_path / "e"), "--k", "3",
                          "-q"], capsys)


def test_warns_when_keep_leaves_one_value_a_row(pair, tmp_path, capsys):
    b, f = pair
    lines = _warnings(["compress", str(b), str(f), "-o", str(tmp_path / "d"), "--keep",
                       "0.01", "-q"], capsys)
    single = [line for line in lines if "keeps one value a row" in line]
    assert len(single) == 1 and "keep more than the 0.01 asked" in single[0]
    assert not _warnings(["compress", str(b), str(f), "-o", str(tmp_path / "e"), "--keep",
                          "0.5", "-q"], capsys)


def test_warns_when_include_selects_nothing(pair, tmp_path, capsys):
    b, f = pair
    lines = _warnings(["compress", str(b), str(f), "-o", str(tmp_path / "d"), "--keep", "0.5",
                       "--include", "no-such-tensor", "-q"], capsys)
    assert any("--include 'no-such-tensor' selects no tensor" in line for line in lines)
    assert not _warnings(["compress", str(b), str(f), "-o", str(tmp_path / "e"), "--keep",
                          "0.5", "--include", "mlp", "-q"], capsys)


def test_a_closed_pipe_is_no_error(pair, tmp_path):
    """``kenstream info --json | head -1``: the reader leaves; exit 141 (as a shell reports
    SIGPIPE), nothing on stderr."""
    b, f = pair
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.3", "-q"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "kenstream", "info", str(d), "--json",
                             "--tensors"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the program has written anything: its first write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_compiled_reads_numba_cache(tmp_path):
    from kenstream import kernels

    kernels.select("ken", torch.randn(2, 8).numpy(), 3)  # compiled and cached now
    assert kernels.compiled() is True
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "empty-cache"))
    out = subprocess.run([sys.executable, "-c", "import kenstream.kernels as k; "
                          "print(k.compiled())"], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("budget", ["row", "global"])
@pytest.mark.parametrize("cold", [True, False])
def test_compress_compiles_before_its_bar_and_says_so_only_when_it_will(
        pair, tmp_path, capsys, monkeypatch, cold, budget):
    """A machine without the kernel in numba's cache compiles it for half a minute: the
    user is told, and it happens before the bar starts (else the bar sits at 0 and then
    promises hours). With the kernel cached, neither."""
    import importlib

    module = importlib.import_module("kenstream.engine.compress")
    events = []
    kernels = importlib.import_module("kenstream.kernels")
    monkeypatch.setattr(kernels, "compiled", lambda method, budget: not cold)
    monkeypatch.setattr(kernels, "warm_up", lambda method, budget: events.append(method))
    real_bar = module.bar

    def bar(*args, **kwargs):
        events.append("bar")
        return real_bar(*args, **kwargs)

    monkeypatch.setattr(module, "bar", bar)
    b, f = pair
    assert main(["compress", str(b), str(f), "-o", str(tmp_path / "d"), "--keep", "0.3",
                 "--method", "delta", "--budget", budget]) == 0
    said = capsys.readouterr().err.count("compiling kenstream's kernels")
    assert said == int(cold)
    bars = ["bar"] * (1 if budget == "row" else 2)  # a budget's scores pass has a bar first
    assert events == (["delta", *bars] if cold else bars)


@pytest.mark.parametrize("cold", [True, False])
def test_rebuild_and_verify_say_when_they_compile_the_decoder(pair, tmp_path, capsys,
                                                              monkeypatch, cold):
    import importlib

    b, f = pair
    d = tmp_path / "d"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.3", "-q"]) == 0
    monkeypatch.setattr(importlib.import_module("kenstream.format.v2"), "decoder_compiled",
                        lambda: not cold)
    capsys.readouterr()
    for argv in (["rebuild", str(b), str(d), "-o", str(tmp_path / "r")],
                 ["verify", str(b), str(d)], ["verify", str(b), str(d), "--finetuned", str(f)],
                 ["verify", str(b), str(d), "-q"]):
        assert main(argv) == 0
        said = "compiling kenstream's decoder" in capsys.readouterr().err
        assert said is (cold and "-q" not in argv), argv


_WARM_CHECK = """
import sys
from numba.core.registry import CPUDispatcher
from kenstream import kernels
from kenstream.cli import main
from kenstream.format import v2
from kenstream.kernels import codec, pack, scores

method, budget, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]

def signatures():
    found = {method: set(kernels._selection_kernel(method, budget).signatures)}
    for module in (codec, pack, scores):
        for name, obj in vars(module).items():
            if isinstance(obj, CPUDispatcher):
                found[module.__name__ + "." + name] = set(obj.signatures)
    return found

kernels.warm_up(method, budget)
for code in ("BF16", "F32"):
    v2.warm_up(code)
warmed = signatures()
assert warmed[method], "warm_up compiled no selection kernel"
for i in range(0, len(pairs), 3):
    b, f, out = pairs[i:i + 3]
    assert main(["compress", b, f, "-o", out, "--keep", "0.3", "--method", method,
                 "--budget", budget, "-q", "-j", "2"]) == 0
added = {k: v - warmed.get(k, set()) for k, v in signatures().items() if v != warmed.get(k)}
assert not added, added
"""


@pytest.mark.parametrize("method,budget", [(m, "row") for m in METHODS]
                         + [("delta", "global"), ("random", "tensor")])
def test_warm_up_compiles_the_signatures_compress_runs(tmp_path, method, budget):
    """Every dtype shares one compiled signature of a rule's kernel, and the coder's
    kernels have one a dtype width: warmed up for bf16 and float32, compress then has
    nothing left to compile (or load from the cache) for either. In a process of its
    own, which has loaded no kernel before the warm-up."""
    argv = []
    for dtype in (torch.bfloat16, torch.float32):
        base, ft = toy_pair(dtype)
        argv += [str(save_dir(tmp_path / f"b{dtype}", base)),
                 str(save_dir(tmp_path / f"f{dtype}", ft)), str(tmp_path / f"d{dtype}")]
    done = subprocess.run([sys.executable, "-c", _WARM_CHECK, method, budget, *argv],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_swapped_paths_are_named_as_such(pair, tmp_path, capsys):
    """A model folder where the diff goes (the base and the diff swapped, on the command
    line or in ``kenstream.verify(diff, base)``) is named as a model, with a hint to check
    the order; it said only 'not a kenstream diff'."""
    b, f = pair
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.3", "-q"]) == 0
    for argv in (["verify", str(d), str(b)], ["rebuild", str(d), str(b), "-o",
                                              str(tmp_path / "out")]):
        assert main(argv + ["-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {b}: "), err
        assert "it holds a model, not a kenstream diff" in err[0]
        assert "are the paths swapped?" in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(DiffError, match="are the paths swapped"):
        kenstream.verify(b, d, quiet=True)


def test_a_diff_where_a_model_goes_is_named_as_a_diff(pair, tmp_path, capsys):
    """A diff folder given as BASE (or as the fine-tune) said only 'found no
    model.safetensors ...': it is named as a kenstream diff, as a model where the diff goes
    is named as a model."""
    b, f = pair
    d = tmp_path / "diff"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.3", "-q"]) == 0
    out = tmp_path / "out"
    for argv in (["rebuild", d, d, "-o", out], ["verify", d, d],
                 ["compress", d, f, "-o", out, "--keep", "0.3"],
                 ["compress", b, d, "-o", out, "--keep", "0.3"]):
        assert main([str(a) for a in argv] + ["-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {d}: holds kenstream-diff.json: it is a kenstream diff, not a "
                       "model (pass a model folder here: rebuild and verify take BASE DIFF, "
                       "compress takes BASE FINETUNED)"], err
        assert not out.exists()


def test_dir_of_the_package_shows_its_api():
    """The API is imported lazily (no kernels compiled for --help); dir() listed none of it,
    so tab completion showed nothing."""
    for name in ("compress", "compress_to_size", "rebuild", "load", "verify", "info",
                 "select_mask", "render", "KenstreamError", "__version__"):
        assert name in dir(kenstream), name
        assert name in kenstream.__all__ or name == "__version__"


def test_the_base_of_every_error_is_exported(pair, tmp_path):
    """API users catch what the CLI reports in one line as ``kenstream.KenstreamError``
    (it had to be imported from kenstream.errors)."""
    from kenstream.errors import KenstreamError

    assert kenstream.KenstreamError is KenstreamError
    b, f = pair
    with pytest.raises(kenstream.KenstreamError):
        kenstream.compress(b, tmp_path / "nowhere", tmp_path / "out", keep=0.5, quiet=True)


def test_status_lines_count_and_round_as_people_read(tmp_path, capsys):
    """'aligned 1 tensors', 'in 1 passes', 'keep=0.015754414425381908' and '(-% of
    selected)' read badly; the counts agree with their nouns and keeps have 6 digits."""
    from kenstream.reports import print_info
    from kenstream.text import counted

    assert [counted(n, w) for n, w in ((1, "pass"), (2, "pass"), (1, "tensor"),
                                       (1200, "tensor"))] == \
        ["1 pass", "2 passes", "1 tensor", "1,200 tensors"]
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(4, 8, generator=g)}
    b = save_dir(tmp_path / "b", base)
    f = save_dir(tmp_path / "f", {"w": base["w"] + 0.01})
    d = tmp_path / "d"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.5"]) == 0
    assert "aligned 1 tensor (1 by exact name)" in capsys.readouterr().err
    report = kenstream.info(d)
    report["selection"]["keep"] = 0.015754414425381908
    report["totals"]["selected"] = 0
    print_info(report)
    out = capsys.readouterr().out
    assert "keep=0.0157544 ties=scrambled " in out and "% of selected" not in out, out
    # No tie mode where none applies (random draws in a row); a budget across rows
    # breaks the ties of its cut bin by it, random's too.
    for method, budget, shown in (("random", "row", False), ("delta", "global", True),
                                  ("random", "tensor", True)):
        report["selection"].update(method=method, budget=budget)
        print_info(report)
        line = next(ln for ln in capsys.readouterr().out.splitlines()
                    if ln.startswith("selection:"))
        assert ("ties=scrambled" in line) == shown and f"budget={budget}" in line, line


def test_tables_widen_their_name_column_to_the_longest_name(tmp_path, capsys):
    """info --tensors and verify's table had fixed name columns (48, 60): a longer name, as
    MoE experts have, pushed its row out of line with the header."""
    g = torch.Generator().manual_seed(3)
    long = "model.layers.11.block_sparse_moe.experts.7.feed_forward.w2.weight"
    base = {long: torch.randn(4, 8, generator=g), "w": torch.randn(4, 8, generator=g)}
    b = save_dir(tmp_path / "b", base)
    f = save_dir(tmp_path / "f", {n: t + 0.01 for n, t in base.items()})
    d = tmp_path / "d"
    assert main(["compress", str(b), str(f), "-o", str(d), "--keep", "0.5", "-q"]) == 0
    capsys.readouterr()
    for argv, header in ((["info", str(d), "--tensors"], "tensor "),
                         (["verify", str(b), str(d), "--finetuned", str(f)], "tensor ")):
        assert main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        top = next(i for i, ln in enumerate(lines) if ln.startswith(header))
        table = [ln for ln in lines[top:] if ln.split()[0] in ("tensor", long, "w")]
        assert len(table) == 3 and len({len(ln) for ln in table}) == 1, table
