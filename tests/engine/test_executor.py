"""The executor switch without Ray: names are checked, ``ray`` is imported only when asked
for and its absence is one line (exit 2) before any output exists, and a KenstreamError
survives pickling whole (class, message, file, tensor, row, hint), as a Ray task returns
it. The Ray executor itself is tested in ``test_ray.py``."""

from __future__ import annotations

import pickle
import sys

import pytest
import torch

from kenstream.cli import main
from kenstream.errors import NonFiniteError, OutputError, VerifyError
from tests.ckpt import save_dir, toy_pair


@pytest.fixture()
def pair(tmp_path):
    base, ft = toy_pair(torch.float32)
    return save_dir(tmp_path / "base", base), save_dir(tmp_path / "ft", ft)


def test_without_ray_installed_every_command_says_how_to_get_it(pair, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    b, f = pair
    out = tmp_path / "out"
    for argv in (["compress", b, f, "-o", out, "--keep", "0.5"],
                 ["rebuild", b, tmp_path, "-o", out],
                 ["verify", tmp_path, "--base", b]):
        assert main([str(a) for a in argv] + ["--executor", "ray", "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert "pip install 'kenstream[ray]'" in err
        assert not out.exists()
    assert main(["compress", str(b), str(f), "-o", str(out), "--keep", "0.5", "-q"]) == 0


def test_an_unknown_executor_is_refused(pair, tmp_path):
    import kenstream
    from kenstream.errors import ExecutorError

    with pytest.raises(ExecutorError, match="unknown executor 'dask'"):
        kenstream.compress(*pair, tmp_path / "out", keep=0.5, executor="dask")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [
    NonFiniteError("non-finite value", file="ft/model.safetensors", tensor="w", row=5),
    OutputError.from_os(OSError(28, "No space left"), "write", file="d/kendiff.kdiff"),
    VerifyError("1 mismatch(es)", file="d"),
])
def test_errors_pickle_whole(error):
    error.report = {"ok": False}
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and back.args == error.args
    assert back.__dict__ == error.__dict__ and back.exit_code == error.exit_code


def test_rebuild_builds_frames_with_single_threaded_kernels(pair, tmp_path, monkeypatch):
    """Each of rebuild's build threads decodes whole frames; the kernels it calls run on
    that thread alone (kernels.frame_pool), not on a team of their own per thread."""
    import numba

    import kenstream
    from kenstream.format import v2_tensor

    b, f = pair
    kenstream.compress(b, f, tmp_path / "diff", keep=0.5, quiet=True)
    seen, put = [], v2_tensor.put_at

    def watched(*args):
        seen.append(numba.get_num_threads())
        return put(*args)

    monkeypatch.setattr(v2_tensor, "put_at", watched)
    kenstream.rebuild(b, tmp_path / "diff", tmp_path / "out", quiet=True, threads=2)
    assert seen and set(seen) == {1}


def _multi_shard(pair, tmp_path):
    import kenstream

    b, f = pair
    return lambda: kenstream.compress(b, f, tmp_path / "diff", keep=0.5, quiet=True,
                                      shard_size="2kB")


def test_a_diff_shard_is_hashed_while_the_next_one_is_written(pair, tmp_path, monkeypatch):
    """The local executor hashes a finished shard on a helper thread while the loop writes
    the next: the first shard's hash waits here for the second shard's write to start,
    which a hash in the loop could never see. The index still holds every file's sha256
    (recomputed here with hashlib)."""
    import hashlib
    import json
    import threading

    from kenstream.engine import executor

    started, seen, calls = threading.Event(), [], []
    hash_file, write = executor.sized_sha256, executor.write_shard

    def hashed(path):
        if not seen:
            seen.append(started.wait(timeout=30))  # a guard against a hang, not a timing
        return hash_file(path)

    def written(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            started.set()
        return write(*args, **kwargs)

    monkeypatch.setattr(executor, "sized_sha256", hashed)
    monkeypatch.setattr(executor, "write_shard", written)
    _multi_shard(pair, tmp_path)()
    assert len(calls) >= 2 and seen == [True]
    index = json.loads((tmp_path / "diff" / "kenstream-diff.json").read_text())
    table = index["shards"]
    assert sorted(table) == sorted(calls)
    for name, info in table.items():
        data = (tmp_path / "diff" / name).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["size"] == len(data)


def test_a_failed_deferred_hash_stops_the_run_before_the_index(pair, tmp_path, monkeypatch):
    from kenstream.engine import executor

    def broken(path):
        raise OutputError.from_os(OSError(5, "Input/output error"), "read", file=str(path))

    monkeypatch.setattr(executor, "sized_sha256", broken)
    with pytest.raises(OutputError, match="Input/output error"):
        _multi_shard(pair, tmp_path)()
    assert not (tmp_path / "diff" / "kenstream-diff.json").exists()


def test_every_command_that_writes_keeps_the_memory_its_frames_free(pair, tmp_path, monkeypatch):
    """compress, rebuild and verify apply the allocator settings before their shards' work
    (tests/kernels/test_jit.py shows what the settings do)."""
    from kenstream import kernels

    calls = []
    monkeypatch.setattr(kernels, "keep_freed_memory", lambda: calls.append(1) or True)
    b, f = map(str, pair)
    assert main(["compress", b, f, "-o", str(tmp_path / "d"), "--keep", "0.5", "-q"]) == 0
    assert len(calls) == 1
    assert main(["rebuild", b, str(tmp_path / "d"), "-o", str(tmp_path / "m"), "-q"]) == 0
    assert len(calls) == 2
    assert main(["verify", b, str(tmp_path / "d"), "-q"]) == 0
    assert len(calls) == 3
