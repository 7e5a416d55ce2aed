"""The hub code path end to end: base and fine-tune given as ``org/name`` ids, resolved from a
hand-built Hugging Face cache with HF_HUB_OFFLINE=1 and every socket refused."""

from __future__ import annotations

import json

import torch

from kenstream.cli import main
from tests.ckpt import toy_pair
from tests.io.test_hub import COMMIT, _safetensors_bytes, add_to_cache, no_network  # noqa: F401
from tests.expect import assert_same_model, expected_model


def test_compress_and_rebuild_from_an_offline_cache(tmp_path, monkeypatch, no_network):
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    base, ft = toy_pair(torch.bfloat16, prefix="bert.")
    add_to_cache(cache, "org/base", {"model.safetensors": _safetensors_bytes(tmp_path, base),
                                     "config.json": b'{"model_type": "toy"}'})
    add_to_cache(cache, "org/ft", {"model.safetensors": _safetensors_bytes(tmp_path, ft),
                                   "config.json": b'{"model_type": "toy", "labels": 3}',
                                   "tokenizer.json": b"{}"})
    diff, out = tmp_path / "diff", tmp_path / "out"
    assert main(["compress", "org/base", "org/ft", "-o", str(diff), "--keep", "0.4", "-q"]) == 0
    index = json.loads((diff / "kenstream-diff.json").read_text())
    assert index["base"]["kind"] == "hub" and index["base"]["repo_id"] == "org/base"
    assert index["base"]["revision"] == COMMIT
    assert "base_model: \"org/base\"" in (diff / "README.md").read_text()
    assert (diff / "tokenizer.json").exists()
    assert main(["rebuild", "org/base@main", str(diff), "-o", str(out), "-q"]) == 0
    assert_same_model(out, expected_model(base, ft, "bert.", keep=0.4))
    assert json.loads((out / "config.json").read_text())["labels"] == 3
    assert no_network == []


def test_a_hub_base_whose_main_moved_is_taken_at_the_recorded_revision(tmp_path, monkeypatch,
                                                                       capsys, no_network):
    """The diff was made from org/base at COMMIT; main has moved on to other weights since.
    `rebuild org/base` takes the recorded revision (and says so); `org/base@main` asks for
    the new weights, which the base digests refuse, naming the revision to use."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    base, ft = toy_pair(torch.float32)
    add_to_cache(cache, "org/base", {"model.safetensors": _safetensors_bytes(tmp_path, base)})
    add_to_cache(cache, "org/ft", {"model.safetensors": _safetensors_bytes(tmp_path, ft)})
    diff = tmp_path / "diff"
    assert main(["compress", "org/base", "org/ft", "-o", str(diff), "--keep", "0.4", "-q"]) == 0
    moved = {n: t + 1 if t.is_floating_point() else t for n, t in base.items()}
    add_to_cache(cache, "org/base", {"model.safetensors": _safetensors_bytes(tmp_path, moved)},
                 commit="f" * 40)
    capsys.readouterr()
    assert main(["rebuild", "org/base", str(diff), "-o", str(tmp_path / "out")]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert notes == [f"note: org/base has no revision: using org/base@{COMMIT}, the one the "
                     "diff was made from"], notes
    assert_same_model(tmp_path / "out", expected_model(base, ft, keep=0.4))
    assert main(["rebuild", "org/base@main", str(diff), "-o", str(tmp_path / "o2"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "not the one this diff was made from" in err and f"org/base@{COMMIT}" in err, err
    assert no_network == []
