"""--size: the diff lands within [0.98, 1] x the request, measured on the files written;
the request's forms and the refusals."""

from __future__ import annotations

import hashlib
import importlib
import json

import pytest
import torch

from kenstream.cli import main
from kenstream.engine import size as size_mod
from kenstream.engine.size import compress_to_size
from kenstream.errors import OutputError
from kenstream.io.outputs import SEARCH_NAME
from tests.ckpt import save_dir


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("size")
    g = torch.Generator().manual_seed(5)
    base = {f"l{i}.weight": torch.randn(96, 160, generator=g) * 0.02 for i in range(4)}
    base["l0.bias"] = torch.randn(160, generator=g) * 0.01
    base["emb"] = torch.randn(50, 64, generator=g).to(torch.bfloat16)
    ft = {n: (t.float() + torch.randn(t.shape, generator=g) * 2e-3).to(t.dtype)
          for n, t in base.items()}
    return save_dir(root / "base", base), save_dir(root / "ft", ft), ft


def on_disk(diff) -> int:
    """Bytes of the diff's shards, from the file system."""
    return sum(p.stat().st_size for p in diff.iterdir() if p.suffix == ".kdiff")


def run(pair, out, *extra):
    b, f = pair[:2]
    return main(["compress", str(b), str(f), "-o", str(out), "-q", *map(str, extra)])


@pytest.mark.parametrize("extra", [("--method", "delta", "--budget", "global"),
                                   ("--method", "random", "--budget", "tensor"),
                                   ("--method", "magnitude",),
                                   ("--method", "ken",)])
@pytest.mark.parametrize("request_", ["60kB", "20%"])
def test_size_lands_just_under_the_request(pair, tmp_path, capsys, extra, request_):
    d = tmp_path / "diff"
    assert run(pair, d, "--size", request_, *extra) == 0
    ft_bytes = sum(t.numel() * t.element_size() for t in pair[2].values())
    want = 60_000 if request_ == "60kB" else int(ft_bytes * 0.2)
    got = on_disk(d)
    assert 0.98 * want <= got <= want, (got, want)
    out = capsys.readouterr().out
    assert "chose keep" in out and f"{got:,} bytes" in out


def test_size_at_or_over_the_lossless_diff_keeps_everything(pair, tmp_path, capsys):
    d = tmp_path / "diff"
    assert run(pair, d, "--size", "100%", "--method", "delta") == 0
    assert "every value is kept" in capsys.readouterr().out
    lossless = tmp_path / "lossless"
    assert run(pair, lossless, "--keep", "1", "--method", "delta") == 0
    assert on_disk(d) == on_disk(lossless)


@pytest.mark.parametrize("value, needle", [
    ("200B", "below the smallest diff these settings make"),
    ("lots", "is not a size such as 300MB, 1.5G or 10%"),
    ("0%", "is not a share in (0%, 100%]"),
    ("150%", "is not a share in (0%, 100%]"),
    ("9" * 400, "is too large: at most 2**63 - 1 bytes"),
])
def test_size_refuses_what_it_cannot_reach(pair, tmp_path, capsys, value, needle):
    assert run(pair, tmp_path / "diff", "--size", value, "--method", "delta") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and needle in err[0], err
    # No diff of another size is left behind looking like the answer (the passes wrote one).
    assert not (tmp_path / "diff").exists()


def test_size_floor_names_exclude_only_where_tensors_are_excluded(pair, tmp_path, capsys):
    """The floor's hint suggests --exclude fewer tensors only to a run that excludes some
    (it said so to every run)."""
    for extra, named in (([], False), (["--exclude", "nothing-matches-this"], True)):
        assert run(pair, tmp_path / "diff", "--size", "200B", *extra) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
        assert len(err) == 1 and "below the smallest diff" in err[0], err
        assert ("--exclude fewer tensors" in err[0]) == named, err


def test_size_refusal_leaves_the_users_other_files(pair, tmp_path, capsys):
    d = tmp_path / "diff"
    assert run(pair, d, "--keep", "0.5") == 0
    (d / "notes.txt").write_text("mine")
    assert run(pair, d, "--size", "200B", "--overwrite") == 2
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_size_excludes_keep(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(pair, tmp_path / "diff", "--size", "10%", "--keep", "0.5")
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def tree(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())}


class Stop(KeyboardInterrupt):
    """Raised by a test to interrupt a pass."""


@pytest.fixture(scope="module")
def whole_search(pair, tmp_path_factory):
    """An uninterrupted search's folder (file name -> sha256) and its passes' keeps; the
    command line is the same as the tests' (the output is the relative path ``diff``)."""
    cwd = tmp_path_factory.mktemp("whole")
    keeps = []
    real = size_mod.compress

    def counting(*args, **kwargs):
        keeps.append(kwargs["keep"])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(size_mod, "compress", counting)
        assert run(pair, "diff", *SEARCH) == 0
    assert len(keeps) >= 3, keeps  # enough passes to interrupt one in the middle
    return tree(cwd / "diff"), keeps


SEARCH = ("--size", "58kB", "--shard-size", "20kB")


def interrupted(pair, monkeypatch, tmp_path, at: int, where: str) -> list:
    """Run the search in ``tmp_path/diff`` and stop it in pass ``at`` (1-based): ``'before'``
    it starts, or ``'inside'`` it (its shards written, its index not). Returns the keeps
    the passes ran with."""
    compress_mod = importlib.import_module("kenstream.engine.compress")
    keeps, real, real_copy = [], size_mod.compress, compress_mod.copy_files

    def counting(*args, **kwargs):
        keeps.append(kwargs["keep"])
        if len(keeps) == at and where == "before":
            raise Stop()
        return real(*args, **kwargs)

    def copy_files(*args, **kwargs):
        if len(keeps) == at:
            raise Stop()
        return real_copy(*args, **kwargs)

    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as mp:
        mp.setattr(size_mod, "compress", counting)
        mp.setattr(compress_mod, "copy_files", copy_files)
        with pytest.raises(Stop):
            compress_to_size(pair[0], pair[1], "diff", SEARCH[1], shard_size="20kB", quiet=True,
                             command=["kenstream", "compress", str(pair[0]), str(pair[1]),
                                      "-o", "diff", *SEARCH])  # as the CLI records it
    return keeps


def resumed(pair, monkeypatch) -> list:
    keeps, real = [], size_mod.compress

    def counting(*args, **kwargs):
        keeps.append((kwargs["keep"], kwargs["resume"]))
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(size_mod, "compress", counting)
        assert run(pair, "diff", *SEARCH, "--resume") == 0
    return keeps


@pytest.mark.parametrize("at, where", [(2, "inside"), (3, "before"), (3, "inside")])
def test_size_interrupted_resumes_into_the_same_bytes(pair, whole_search, tmp_path,
                                                      monkeypatch, capsys, at, where):
    """A search stopped inside a pass, or between two, resumes: the finished passes are
    not run again, the stopped one is finished with --resume, and every file of the
    folder (the record included) matches an uninterrupted search's."""
    ref, ref_keeps = whole_search
    assert interrupted(pair, monkeypatch, tmp_path, at, where) == ref_keeps[:at]
    # The record names the pass that holds the folder: the stopped one, or the one before.
    first = at - 1 if where == "inside" else at - 2
    record = json.loads((tmp_path / "diff" / SEARCH_NAME).read_text())
    assert [p[0] for p in record["passes"]] == ref_keeps[:first]
    assert record["running"] == ref_keeps[first]
    assert (tmp_path / "diff" / "kenstream-diff.partial.json").exists() == (where == "inside")
    capsys.readouterr()
    again = resumed(pair, monkeypatch)
    assert again == [(k, i == 0) for i, k in enumerate(ref_keeps[first:])]
    assert tree(tmp_path / "diff") == ref
    assert json.loads((tmp_path / "diff" / SEARCH_NAME).read_text())["running"] is None


def test_size_resume_of_a_finished_search_checks_it(pair, whole_search, tmp_path,
                                                    monkeypatch, capsys):
    ref, ref_keeps = whole_search
    monkeypatch.chdir(tmp_path)
    assert run(pair, "diff", *SEARCH) == 0
    capsys.readouterr()
    assert resumed(pair, monkeypatch) == [(ref_keeps[-1], True)]  # checked, not rewritten
    assert tree(tmp_path / "diff") == ref
    assert f"in {len(ref_keeps)} passes" in capsys.readouterr().out


def test_size_resume_starts_again_when_no_pass_is_left(pair, whole_search, tmp_path,
                                                       monkeypatch, capsys):
    """The running pass's plan and index are gone (killed between its claim of the folder
    and its plan file): the search starts over, into the same bytes."""
    ref, ref_keeps = whole_search
    interrupted(pair, monkeypatch, tmp_path, 2, "inside")
    (tmp_path / "diff" / "kenstream-diff.partial.json").unlink()
    again = resumed(pair, monkeypatch)
    assert [k for k, _ in again] == ref_keeps and not any(r for _, r in again)
    assert tree(tmp_path / "diff") == ref


def test_size_resume_refuses_another_request_or_a_plain_compress(pair, tmp_path,
                                                                 monkeypatch, capsys):
    interrupted(pair, monkeypatch, tmp_path, 2, "inside")
    before = tree(tmp_path / "diff")
    assert run(pair, "diff", "--size", "40kB", "--shard-size", "20kB", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "asked for 58,000 bytes, this run asks for 40,000" in err
    assert tree(tmp_path / "diff") == before
    # An unfinished plain compress holds no search: --size --resume refuses it, untouched.
    plain = tmp_path / "plain"
    assert run(pair, plain, "--keep", "0.5") == 0
    (plain / "kenstream-diff.json").unlink()
    before = tree(plain)
    assert run(pair, plain, *SEARCH, "--resume") == 2
    assert "holds no --size search to resume" in capsys.readouterr().err
    assert tree(plain) == before


def test_size_resume_into_a_new_folder_searches(pair, whole_search, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(pair, "diff", *SEARCH, "--resume") == 0
    assert tree(tmp_path / "diff") == whole_search[0]


def test_a_plain_compress_over_a_search_drops_its_record(pair, tmp_path, monkeypatch):
    interrupted(pair, monkeypatch, tmp_path, 2, "inside")
    assert run(pair, "diff", "--keep", "0.5", "--overwrite") == 0
    assert not (tmp_path / "diff" / SEARCH_NAME).exists()


def test_size_units():
    from kenstream.engine.size import parse_request

    assert parse_request("1.5G", 10) == 1_500_000_000
    assert parse_request("300MB", 10) == 300_000_000
    assert parse_request("2MiB", 10) == 2 * 2**20
    assert parse_request("10%", 1000) == 100
    # --shard-size takes the same forms: rebuild's --help gives 500M as an example.
    from kenstream.settings import parse_size

    assert parse_size("500M") == 500_000_000 and parse_size("1.5G") == 1_500_000_000
    assert parse_size("2KiB") == 2048 and parse_size("7") == 7


def test_size_warns_about_the_keep_it_chose_not_a_keep_asked(pair, tmp_path, capsys):
    """A small size makes some rows keep one value; the warning names the size's keep,
    once, not a --keep the user never typed (nor the keeps of discarded passes)."""
    assert run(pair, tmp_path / "diff", "--size", "9kB") == 0
    captured = capsys.readouterr()
    chosen = captured.out.split("chose keep ")[1].split()[0]
    warns = [line for line in captured.err.splitlines() if line.startswith("warning")]
    assert warns == [f"warning: the keep --size chose, {chosen}, keeps one value a row in 1 "
                     "tensor (e.g. emb, rows of 64)"], warns


def test_size_reports_the_plan_once_and_every_pass(pair, tmp_path, capsys):
    """Without -q the passes say what they do: the plan's line once, a line a pass."""
    b, f = pair[:2]
    assert main(["compress", str(b), str(f), "-o", str(tmp_path / "diff"), "--size", "60kB"]) == 0
    err = capsys.readouterr().err.splitlines()
    passes = [line for line in err if line.startswith("--size pass ")]
    assert len([line for line in err if line.startswith("aligned ")]) == 1, err
    assert len(passes) >= 2 and passes[0].startswith("--size pass 1: keep "), err


def test_the_second_pass_solves_a_model_fitted_to_the_first():
    """After one pass the keep comes from its size split (fixed bytes, values in proportion
    to the keep, positions in proportion to the entropy of keeping): checked against a
    dense grid solve of the same model, written out here."""
    import numpy as np

    from kenstream.engine.size_search import AIM, _modelled_keep, _next_keep

    selected, k1 = 1_000_000, 0.2
    fixed, per_value, per_choice = 30_000, 1.5, 0.12

    def entropy(p):
        return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))

    kept = int(k1 * selected)
    values, positions = int(per_value * kept), int(per_choice * selected * entropy(k1))
    got = fixed + values + positions
    model = [values, positions, kept, selected]
    grid = np.linspace(1e-4, 0.5, 2_000_001)
    sizes = fixed + values / kept * grid * selected \
        + positions / (selected * entropy(k1)) * selected * entropy(grid)
    for target in (150_000, 250_000, 400_000):
        want = grid[np.searchsorted(sizes, AIM * target)]
        k = _next_keep([(k1, got)], target, model)
        assert k == _modelled_keep(k1, got, model, AIM * target)
        assert abs(k - want) < 1e-6, (target, k, want)
        assert abs(k - k1 * AIM * target / got) > 1e-3  # not the proportional guess
    # Without a split (or with nothing selected) the guess stays proportional.
    assert _next_keep([(k1, got)], 250_000) == pytest.approx(k1 * AIM * 250_000 / got)
    assert _next_keep([(k1, got)], 250_000, [0, 0, 0, 0]) == \
        pytest.approx(k1 * AIM * 250_000 / got)


def test_short_rows_skip_keeps_whose_diff_a_pass_measured():
    """A row budget keeps round(keep * cols) values a row, so keeps within one step make
    the same diff. Inside a bracket the search moves to a keep of a new signature, or
    stops when the bracket holds none, instead of running a diff it has measured."""
    from kenstream.engine.size_search import decide, _signature, _unmeasured

    assert _signature(0.1003, [100, 1000]) == (10, 100)
    assert _signature(0.1008, [100, 1000]) == (10, 101)
    target = 1000
    # The secant (aim 990) falls at 0.10048, whose signature (10, 100) is the first pass's;
    # (10, 101) lies between the bracket's ends and is found.
    passes = [(0.1, 900), (0.1016, 1200)]
    found = _unmeasured(0.10048, passes, target, [100, 1000])
    assert _signature(found, [100, 1000]) == (10, 101) and 0.1 < found < 0.1016
    assert decide(passes, target, 10_000, "1kB", None, [100, 1000]) == ("run", found)
    # Between (10, 100) and (10, 101) there is nothing else: the search rewrites the
    # largest diff under the request (the first pass) rather than repeat one.
    passes = [(0.1, 900), (0.1006, 1200)]
    assert _unmeasured(0.10018, passes, target, [100, 1000]) is None
    assert decide(passes, target, 10_000, "1kB", None, [100, 1000]) == ("run", 0.1)
    assert decide(passes + [(0.1, 900)], target, 10_000, "1kB", None, [100, 1000]) == \
        ("done", 0.1, False)
    # Without steps (tensor and global budgets) the secant keep is run as it is.
    assert decide(passes, target, 10_000, "1kB")[0] == "run"
    assert decide(passes, target, 10_000, "1kB")[1] == pytest.approx(0.10018)
    # Before a bracket exists, a keep of a measured signature moves to the nearest step
    # past every pass on the request's side: down from the smallest keep when all are
    # over, up from the largest when all are under.
    down = _unmeasured(0.0999, [(0.1, 1200)], target, [100])
    assert _signature(down, [100]) == (9,) and down > 0.0949
    up = _unmeasured(0.1001, [(0.2, 600), (0.1, 800)], target, [100])
    assert _signature(up, [100]) == (21,) and up < 0.2051
    # The secant after two passes over the request (0.0996, in the second pass's step)
    # becomes the step below it, as a whole search: a new diff, not a repeat.
    passes = [(0.2, 2000), (0.1016, 1010)]
    kind, keep = decide(passes, target, 10_000, "1kB", None, [100])
    assert kind == "run" and _signature(keep, [100]) == (9,) and keep > 0.0949
    # No step left that way: the keep is returned as it is (the caller's bounds apply).
    assert _unmeasured(0.999, [(0.996, 800)], target, [100]) == 0.999
    assert _unmeasured(2e-6, [(0.004, 1200)], target, [100]) == 2e-6


def test_a_request_under_one_value_a_row_stops_at_once():
    """Every pass over the request, and the smallest keep tried already keeps one value in
    every row (rows of 100 and 1000 values at keep 0.0004): no smaller keep can make a
    smaller diff, so the search says so instead of running passes that repeat that diff."""
    from kenstream.engine.size_search import decide
    from kenstream.errors import SelectionError

    for passes in ([(0.0004, 1200)], [(0.3, 5000), (0.0004, 1200)],
                   [(0.0004, 1200), (0.0003, 1200)]):
        with pytest.raises(SelectionError, match="below the smallest diff these settings "
                                                 "make: 1,200 bytes at keep 0.000[34]"):
            decide(passes, 1000, 10_000, "1kB", None, [100, 1000])
    # A keep that keeps two values in the longer rows still has a step down to take.
    assert decide([(0.0016, 1200)], 1000, 10_000, "1kB", None, [100, 1000])[0] == "run"
    # Tensor and global budgets have no steps: the search goes on down.
    assert decide([(0.0004, 1200)], 1000, 10_000, "1kB")[0] == "run"
    # A row budget that selects nothing (every tensor excluded): no keep changes the diff.
    with pytest.raises(SelectionError, match="below the smallest diff these settings make"):
        decide([(0.3, 1200)], 1000, 10_000, "1kB", None, [])


def test_size_just_under_the_smallest_diff_is_refused_in_few_passes(pair, tmp_path, capsys):
    """A request one byte under the diff that keeps one value a row (measured here with
    --keep 1e-6) is refused with that size named, after at most three passes."""
    floor = tmp_path / "floor"
    assert run(pair, floor, "--keep", "1e-6", "--method", "delta") == 0
    smallest = on_disk(floor)
    b, f = pair[:2]
    code = main(["compress", str(b), str(f), "-o", str(tmp_path / "diff"), "--method", "delta",
                 "--size", f"{smallest - 1}B"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    passes = [line for line in err if line.startswith("--size pass ")]
    assert 1 <= len(passes) <= 3, err
    errors = [line for line in err if line.startswith("error")]
    assert len(errors) == 1 and f"smallest diff these settings make: {smallest:,} bytes" \
        in errors[0], err
    assert not (tmp_path / "diff").exists()


def test_a_search_on_short_rows_runs_no_diff_twice_before_its_bracket(pair, tmp_path):
    """At 25 kB the ken search's second pass lands just over the request, and keeps a
    little lower make the same diff (rows of 64 and 160 values). Each later pass must
    make a diff no pass has made (only the final rewrite of the best pass under the
    request may repeat one): the search once ran the same 25,057-byte diff five times."""
    d = tmp_path / "diff"
    assert run(pair, d, "--size", "25kB", "--method", "ken") == 0
    passes = json.loads((d / SEARCH_NAME).read_text())["passes"]
    sizes = [got for _, got in passes]
    under = [got for got in sizes if got <= 25_000]
    body = sizes[:-1] if sizes[-1] in sizes[:-1] and sizes[-1] == max(under) else sizes
    assert len(body) == len(set(body)), sizes
    assert on_disk(d) == sizes[-1] <= 25_000


def test_finetuned_bytes_counts_all_tensors_and_the_float_ones_apart(tmp_path):
    """``--size N%`` is a share of every tensor's bytes; the first guess scales the float
    tensors' bytes only: 4x8 F32 (128) + 3 BF16 (6) are float, 5 I64 (40) are not."""
    from kenstream.engine.size import finetuned_bytes

    f = save_dir(tmp_path / "ft", {"w": torch.zeros(4, 8), "ids": torch.arange(5),
                                   "b": torch.zeros(3, dtype=torch.bfloat16)})
    assert finetuned_bytes(f) == (174, 134)


VALID_RECORD = {"format": "kenstream-size", "requested": 60_000, "passes": [[0.5, 70_000]],
                "model": [1, 2, 3, 4], "steps": [64, 160], "running": 0.3}


@pytest.mark.parametrize("edit", [
    {"format": "kenstream-diff"}, {"requested": "60000"}, {"requested": None},
    {"steps": [64, True]}, {"steps": [0, 160]}, {"steps": "64"},
    {"model": [1, 2, 3]}, {"model": [1, 2, 3, True]}, {"model": [1, 2, 3, 4.0]},
    {"running": 1.5}, {"running": True}, {"passes": "[]"}, {"passes": [[0.5]]},
    {"passes": [[0.0, 70_000]]}, {"passes": [[0.5, 7e4]]}, {"passes": [[True, 70_000]]},
])
def test_size_resume_refuses_a_damaged_record(pair, tmp_path, edit):
    """A ``.kenstream-size`` record that this version would not write (a field of the
    wrong type, a keep outside (0, 1], a model of other than 4 counts, a step of 0) is
    refused as damaged, and the folder is left as it is."""
    out = tmp_path / "diff"
    out.mkdir()
    (out / SEARCH_NAME).write_text(json.dumps(dict(VALID_RECORD, **edit)))
    before = tree(out)
    with pytest.raises(OutputError, match="the --size record is damaged"):
        compress_to_size(pair[0], pair[1], out, "60kB", quiet=True, resume=True)
    assert tree(out) == before


def test_size_resume_refuses_a_record_that_is_not_an_object(pair, tmp_path):
    out = tmp_path / "diff"
    out.mkdir()
    (out / SEARCH_NAME).write_text(json.dumps([VALID_RECORD]))
    with pytest.raises(OutputError, match="the --size record is damaged"):
        compress_to_size(pair[0], pair[1], out, "60kB", quiet=True, resume=True)


def test_every_pass_after_the_first_decides_with_the_first_pass_split(pair, tmp_path,
                                                                      monkeypatch):
    """The second pass's keep comes from the first pass's size split (its index's values
    and positions bytes, kept and selected counts), and a row budget's skips from the
    selected rows' lengths (rows of 64 and 160 in ``pair``): both are taken from the first
    pass and handed, unchanged, to every later pass's record and to the finished one."""
    indexes, records = [], []
    real = size_mod.compress

    def spy(*args, **kwargs):
        records.append(kwargs["search"])
        indexes.append(real(*args, **kwargs))
        return indexes[-1]

    monkeypatch.setattr(size_mod, "compress", spy)
    compress_to_size(pair[0], pair[1], tmp_path / "diff", "60kB", quiet=True)
    assert len(indexes) >= 2
    totals = indexes[0]["totals"]
    split = [totals[k] for k in ("values_bytes", "positions_bytes", "kept", "selected")]
    assert records[0]["model"] is None and records[0]["steps"] is None
    for rec in records[1:]:
        assert rec["model"] == split and rec["steps"] == [64, 160]
    final = json.loads((tmp_path / "diff" / SEARCH_NAME).read_text())
    assert final["model"] == split and final["steps"] == [64, 160]


def test_size_resume_says_which_pass_it_takes_up(pair, whole_search, tmp_path, monkeypatch,
                                                 capsys):
    """Without -q a resumed search says the pass it finishes (the second, at the second
    keep of the uninterrupted search); resuming the finished search resumes no pass."""
    ref_keeps = whole_search[1]
    interrupted(pair, monkeypatch, tmp_path, 2, "inside")
    capsys.readouterr()
    b, f = pair[:2]
    argv = ["compress", str(b), str(f), "-o", "diff", *SEARCH, "--resume"]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"--size: resuming pass 2 (keep {ref_keeps[1]:.6g})" in err, err
    assert main(argv) == 0
    assert not [line for line in capsys.readouterr().err.splitlines()
                if "resuming pass" in line]


def test_size_resume_refuses_a_folder_of_other_files(pair, tmp_path):
    """--resume into a folder that holds no search record but the user's own files is
    refused, and leaves them."""
    out = tmp_path / "diff"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds no --size search to resume"):
        compress_to_size(pair[0], pair[1], out, "60kB", quiet=True, resume=True)
    assert tree(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_a_lossless_search_resumes(pair, tmp_path, monkeypatch):
    """A request over the lossless diff is met by one pass at keep 1, which its record
    holds; resuming that finished search accepts the record and checks, not rewrites."""
    out = tmp_path / "diff"
    index = compress_to_size(pair[0], pair[1], out, "10MB", quiet=True)
    assert index["size"]["lossless"] and index["size"]["keep"] == 1.0
    assert json.loads((out / SEARCH_NAME).read_text())["passes"][0][0] == 1.0
    before = tree(out)
    resumes = []
    real = size_mod.compress
    monkeypatch.setattr(size_mod, "compress",
                        lambda *a, **kw: resumes.append(kw["resume"]) or real(*a, **kw))
    again = compress_to_size(pair[0], pair[1], out, "10MB", quiet=True, resume=True)
    assert resumes == [True] and again["size"] == index["size"] and tree(out) == before



def test_decide_at_the_floors_of_a_search_without_steps():
    """Tensor and global budgets (no steps): a pass at the smallest keep still over the
    request ends the search with the floor's refusal; one at that keep under the request
    (but short of the window) goes on up; a pass at the floor's keep that selected nothing
    at all (kept 0 of its values) falls back on the proportional guess."""
    from kenstream.engine.size_search import MIN_KEEP, decide, _next_keep
    from kenstream.errors import SelectionError

    with pytest.raises(SelectionError, match=r"below the smallest diff these settings make: "
                                             r"1,200 bytes at keep 1e-06"):
        decide([(MIN_KEEP, 1200)], 1000, 10_000, "1kB")
    kind, keep = decide([(MIN_KEEP, 500)], 1000, 10_000, "1kB")
    assert kind == "run" and keep == pytest.approx(MIN_KEEP * 990 / 500)
    assert _next_keep([(0.2, 500)], 1000, [0, 0, 0, 1000]) == pytest.approx(0.2 * 990 / 500)


def test_decide_with_a_bracket_is_no_floor():
    """Row budget: the last pass is over the request but an earlier one, at a keep of one
    value a row, is under it. The floor's refusal is for every pass over the request:
    here the search goes on inside the bracket."""
    from kenstream.engine.size_search import decide

    kind, keep = decide([(0.004, 900), (0.3, 5000)], 1000, 10_000, "1kB", None, [100])
    assert kind == "run" and 0.004 < keep < 0.3


def test_decide_out_of_passes_with_none_under_the_request_refuses():
    """MAX_PASSES passes, every diff over the request and none at the smallest keep: the
    search has nothing to settle for and says so."""
    from kenstream.engine.size_search import MAX_PASSES, decide
    from kenstream.errors import SelectionError

    passes = [(0.9 - 0.1 * i, 2000 - 10 * i) for i in range(MAX_PASSES)]
    with pytest.raises(SelectionError, match=r"--size 1kB: no keep tried in 8 passes made a "
                                             r"diff of at most 1,000 bytes"):
        decide(passes, 1000, 10_000, "1kB")


def test_next_keep_after_two_passes_on_one_side_is_their_secant():
    """Two passes over the request (3,000 bytes at keep 0.5, 2,000 at 0.4; aim 990): the
    line through them reaches 990 bytes at 0.4 - 1010 / 10000 = 0.299. Two passes of one
    size or one keep have no line: the proportional guess 0.4 * 990 / 2000 = 0.198."""
    from kenstream.engine.size_search import _next_keep

    assert _next_keep([(0.5, 3000), (0.4, 2000)], 1000) == pytest.approx(0.299)
    assert _next_keep([(0.5, 2000), (0.4, 2000)], 1000) == pytest.approx(0.198)
    assert _next_keep([(0.4, 3000), (0.4, 2000)], 1000) == pytest.approx(0.198)


def test_the_model_of_a_pass_that_kept_every_value():
    """A first pass at keep 1 (a request under the lossless diff, of more than two thirds
    of the float bytes) selected every value: its positions cost nothing (no choice was
    made), and the model is the fixed 200 bytes plus 0.9 a value: 990 at keep 0.8778."""
    from kenstream.engine.size_search import _next_keep

    assert _next_keep([(1.0, 1100)], 1000, [900, 0, 1000, 1000]) == \
        pytest.approx((990 - 200) / 900)


def test_next_keep_past_every_pass_when_the_line_points_nowhere():
    """Two passes whose line meets the aim at a keep of 0 or less (the diff grew as the
    keep fell, or fell as it grew): the next keep moves past every pass on the side of the
    request, a quarter of the last keep down (all over) or four times it up (all under)."""
    from kenstream.engine.size_search import _next_keep

    assert _next_keep([(0.2, 1200), (0.1, 1100)], 1000) == pytest.approx(0.025)
    assert _next_keep([(0.1, 600), (0.2, 500)], 1000) == pytest.approx(0.8)


def test_unmeasured_bisects_past_measured_signatures_on_either_side():
    """Rows of 3 and 4 values: ``k`` is (1, 2) up to keep 0.5, (2, 2) to 0.625, (2, 3) to
    0.8333, (3, 3) to 0.875, then (3, 4). A keep of a measured signature inside the bracket
    moves by bisection to the narrow unmeasured step beyond a wide measured one, whichever
    end of the bracket that wide step belongs to."""
    from kenstream.engine.size_search import _signature, _unmeasured

    steps = [3, 4]
    # (2, 3) at 0.63 under, (3, 4) at 0.9 over: 0.765 and 0.8325 are (2, 3), 0.86625 is new.
    found = _unmeasured(0.7, [(0.63, 900), (0.9, 1200)], 1000, steps)
    assert found == pytest.approx(0.86625) and _signature(found, steps) == (3, 3)
    # (1, 2) at 0.49 under, (2, 3) at 0.83 over: 0.66 is (2, 3), 0.575 is new.
    found = _unmeasured(0.8, [(0.49, 900), (0.83, 1200)], 1000, steps)
    assert found == pytest.approx(0.575) and _signature(found, steps) == (2, 2)


def test_the_window_includes_both_its_ends():
    """The search ends at a diff within [0.98, 1] x the request, both ends included."""
    from kenstream.engine.size_search import decide

    assert decide([(0.5, 980)], 1000, 10_000, "1kB") == ("done", 0.5, False)
    assert decide([(0.5, 1000)], 1000, 10_000, "1kB") == ("done", 0.5, False)
    assert decide([(0.5, 979)], 1000, 10_000, "1kB")[0] == "run"


def test_next_keep_inside_a_bracket():
    """With passes under and over the request the next keep is the secant between the
    nearest of each (not the last two passes): 0.1 + 90 x 0.2 / 400 = 0.145 between
    (0.1, 900) and (0.3, 1300), whatever pass came last. A secant within 5% of the
    bracket's width from one end bisects instead: 0.1073 from (0.1, 975) gives 0.2."""
    from kenstream.engine.size_search import _next_keep

    assert _next_keep([(0.1, 900), (0.3, 1300), (0.5, 2000)], 1000) == pytest.approx(0.145)
    assert _next_keep([(0.1, 975), (0.3, 1385)], 1000) == pytest.approx(0.2)


def test_a_model_under_the_aim_even_at_keep_1_says_keep_1():
    """A first pass whose model reaches only 650 bytes at keep 1 (450 fixed, 0.2 a value
    of 1,000, positions free at keep 1) for an aim of 990: the next keep is 1, not the
    proportional 0.5 x 990 / 600."""
    from kenstream.engine.size_search import _next_keep

    assert _next_keep([(0.5, 600)], 1000, [100, 50, 500, 1000]) == 1.0


def test_size_request_of_a_share_that_is_no_number_is_refused():
    from kenstream.engine.size import parse_request
    from kenstream.errors import SelectionError

    with pytest.raises(SelectionError, match=r"--size 'abc%' is not a share in \(0%, 100%\]"):
        parse_request("abc%", 1000)


def test_a_tensor_budget_search_has_no_steps_and_format_1_no_model(pair, tmp_path):
    """Row lengths are the steps of a row budget only: a tensor budget's record has none.
    A format 1 index does not split values from positions: its search has no model."""
    compress_to_size(pair[0], pair[1], tmp_path / "t", "60kB", quiet=True, budget="tensor",
                     method="delta")
    record = json.loads((tmp_path / "t" / SEARCH_NAME).read_text())
    assert record["steps"] is None and record["model"] is not None
    compress_to_size(pair[0], pair[1], tmp_path / "v1", "60kB", quiet=True, format_version=1)
    record = json.loads((tmp_path / "v1" / SEARCH_NAME).read_text())
    assert record["model"] is None and record["steps"] == [64, 160]


def test_size_resume_starts_again_from_a_record_it_would_not_have_made(
        pair, whole_search, tmp_path, monkeypatch):
    """A record whose running keep is not the one its passes lead to (written by another
    version, or edited) is not built on, even with the pass's plan there: the search
    starts over, into the same bytes."""
    ref, ref_keeps = whole_search
    interrupted(pair, monkeypatch, tmp_path, 2, "inside")
    path = tmp_path / "diff" / SEARCH_NAME
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, running=0.123)))
    again = resumed(pair, monkeypatch)
    assert [k for k, _ in again] == ref_keeps and not any(r for _, r in again)
    assert tree(tmp_path / "diff") == ref
