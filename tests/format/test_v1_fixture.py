"""Diffs written by kenstream 0.1.0 (format 1, checked in under tests/data/v1 before the
package was reorganised): today's format-1 writer reproduces their shard bytes and index,
and today's readers rebuild them exactly."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kenstream
from tests.expect import assert_same_model, expected_model

DATA = Path(__file__).resolve().parents[1] / "data"
_spec = importlib.util.spec_from_file_location(
    "make_fixtures", DATA.parents[1] / "tools" / "make_fixtures.py")
make_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fixtures)
CASES = make_fixtures.V1_CASES


def _comparable(index: dict) -> dict:
    """The index without what depends on where the inputs lay."""
    index = json.loads(json.dumps(index))
    for side in ("base", "finetuned"):
        index[side]["source"] = None
    return index


@pytest.mark.parametrize("case", sorted(CASES))
def test_writer_reproduces_the_v1_bytes(tmp_path, case):
    pair = tmp_path / "pair"
    shutil.copytree(DATA / "pair", pair)
    out = tmp_path / "diff"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kenstream.compress(pair / "base", pair / "finetuned", out, quiet=True,
                           shard_size=make_fixtures.SHARD_SIZE, format_version=1,
                           **CASES[case])
    said = [str(w.message) for w in caught]
    assert any(re.search(r"wide\.weight: shape .* stored whole", s) for s in said), said
    # The only other warning: a keep so small that rows of the fixture keep one value.
    assert all(re.search(r"stored whole|keeps one value a row", s) for s in said), said
    ref = DATA / "v1" / case
    shards = sorted(p.name for p in ref.glob("*.kdiff"))
    assert shards == sorted(p.name for p in out.glob("*.kdiff"))
    for name in shards:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    ref_index = json.loads((ref / "kenstream-diff.json").read_text())
    assert _comparable(json.loads((out / "kenstream-diff.json").read_text())) == \
        _comparable(ref_index)


@pytest.mark.parametrize("case", sorted(CASES))
def test_readers_rebuild_the_v1_diffs(tmp_path, case):
    base = load_file(str(DATA / "pair" / "base" / "model.safetensors"))
    ft = load_file(str(DATA / "pair" / "finetuned" / "model.safetensors"))
    settings = dict(CASES[case])
    kenstream.rebuild(DATA / "pair" / "base", DATA / "v1" / case, tmp_path / "out", quiet=True)
    assert_same_model(tmp_path / "out", expected_model(base, ft, "model.", **settings))
    report = kenstream.verify(DATA / "v1" / case, DATA / "pair" / "base",
                              DATA / "pair" / "finetuned", quiet=True)
    assert report["ok"]
    assert torch.equal(dict(kenstream.load(DATA / "pair" / "base", DATA / "v1" / case))
                       ["model.steps"], ft["model.steps"])
