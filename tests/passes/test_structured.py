"""prune_structured: targets are met (within one unit), structure really shrinks, keep-all is exact."""
from __future__ import annotations

import pytest
import torch

from mmprune.errors import MMPruneError
from mmprune.passes.scoring import ScoreMagnitude
from mmprune.passes.structured import PruneStructured, StructuredParams


def prune(ctx, **params):
    if "scores.params" not in ctx.scores:
        ScoreMagnitude().run(ctx)
    PruneStructured(StructuredParams(**params)).run(ctx)


def dense_flops(ctx, tower=None):
    return ctx.graph.cost.flops(sizes={gid: g.total for gid, g in ctx.graph.groups.items()}, tower=tower)


def test_target_zero_keeps_everything_and_outputs(ctx):
    x = ctx.adapter.example_inputs(2)
    with torch.no_grad():
        before = ctx.model(**x).logits_per_image
    prune(ctx, target=0.0)
    with torch.no_grad():
        assert torch.equal(before, ctx.model(**x).logits_per_image)
    assert all(g.size == g.total for g in ctx.graph.groups.values())


def test_half_the_flops_removed_physically(ctx):
    params_before = sum(p.numel() for p in ctx.model.parameters())
    dense = dense_flops(ctx)
    prune(ctx, target=0.5)
    achieved = 1 - ctx.graph.cost.flops() / dense
    largest_unit = max(ctx.graph.cost.unit_flops(g) for g in ctx.graph.groups.values())
    assert 0.5 <= achieved <= 0.5 + largest_unit / dense
    assert sum(p.numel() for p in ctx.model.parameters()) < params_before
    assert sum(p.numel() for p in ctx.model.parameters()) == ctx.graph.cost.params()
    x = ctx.adapter.example_inputs(3)
    with torch.no_grad():
        out = ctx.model(**x)
    assert out.logits_per_image.shape == (3, 3) and torch.isfinite(out.logits_per_image).all()
    assert ctx.scores["scores.params"]["vision.0.mlp"].numel() == ctx.graph.groups["vision.0.mlp"].size


def test_params_target(ctx):
    dense = ctx.graph.cost.params({gid: g.total for gid, g in ctx.graph.groups.items()})
    prune(ctx, target=0.3, metric="params")
    assert 1 - ctx.graph.cost.params() / dense >= 0.3


def test_per_tower_scope_meets_target_in_each_tower(ctx):
    prune(ctx, target=0.4, scope="per_tower")
    for tower in ("vision", "language"):
        assert 1 - ctx.graph.cost.flops(tower=tower) / dense_flops(ctx, tower) >= 0.4


def test_only_named_tower_and_kind_are_touched(ctx):
    prune(ctx, target=0.1, towers=["language"], units=["channel"])
    for g in ctx.graph.groups.values():
        if g.tower == "vision" or g.kind == "head":
            assert g.size == g.total


def test_minimums_are_respected(ctx):
    prune(ctx, target=0.6, min_heads=2, min_channel_frac=0.1)
    for g in ctx.graph.groups.values():
        assert g.size >= (2 if g.kind == "head" else 26)


def test_unreachable_target_is_a_clear_error(ctx):
    with pytest.raises(MMPruneError, match="cannot be reached"):
        prune(ctx, target=0.99)


def test_second_pass_continues_from_dense_reference(ctx):
    dense = dense_flops(ctx)
    prune(ctx, target=0.3)
    prune(ctx, target=0.5)  # scores were trimmed with the units, so no re-scoring is needed
    assert 1 - ctx.graph.cost.flops() / dense >= 0.5
