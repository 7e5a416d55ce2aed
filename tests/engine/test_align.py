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
