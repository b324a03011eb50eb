"""The token-pruning runtime on BLIP: fused-qkv ViT, post-norm text encoder with cross-attention."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmprune.comp.cim import CIPStatistics
from mmprune.graph import trace
from mmprune.measure import group_token_counts
from mmprune.models.blip import BlipRetrievalAdapter
from mmprune.runtime import SiteControl
from mmprune.runtime.runtime import TokenRuntime
from tests.runtime.helpers import mask_and_slice


def _blip(seed=0):
    model = BlipRetrievalAdapter.tiny_model(seed)
    adapter = BlipRetrievalAdapter(model, *BlipRetrievalAdapter.default_processors(model))
    return adapter, trace(adapter)


def _batch(adapter, n=3):
    b = adapter.example_inputs(n)
    b["attention_mask"][1, 5:] = 0
    b["input_ids"][1, 4], b["input_ids"][1, 5:] = 3, 0
    return b


@torch.no_grad()
def test_identity_and_keep_all():
    adapter, graph = _blip()
    batch = _batch(adapter)
    dense = adapter.forward(batch)
    rt = TokenRuntime.attach(graph)
    assert (adapter.forward(batch) - dense).abs().max() < 1e-5
    rt.set_sites("vision", SiteControl(0.0))
    rt.set_sites("language", SiteControl(0.0))
    assert (adapter.forward(batch) - dense).abs().max() < 1e-5


@torch.no_grad()
def test_zero_masks_equal_removal_including_cross_heads():
    adapter, graph = _blip()
    batch = _batch(adapter)
    sliced = BlipRetrievalAdapter(copy.deepcopy(adapter.model))
    sgraph = trace(sliced)
    drop = {"vision.0.attn": [0, 3], "language.1.attn": [2], "cross.0.attn": [1, 2],
            "cross.1.attn": [0], "language.0.mlp": [4, 5, 6], "vision.1.mlp": list(range(50))}
    mask_and_slice(graph, sgraph, drop, theta=0.9)
    assert (adapter.forward(batch) - sliced.forward(batch)).abs().max() < 1e-5


@torch.no_grad()
def test_batch_invariance_and_flops_with_tokens_dropped():
    adapter, graph = _blip()
    batch = _batch(adapter, 3)
    rt = TokenRuntime.attach(graph)
    rt.set_sites("vision", SiteControl(theta=1.0))
    rt.set_sites("language", SiteControl(theta=1.0))
    out = adapter.forward(batch)
    counts = rt.counts()
    assert counts["cross.1.attn:kv"].max() < 17        # the cross-attention sees the kept image tokens
    for i in range(3):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        with FlopCounterMode(display=False) as fc:
            single = adapter.forward(one)
        assert (single - out[i:i + 1]).abs().max() < 1e-5
        c = rt.counts()
        assert {g: float(v[0]) for g, v in c.items()} == {g: float(v[i]) for g, v in counts.items()}
        if i != 1:   # the padded example computes its padding at batch 1; counts exclude it
            assert float(graph.cost.flops_per_example(c)[0]) == pytest.approx(fc.get_total_flops(), rel=0.02)


@torch.no_grad()
def test_nlvr_pair_counts_and_flops_are_per_pass_with_tokens_dropped():
    """NLVR runs each tower once per image: counts are [B, 2] and an example's analytic FLOPs
    (summed over its passes, quadratic terms per pass) match what it really computes."""
    adapter, graph = _blip()
    left, right = _batch(adapter, 3), adapter.example_inputs(3)
    batch = {k: torch.stack([left[k], right[k].flip(-1) if k == "pixel_values" else right[k]], 1)
             for k in ("pixel_values", "input_ids", "attention_mask")}
    batch["labels"] = torch.zeros(3, dtype=torch.long)
    rt = TokenRuntime.attach(graph)
    rt.set_sites("vision", SiteControl(theta=1.0))
    rt.set_sites("language", SiteControl(theta=1.0))
    ctx = SimpleNamespace(adapter=adapter, graph=graph, model=adapter.model)
    counts = group_token_counts(ctx, batch)
    assert counts["vision.1.attn"].shape == (3, 2) and counts["cross.1.attn:kv"].shape == (3, 2)
    assert not torch.equal(counts["vision.1.attn"][:, 0], counts["vision.1.attn"][:, 1])
    out, per_example = adapter.forward(batch), graph.cost.flops_per_example(counts)
    for i in (0, 2):   # example 1's left text is padded
        one = {k: v[i:i + 1] for k, v in batch.items()}
        assert (adapter.forward(one) - out[i:i + 1]).abs().max() < 1e-5
        # counted pass by pass: run together, the two passes pad to the longer one's tokens
        flops = 0
        for side in (0, 1):
            with FlopCounterMode(display=False) as fc:
                adapter.forward({k: one[k][:, side] for k in ("pixel_values", "input_ids", "attention_mask")})
            flops += fc.get_total_flops()
        assert float(per_example[i]) == pytest.approx(flops, rel=0.02)


def test_cross_heads_get_importance_statistics():
    adapter, graph = _blip()
    rt = TokenRuntime.attach(graph)
    stats = CIPStatistics(graph)
    rt.set_observer(stats)
    with torch.no_grad():
        adapter.forward(_batch(adapter))
    scores = stats.scores()
    assert {"cross.0.attn", "cross.1.attn", "vision.0.attn", "language.1.mlp"} <= set(scores)
    assert scores["cross.0.attn"].shape == (4,) and (scores["cross.0.attn"] > 0).all()


def test_retrieval_evaluation_with_tokens_dropped_runs_on_padded_batches():
    adapter, graph = _blip()
    rt = TokenRuntime.attach(graph)
    rt.set_sites("vision", SiteControl(theta=1.0))
    batches = [_batch(adapter, 3), adapter.example_inputs(4)]
    m = adapter.evaluate(batches, "retrieval")
    assert 0 <= m["r1_mean"] <= 100


@torch.no_grad()
def test_vqa_keep_all_reproduces_dense_answers_and_logits():
    from mmprune.models.blip import BlipVQAAdapter

    model = BlipVQAAdapter.tiny_model(0)
    adapter = BlipVQAAdapter(model, *BlipVQAAdapter.default_processors(model))
    graph = trace(adapter)
    batch = _batch(adapter)
    dense_logits, dense_answers = adapter.distill_logits(batch), adapter.generate(batch)
    rt = TokenRuntime.attach(graph)
    rt.set_sites("vision", SiteControl(0.0))
    rt.set_sites("language", SiteControl(0.0))
    assert (adapter.distill_logits(batch) - dense_logits).abs().max() < 1e-5
    assert torch.equal(adapter.generate(batch), dense_answers)
    rt.set_sites("vision", SiteControl(theta=1.0))      # dropping tokens changes the answer logits
    assert (adapter.distill_logits(batch) - dense_logits).abs().max() > 1e-4
