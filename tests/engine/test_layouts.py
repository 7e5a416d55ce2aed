"""Checkpoints laid out the way hub models are: quantized units, resized vocabularies, an
untied head over a tied base, fused expert stacks. Each rebuilt model is checked against
an expectation computed here with the slow twin of KEN, never with kenstream's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kenstream
from kenstream.cli import main
from tests import slow_ken
from tests.ckpt import save_dir
from tests.expect import assert_same_model
from tests.format import reference_v2


def _noise(g, *shape, std=0.02):
    return torch.randn(*shape, generator=g) * std


def ken_rows(ft: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """ft [rows, cols] with every row selected by the slow KEN twin (lowest-position ties)
    and the rest reset to ``base`` (same shape, ft's dtype)."""
    x = ft.to(torch.float32).numpy()
    mask = torch.from_numpy(np.stack([slow_ken.ken_mask(r, k, "positions") for r in x]))
    return torch.where(mask, ft, base)


def test_fp8_weights_and_their_scales_stay_one_unit(tmp_path):
    """An FP8 checkpoint: F8_E4M3 weights with float32 block scales beside them. The scales
    are float, but selecting them apart from their weights would pair fine-tuned weights
    with base scales: the whole unit is stored, exactly."""
    g = torch.Generator().manual_seed(1)
    base = {"model.layers.0.mlp.down_proj.weight": _noise(g, 256, 256, std=1).to(torch.float8_e4m3fn),
            "model.layers.0.mlp.down_proj.weight_scale_inv": torch.rand(2, 2, generator=g) + 0.5,
            "model.layers.0.input_layernorm.weight": 1 + _noise(g, 256)}
    ft = {"model.layers.0.mlp.down_proj.weight": (base["model.layers.0.mlp.down_proj.weight"]
                                                  .float() + _noise(g, 256, 256, std=0.1))
          .to(torch.float8_e4m3fn),
          "model.layers.0.mlp.down_proj.weight_scale_inv":
              base["model.layers.0.mlp.down_proj.weight_scale_inv"] * 1.01,
          "model.layers.0.input_layernorm.weight":
              base["model.layers.0.input_layernorm.weight"] + _noise(g, 256, std=1e-3)}
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    index = kenstream.compress(b, f, tmp_path / "d", keep=0.25, ties="positions", quiet=True)
    recs = index["tensors"]
    for name in ("model.layers.0.mlp.down_proj.weight",
                 "model.layers.0.mlp.down_proj.weight_scale_inv"):
        assert recs[name]["reason"] == "quantized" and recs[name]["k"] is None, name
        assert recs[name]["kept"] == recs[name]["rows"] * recs[name]["cols"]
    assert recs["model.layers.0.input_layernorm.weight"]["reason"] == "selected"
    kenstream.rebuild(b, tmp_path / "d", tmp_path / "out", quiet=True)
    norm = "model.layers.0.input_layernorm.weight"
    expected = {n: t.clone() for n, t in ft.items()}
    expected[norm] = ken_rows(ft[norm][None], base[norm][None], 64)[0]
    assert_same_model(tmp_path / "out", expected)


def test_gptq_packed_weights_scales_and_zeros_stay_whole(tmp_path):
    g = torch.Generator().manual_seed(2)
    p = "model.layers.3.self_attn.q_proj."

    def unit(seed_shift):
        return {p + "qweight": torch.randint(-2**31, 2**31 - 1, (16, 128), generator=g,
                                              dtype=torch.int32),
                p + "qzeros": torch.randint(0, 2**31 - 1, (1, 16), generator=g,
                                             dtype=torch.int32),
                p + "scales": (torch.rand(1, 128, generator=g) + seed_shift).half(),
                p + "g_idx": torch.zeros(128, dtype=torch.int32),
                p + "bias": _noise(g, 128).half()}

    base, ft = unit(0.1), unit(0.2)
    ft[p + "g_idx"] = base[p + "g_idx"].clone()
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    index = kenstream.compress(b, f, tmp_path / "d", keep=0.25, quiet=True)
    for name, rec in index["tensors"].items():
        assert rec["reason"] in ("quantized", "identical"), name
    assert index["tensors"][p + "scales"]["reason"] == "quantized"
    kenstream.rebuild(b, tmp_path / "d", tmp_path / "out", quiet=True)
    assert_same_model(tmp_path / "out", {n: t.clone() for n, t in ft.items()})


def test_format_1_refuses_a_quantized_unit_rather_than_prune_its_scales(tmp_path, capsys):
    """Format 1 has no record for a unit kept whole: it stored the F8 weight as
    non-float and pruned its float32 scales, exit 0, a model that dequantises wrongly.
    It now refuses in one line naming the tensor and format 2, and makes nothing."""
    from kenstream.cli import main

    g = torch.Generator().manual_seed(11)
    w = "m.a.weight"
    base = {w: _noise(g, 32, 64, std=1).to(torch.float8_e4m3fn),
            w + "_scale_inv": torch.rand(4, 8, generator=g) + 0.5}
    ft = {w: (base[w].float() + _noise(g, 32, 64, std=0.1)).to(torch.float8_e4m3fn),
          w + "_scale_inv": base[w + "_scale_inv"] * 1.01}
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    out = tmp_path / "d"
    code = main(["compress", str(b), str(f), "-o", str(out), "--keep", "0.25",
                 "--format-version", "1", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "quantized unit" in err[0] and "format 1" in err[0] and "--format-version" in err[0]
    assert f"tensor '{w}" in err[0] and "model.safetensors" in err[0]
    assert not out.exists()


def test_format_1_warns_that_it_cuts_a_stack_into_whole_matrices(tmp_path):
    """Format 1's rows of an [E, out, in] stack are whole matrices (its readers know no
    other cut), so a row's k is not what the same matrices unfused would get: said."""
    g = torch.Generator().manual_seed(12)
    w = _noise(g, 4, 16, 32)
    name = "model.layers.0.mlp.experts.down_proj"
    b = save_dir(tmp_path / "b", {name: w, "n.weight": _noise(g, 8, 32)})
    f = save_dir(tmp_path / "f", {name: w + _noise(g, 4, 16, 32, std=2e-3),
                                  "n.weight": _noise(g, 8, 32)})
    with pytest.warns(UserWarning, match=r"format 1 cuts 1 stacked tensor\(s\) \('model\."
                                         r"layers\.0\.mlp\.experts\.down_proj' \[4, 16, 32\]"):
        index = kenstream.compress(b, f, tmp_path / "d", k=8, format_version=1, quiet=True)
    assert (index["tensors"][name]["rows"], index["tensors"][name]["cols"]) == (4, 512)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kenstream.compress(b, f, tmp_path / "d2", k=8, quiet=True)


@pytest.mark.parametrize("base_rows,ft_rows", [(100, 102), (100, 128), (104, 100)])
def test_resized_vocabulary_selects_the_shared_rows(tmp_path, base_rows, ft_rows):
    """A chat fine-tune that adds tokens (or pads, or trims the vocabulary): the rows both
    have are selected and coded against the base, only the new rows are stored whole."""
    g = torch.Generator().manual_seed(3)
    emb = _noise(g, max(base_rows, ft_rows), 32).to(torch.bfloat16)
    base = {"model.embed_tokens.weight": emb[:base_rows].clone(),
            "lm_head.weight": emb[:base_rows].flip(0).clone()}
    ft = {n: torch.cat([t[:min(base_rows, ft_rows)].float()
                        + _noise(g, min(base_rows, ft_rows), 32, std=2e-3),
                        _noise(g, max(0, ft_rows - base_rows), 32)]).to(torch.bfloat16)
          for n, t in base.items()}
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    index = kenstream.compress(b, f, tmp_path / "d", keep=0.25, ties="positions", quiet=True,
                               frame_elems=600)
    shared = min(base_rows, ft_rows)
    for name in base:
        rec = index["tensors"][name]
        assert rec["reason"] == "selected" and rec["base_rows"] == shared
        mask = reference_v2.stored_mask(tmp_path / "d", name)
        assert mask[shared:].all() and (mask[:shared].sum(axis=1) == 8).all()
    kenstream.rebuild(b, tmp_path / "d", tmp_path / "out", quiet=True)
    expected = {}
    for name, t in ft.items():
        head = ken_rows(t[:shared], base[name][:shared], 8)
        expected[name] = torch.cat([head, t[shared:]])
    assert_same_model(tmp_path / "out", expected)
    assert kenstream.verify(tmp_path / "d", b, f, quiet=True)["ok"]


def test_resized_vocabulary_costs_what_its_new_rows_cost(tmp_path):
    """Two added tokens add about two rows to the diff, not the whole embedding."""
    g = torch.Generator().manual_seed(4)
    base = {"embed_tokens.weight": _noise(g, 2000, 64).to(torch.bfloat16)}
    grown = torch.cat([base["embed_tokens.weight"].float() + _noise(g, 2000, 64, std=2e-3),
                       _noise(g, 2, 64)]).to(torch.bfloat16)
    b = save_dir(tmp_path / "b", base)
    f_same = save_dir(tmp_path / "same", {"embed_tokens.weight": grown[:2000].clone()})
    f_grown = save_dir(tmp_path / "grown", {"embed_tokens.weight": grown})
    same = kenstream.compress(b, f_same, tmp_path / "d1", keep=0.25, quiet=True)
    resized = kenstream.compress(b, f_grown, tmp_path / "d2", keep=0.25, quiet=True)
    extra = resized["totals"]["diff_bytes"] - same["totals"]["diff_bytes"]
    assert 0 < extra < 0.01 * same["totals"]["diff_bytes"] + 2 * 64 * 2 + 1024


def test_untied_head_uses_the_tied_base_embedding(tmp_path):
    g = torch.Generator().manual_seed(5)
    emb = _noise(g, 64, 32)
    base = {"model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(32)}
    ft = {"model.embed_tokens.weight": emb + _noise(g, 64, 32, std=1e-3),
          "model.norm.weight": torch.ones(32),
          "lm_head.weight": emb + _noise(g, 64, 32, std=1e-3)}
    b, f = save_dir(tmp_path / "b", base), save_dir(tmp_path / "f", ft)
    index = kenstream.compress(b, f, tmp_path / "d", keep=0.25, ties="positions", quiet=True)
    assert index["alignment"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    head = index["tensors"]["lm_head.weight"]
    assert head["base_name"] == "model.embed_tokens.weight" and head["reason"] == "selected"
    assert "lm_head.weight" not in index["alignment"]["new"]
    kenstream.rebuild(b, tmp_path / "d", tmp_path / "out", quiet=True)
    expected = {"model.embed_tokens.weight": ken_rows(ft["model.embed_tokens.weight"], emb, 8),
                "model.norm.weight": torch.ones(32),
                "lm_head.weight": ken_rows(ft["lm_head.weight"], emb, 8)}
    assert_same_model(tmp_path / "out", expected)


def test_fused_expert_stack_selects_like_its_unfused_matrices(tmp_path):
    """[E, out, in] is cut into E * out rows of ``in``: the rows the unfused [out, in]
    matrices have, so both layouts keep the same positions."""
    g = torch.Generator().manual_seed(6)
    experts, out, inn = 4, 24, 40
    w = _noise(g, experts, out, inn)
    dw = w + _noise(g, experts, out, inn, std=2e-3)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    fused_b = save_dir(tmp_path / "fb", {name: w})
    fused_f = save_dir(tmp_path / "ff", {name: dw})
    split_b = save_dir(tmp_path / "sb", {f"e{i}.weight": w[i].clone() for i in range(experts)})
    split_f = save_dir(tmp_path / "sf", {f"e{i}.weight": dw[i].clone() for i in range(experts)})
    fused = kenstream.compress(fused_b, fused_f, tmp_path / "fd", keep=0.25, ties="positions",
                               quiet=True)
    kenstream.compress(split_b, split_f, tmp_path / "sd", keep=0.25, ties="positions",
                       quiet=True)
    rec = fused["tensors"][name]
    assert (rec["rows"], rec["cols"]) == (experts * out, inn)
    fused_mask = reference_v2.stored_mask(tmp_path / "fd", name)
    split_mask = np.concatenate([reference_v2.stored_mask(tmp_path / "sd", f"e{i}.weight")
                                 for i in range(experts)])
    assert np.array_equal(fused_mask, split_mask)
    kenstream.rebuild(fused_b, tmp_path / "fd", tmp_path / "out", quiet=True)
    want = ken_rows(dw.reshape(-1, inn), w.reshape(-1, inn), 10).reshape(experts, out, inn)
    assert_same_model(tmp_path / "out", {name: want})


def test_conv_kernels_keep_one_row_per_output_channel(tmp_path):
    g = torch.Generator().manual_seed(7)
    w = _noise(g, 8, 3, 3, 3)
    b = save_dir(tmp_path / "b", {"conv1.weight": w, "block.conv.weight": w[:, :, :, 0]})
    f = save_dir(tmp_path / "f", {"conv1.weight": w + _noise(g, 8, 3, 3, 3, std=1e-3),
                                  "block.conv.weight": w[:, :, :, 0] + 1e-3})
    index = kenstream.compress(b, f, tmp_path / "d", keep=0.25, quiet=True)
    assert (index["tensors"]["conv1.weight"]["rows"], index["tensors"]["conv1.weight"]["cols"]) \
        == (8, 27)
    assert index["tensors"]["block.conv.weight"]["rows"] == 8  # 3-D, named conv


def test_a_published_folder_keeps_its_card_licence_and_code(tmp_path, capsys):
    """What a hub folder holds beside its weights travels: the diff carries the licence,
    custom code and the processor config, and keeps the fine-tune's card apart from its
    own; the rebuilt folder has them all, a card saying where it came from, and shard
    metadata naming kenstream and the diff."""
    import hashlib

    from safetensors import safe_open

    g = torch.Generator().manual_seed(8)
    base = {"w": _noise(g, 16, 32)}
    b = save_dir(tmp_path / "b", base)
    f = save_dir(tmp_path / "f", {"w": base["w"] + _noise(g, 16, 32, std=1e-3)})
    extras = {"LICENSE": "Apache License 2.0\n", "modeling_toy.py": "class Toy: ...\n",
              "configuration_toy.py": "class ToyConfig: ...\n",
              "processor_config.json": '{"processor_class": "ToyProcessor"}\n',
              "README.md": "---\nlicense: apache-2.0\nlibrary_name: transformers\ntags:\n"
                           "- toy\n---\n\n# Toy chat model\n"}
    for name, text in extras.items():
        (f / name).write_text(text)
    (f / "training_data.bin").write_bytes(b"\0" * 1000)  # not a companion: not copied
    d, out = tmp_path / "d", tmp_path / "out"
    kenstream.compress(b, f, d, keep=0.5, quiet=True)
    for name in ("LICENSE", "modeling_toy.py", "configuration_toy.py", "processor_config.json"):
        assert (d / name).read_text() == extras[name], name
    assert (d / "README.finetuned.md").read_text() == extras["README.md"]
    card = (d / "README.md").read_text()
    # A local base is no hub model id: the front matter does not name it as one.
    assert card.startswith("---\nlicense: ") and 'license: "apache-2.0"' in card
    assert "base_model" not in card.split("\n---\n", 1)[0]
    assert not (d / "training_data.bin").exists()
    kenstream.rebuild(b, d, out, quiet=True)
    for name in ("LICENSE", "modeling_toy.py", "configuration_toy.py", "processor_config.json",
                 "config.json"):
        assert (out / name).read_text() == (f / name).read_text(), name
    assert not (out / "README.finetuned.md").exists()
    rebuilt = (out / "README.md").read_text()
    diff_sha = hashlib.sha256((d / "kenstream-diff.json").read_bytes()).hexdigest()
    assert 'license: "apache-2.0"' in rebuilt and diff_sha in rebuilt
    assert rebuilt.rstrip().endswith("# Toy chat model")
    # The rebuilt weights are the fine-tune's kind of model (its card's library_name, not
    # kenstream's), tagged as pruned only where the diff reset values.
    front = rebuilt.split("\n---\n", 1)[0]
    assert 'library_name: "transformers"' in front and "kenstream" not in front.split(
        "library_name", 1)[1].split("\n", 1)[0]
    assert front.endswith("tags:\n- kenstream\n- pruned\n- ken-pruning"), front
    # The card states the selection as info does (the keep as recorded, the budget).
    assert main(["info", str(d)]) == 0
    shown = next(ln for ln in capsys.readouterr().out.splitlines()
                 if ln.startswith("selection:")).split("   coding:")[0]
    assert f"- {shown}\n" in rebuilt and "budget=row" in shown, (shown, rebuilt)
    kenstream.compress(b, f, tmp_path / "d1", keep=1, quiet=True)
    kenstream.rebuild(b, tmp_path / "d1", tmp_path / "out1", quiet=True)
    lossless = (tmp_path / "out1" / "README.md").read_text().split("\n---\n", 1)[0]
    assert lossless.endswith("tags:\n- kenstream"), lossless
    with safe_open(str(out / "model.safetensors"), "pt") as sf:
        meta = sf.metadata()
    assert meta["format"] == "pt" and meta["kenstream_diff_sha256"] == diff_sha
    assert meta["kenstream_version"] == kenstream.__version__


def test_a_sentence_transformers_folder_keeps_its_module_folders(tmp_path):
    """modules.json names 1_Pooling/ and 2_Dense/ (the Dense head's own small weights): the
    diff and the rebuilt folder hold them byte for byte, so the rebuilt model loads as the
    fine-tune did; an ONNX export is left behind. Replacing the rebuilt folder with one of
    a model without modules leaves no empty module folder behind."""
    import json
    import warnings

    g = torch.Generator().manual_seed(9)
    base = {"w": _noise(g, 16, 32)}
    b = save_dir(tmp_path / "b", base)
    f = save_dir(tmp_path / "f", {"w": base["w"] + _noise(g, 16, 32, std=1e-3)})
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    files = {"modules.json": json.dumps(modules).encode(),
             "1_Pooling/config.json": b'{"word_embedding_dimension": 32}',
             "2_Dense/config.json": b'{"in_features": 32, "out_features": 8}',
             "2_Dense/model.safetensors": bytes(range(256)) * 5}
    for name, data in files.items():
        (f / name).parent.mkdir(exist_ok=True)
        (f / name).write_bytes(data)
    (f / "onnx").mkdir()
    (f / "onnx" / "model.onnx").write_bytes(b"\0" * 64)
    d, out = tmp_path / "d", tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kenstream.compress(b, f, d, keep=0.5, quiet=True)
    assert any("onnx/" in str(w.message) for w in caught)
    kenstream.rebuild(b, d, out, quiet=True)
    for name, data in files.items():
        assert (d / name).read_bytes() == data, name
        assert (out / name).read_bytes() == data, name
    assert not (d / "onnx").exists() and not (out / "onnx").exists()

    plain = save_dir(tmp_path / "plain", {"w": base["w"]})
    kenstream.compress(b, plain, tmp_path / "d2", keep=0.5, quiet=True)
    kenstream.rebuild(b, tmp_path / "d2", out, overwrite=True, quiet=True)
    assert not (out / "1_Pooling").exists() and not (out / "2_Dense").exists()
