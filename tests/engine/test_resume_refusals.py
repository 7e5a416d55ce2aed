"""compress --resume facing output files damaged or edited since the interrupted run: a
finished shard whose records do not parse or whose entries belong to a tensor the plan
puts elsewhere, a plan file that is JSON but no plan, a finished diff whose index is no
index. Each is refused in one ``error:`` line that says what to do (never a traceback,
never a diff finished around a bad shard)."""

from __future__ import annotations

import json

from kenstream.format.spec import INDEX_NAME, PARTIAL_NAME
from tests.forge import edit_records, read_header, rewrite_header
from tests.test_outputs import executor_module, interrupt_after
from tests.test_reliability import (assert_one_error, cli, compress_argv, pair,  # noqa: F401
                                    snapshot)


def _interrupted(pair, capsys, monkeypatch):
    """(argv, out, first finished shard) of a compress stopped after its first shard."""
    b, f, out = pair
    argv = compress_argv(b, f, out, "--shard-size", "300B")
    interrupt_after(monkeypatch, executor_module, "write_shard", 1)
    assert cli(capsys, argv, [b, f])[0] == 130
    monkeypatch.undo()
    first = sorted(out.glob("*.kdiff"))[0]
    assert (out / PARTIAL_NAME).exists()
    return argv, out, first


def test_resume_refuses_a_finished_shard_whose_records_do_not_parse(pair, capsys,
                                                                    monkeypatch):
    b, f, _ = pair
    argv, out, first = _interrupted(pair, capsys, monkeypatch)

    def damage(records):
        name = sorted(records)[0]
        records[name]["kept"] = "many"
    edit_records(first, damage)
    code, err = cli(capsys, argv + ["--resume"], [b, f])
    assert code == 2, err
    assert_one_error(err, first.name, "delete it and rerun with --resume")


def test_resume_refuses_a_finished_shard_holding_entries_of_another_tensor(pair, capsys,
                                                                          monkeypatch):
    """The shard's records are the planned ones, but one entry was renamed to a tensor the
    plan puts in another shard: resuming around it would finish a diff that cannot be
    read."""
    b, f, _ = pair
    argv, out, first = _interrupted(pair, capsys, monkeypatch)
    entries = sorted(k for k in read_header(first) if k != "__metadata__")
    held = {e.split("::")[0] for e in entries}
    assert "c.bias" not in held  # the last tensor: in a later shard

    def rename(header):
        key = entries[-1]
        header["c.bias::" + key.split("::")[1]] = header.pop(key)
    rewrite_header(first, rename)
    code, err = cli(capsys, argv + ["--resume"], [b, f])
    assert code == 2, err
    assert_one_error(err, first.name, "entries of tensors the plan does not put in it",
                     "delete it and rerun with --resume")
    assert not (out / INDEX_NAME).exists()


def test_resume_refuses_a_plan_file_that_is_no_plan(pair, capsys, monkeypatch):
    b, f, _ = pair
    argv, out, _ = _interrupted(pair, capsys, monkeypatch)
    (out / PARTIAL_NAME).write_text(json.dumps({"format": "something else"}))
    code, err = cli(capsys, argv + ["--resume"], [b, f])
    assert code == 2, err
    assert_one_error(err, PARTIAL_NAME, "--resume:", "start again")
    assert not (out / INDEX_NAME).exists()


def test_resume_refuses_a_finished_diff_whose_index_is_no_index(pair, capsys):
    b, f, out = pair
    argv = compress_argv(b, f, out)
    assert cli(capsys, argv, [b, f])[0] == 0
    index = json.loads((out / INDEX_NAME).read_text())
    index["shards"] = "none"
    (out / INDEX_NAME).write_text(json.dumps(index))
    before = snapshot(out)
    code, err = cli(capsys, argv + ["--resume"], [b, f])
    assert code == 2, err
    assert_one_error(err, INDEX_NAME, "--resume:", "--overwrite")
    assert snapshot(out) == before
