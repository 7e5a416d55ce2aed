"""--size: the diff lands within [0.98, 1] x the request, measured on the files written;
the request's forms and the refusals."""

from __future__ import annotations

import pytest
import torch

from kenstream.cli import main
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
])
def test_size_refuses_what_it_cannot_reach(pair, tmp_path, capsys, value, needle):
    assert run(pair, tmp_path / "diff", "--size", value, "--method", "delta") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and needle in err[0], err
    # No diff of another size is left behind looking like the answer (the passes wrote one).
    assert not (tmp_path / "diff").exists()


def test_size_refusal_leaves_the_users_other_files(pair, tmp_path, capsys):
    d = tmp_path / "diff"
    assert run(pair, d, "--keep", "0.5") == 0
    (d / "notes.txt").write_text("mine")
    assert run(pair, d, "--size", "200B", "--overwrite") == 2
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_size_excludes_keep_and_resume(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(pair, tmp_path / "diff", "--size", "10%", "--keep", "0.5")
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert run(pair, tmp_path / "diff", "--size", "10%", "--resume") == 2
    assert "cannot --resume" in capsys.readouterr().err


def test_size_units():
    from kenstream.engine.size import parse_request

    assert parse_request("1.5G", 10) == 1_500_000_000
    assert parse_request("300MB", 10) == 300_000_000
    assert parse_request("2MiB", 10) == 2 * 2**20
    assert parse_request("10%", 1000) == 100


def test_size_warns_about_the_keep_it_chose_not_a_keep_asked(pair, tmp_path, capsys):
    """A small size makes some rows keep one value; the warning names the size's keep,
    once, not a --keep the user never typed (nor the keeps of discarded passes)."""
    assert run(pair, tmp_path / "diff", "--size", "8kB") == 0
    captured = capsys.readouterr()
    chosen = captured.out.split("chose keep ")[1].split()[0]
    warns = [line for line in captured.err.splitlines() if line.startswith("warning")]
    assert warns == [f"warning: the keep --size chose, {chosen}, keeps one value a row in 1 "
                     "tensors (e.g. emb, rows of 64)"], warns
