"""docs/format.md's worked example, rebuilt from its stated inputs: the shard's bytes and
the index must be exactly the literal blocks the document shows."""

from __future__ import annotations

import json

import numpy as np

import kenstream
from tests import slow_ken
from tests.format.golden import FINETUNED, K, doc_block, parse_hex, write_inputs


def test_the_documented_example_is_what_compress_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_inputs(tmp_path)
    kenstream.compress("base", "finetuned", "diff", k=K, ties="positions", quiet=True,
                       format_version=1)
    shard = tmp_path / "diff" / "kendiff-00001-of-00001.kdiff"
    assert shard.read_bytes() == parse_hex(doc_block("v1-shard"))
    index = json.loads((tmp_path / "diff" / "kenstream-diff.json").read_text())
    documented = json.loads(doc_block("v1-index"))
    assert index["kenstream_version"] == kenstream.__version__
    index["kenstream_version"] = documented["kenstream_version"]
    assert index == documented


def test_the_documented_mask_is_the_rule_s():
    """The kept positions the text states are the ones the slow twin of KEN picks."""
    masks = [slow_ken.ken_mask(row, K, "positions") for row in FINETUNED["w"]]
    assert [np.flatnonzero(m).tolist() for m in masks] == [[1, 3], [2, 3]]
    packed = np.packbits(np.array(masks), axis=1, bitorder="little")
    assert packed.ravel().tolist() == [0x0A, 0x0C]


def test_the_documented_version_2_example(tmp_path, monkeypatch):
    """Appendix B: format 2's bytes and index, and the independent reader
    (tests/format/reference_v2.py) decodes the documented shard into the expected
    values."""
    from tests.format import reference_v2
    from tests.format.golden import BASE

    monkeypatch.chdir(tmp_path)
    write_inputs(tmp_path)
    kenstream.compress("base", "finetuned", "diff", k=K, ties="positions", quiet=True)
    shard = tmp_path / "diff" / "kendiff-00001-of-00001.kdiff"
    assert shard.read_bytes() == parse_hex(doc_block("v2-shard"))
    index = json.loads((tmp_path / "diff" / "kenstream-diff.json").read_text())
    documented = json.loads(doc_block("v2-index"))
    index["kenstream_version"] = documented["kenstream_version"]
    assert index == documented
    (r0, r1, positions, values, kept), = reference_v2.frames(tmp_path / "diff", "w")
    mask = reference_v2.frame_mask(positions, r1 - r0, 4)
    got = reference_v2.frame_values(values, kept, "F32", BASE["w"].view(np.uint32)[mask].tolist())
    assert np.array_equal(np.array(got, np.uint32).view(np.float32), FINETUNED["w"][mask])
    # The base digests (6.7), recomputed from the stated base by the plain reader.
    tensors = index["tensors"]
    assert tensors["w"]["base_digest"] == reference_v2.base_digest(BASE["w"])
    assert tensors["same"]["base_digest"] == reference_v2.base_digest(BASE["same"][None])
    assert "base_digest" not in tensors["new"]
    (_, _, positions, values, kept), = reference_v2.frames(tmp_path / "diff", "new")
    assert positions == b"" and values[0] == 2  # every position kept, byte planes
    got = reference_v2.frame_values(values, kept, "F32", [])
    assert np.array_equal(np.array(got, np.uint32).view(np.float32), FINETUNED["new"])
