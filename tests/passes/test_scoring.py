"""Scoring passes against hand-computed values on one head and one channel."""
from __future__ import annotations

import torch

from mmprune.passes.scoring import MagnitudeParams, ScoreMagnitude, ScoreTaylor, TaylorParams


def head_rows(att, h):
    d = att.head_dim
    sl = slice(h * d, (h + 1) * d)
    return [att.q_proj.weight[sl], att.k_proj.weight[sl], att.v_proj.weight[sl],
            att.q_proj.bias[sl], att.k_proj.bias[sl], att.v_proj.bias[sl], att.out_proj.weight[:, sl]]


def test_magnitude_l2_of_head_and_channel(ctx):
    ScoreMagnitude(MagnitudeParams(norm="l2")).run(ctx)
    s = ctx.scores["scores.params"]
    att = ctx.model.vision_model.encoder.layers[1].self_attn
    expect = torch.sqrt(sum(t.detach().double().pow(2).sum() for t in head_rows(att, 2)))
    assert torch.isclose(s["vision.1.attn"][2].double(), expect, rtol=1e-5)
    mlp = ctx.model.text_model.encoder.layers[0].mlp
    ch = torch.sqrt(mlp.fc1.weight[7].double().pow(2).sum() + mlp.fc1.bias[7].double() ** 2
                    + mlp.fc2.weight[:, 7].double().pow(2).sum())
    assert torch.isclose(s["language.0.mlp"][7].double(), ch.detach(), rtol=1e-5)
    assert s["vision.0.mlp"].shape == (256,) and s["language.1.attn"].shape == (4,)


def test_taylor_is_abs_weight_times_grad_summed_over_unit(ctx):
    ScoreTaylor(TaylorParams(batches=2, batch_size=8)).run(ctx)
    s = ctx.scores["scores.params"]
    # recompute the accumulated gradient by hand over the same two shuffled batches
    from itertools import islice
    model = ctx.model
    model.zero_grad()
    torch.manual_seed(0)
    for batch in islice(ctx.batches("train", 8, shuffle=True, drop_last=True), 2):
        ctx.adapter.task_loss(batch, "retrieval").backward()
    att = model.vision_model.encoder.layers[0].self_attn
    d = att.head_dim
    sl = slice(d, 2 * d)
    expect = sum((p.weight[sl] * p.weight.grad[sl] / 2).abs().sum() + (p.bias[sl] * p.bias.grad[sl] / 2).abs().sum()
                 for p in (att.q_proj, att.k_proj, att.v_proj))
    expect += (att.out_proj.weight[:, sl] * att.out_proj.weight.grad[:, sl] / 2).abs().sum()
    assert torch.isclose(s["vision.0.attn"][1], expect.detach().float(), rtol=1e-4)
    assert all((v >= 0).all() and v.sum() > 0 for v in s.values())
    model.zero_grad()


def test_taylor_refuses_test_split(ctx):
    import pytest

    from mmprune.errors import MMPruneError
    with pytest.raises(MMPruneError, match="test split"):
        ScoreTaylor(TaylorParams(split="test")).run(ctx)


def test_grouped_query_heads_own_their_q_rows_and_o_columns():
    """In grouped-query attention k / v rows belong to a KV head shared by its query heads, so
    a query head's score covers q and o only (the parameters removing it removes)."""
    from mmprune.context import Context
    from mmprune.graph import trace
    from mmprune.models.llava import LlavaAdapter

    model = LlavaAdapter.tiny_model(0)
    a = LlavaAdapter(model, *LlavaAdapter.default_processors(model))
    ctx = Context(a, trace(a), None, "instruct", show_progress=False)
    ScoreMagnitude(MagnitudeParams(norm="l2")).run(ctx)
    s = ctx.scores["scores.params"]["language.1.attn"]
    att = model.model.language_model.layers[1].self_attn
    d = att.head_dim
    for h in range(4):
        sl = slice(h * d, (h + 1) * d)
        expect = torch.sqrt(att.q_proj.weight[sl].double().pow(2).sum()
                            + att.o_proj.weight[:, sl].double().pow(2).sum())
        assert torch.isclose(s[h].double(), expect.detach(), rtol=1e-5)
