from kenstream.engine.align import align


def test_exact_then_prefix_added_by_finetune():
    base = ["embeddings.w", "encoder.layer.0.q", "encoder.layer.1.q", "pooler.w"]
    ft = ["bert.embeddings.w", "bert.encoder.layer.0.q", "bert.encoder.layer.1.q",
          "bert.pooler.w", "classifier.w"]
    a = align(ft, base)
    assert a.pairs == {f"bert.{n}": n for n in base}
    assert a.finetuned_prefix == "bert." and a.base_prefix == ""
    assert a.new == ["classifier.w"] and a.dropped == []


def test_prefix_removed_by_finetune_and_dropped():
    base = ["model.a", "model.b", "model.c", "lm_head"]
    ft = ["a", "b", "c"]
    a = align(ft, base)
    assert a.pairs == {"a": "model.a", "b": "model.b", "c": "model.c"}
    assert a.base_prefix == "model." and a.dropped == ["lm_head"]


def test_exact_names_win_and_only_one_prefix_is_used():
    base = ["x.w", "y.w", "p.x.w"]
    ft = ["x.w", "q.y.w", "r.y.w"]
    a = align(ft, base)
    assert a.pairs["x.w"] == "x.w" and a.exact == 1
    # q. and r. tie with one pair each: the alphabetically first prefix wins, consistently
    assert a.pairs == {"x.w": "x.w", "q.y.w": "y.w"}
    assert a.new == ["r.y.w"] and a.dropped == ["p.x.w"]


def test_nothing_in_common():
    a = align(["a", "b"], ["c"])
    assert a.pairs == {} and a.new == ["a", "b"] and a.dropped == ["c"]


def test_the_prefix_pairs_only_names_that_carry_it():
    """Once ``a.`` wins the vote (two pairs to one), a name without it is not cut by its
    length: ``b.x`` stays new rather than taking ``x``, which ``a.x`` already has."""
    a = align(["a.x", "a.y", "b.x"], ["x", "y"])
    assert a.pairs == {"a.x": "x", "a.y": "y"}
    assert a.finetuned_prefix == "a." and a.new == ["b.x"] and a.dropped == []


def test_tie_heads_pairs_one_head_with_the_one_embedding():
    """A head the base ties (no head of its own) pairs with its single embedding; only
    the first such head does; a base with two embeddings, or a head of its own, is left
    as it is."""
    from kenstream.engine.align import tie_heads

    base = ["model.embed_tokens.weight", "model.norm.weight"]
    ft = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
          "extra.lm_head.weight"]
    a = tie_heads(align(ft, base), base)
    assert a.pairs["lm_head.weight"] == "model.embed_tokens.weight"
    assert a.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert a.new == ["extra.lm_head.weight"]
    assert a.summary()["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    for other in (base + ["lm_head.weight"], base + ["wte.weight"]):
        a = tie_heads(align(ft[:3], other), other)
        assert a.tied == {} and "tied" not in a.summary()
        assert ("lm_head.weight" in a.new) == ("lm_head.weight" not in other)
