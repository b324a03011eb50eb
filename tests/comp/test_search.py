"""CompSearch planning on a tiny CLIP: a parameter stage stays one quantum wide when its unit
reshapes the attention that scores tokens."""
from __future__ import annotations

import pytest
import torch

from mmprune.comp.search import CompSearch
from mmprune.context import Context
from mmprune.data.synthetic import SyntheticParams, SyntheticSource
from mmprune.graph import trace
from mmprune.passes.comp import CompParams
from tests.conftest import make_adapter


@pytest.fixture
def broad_head_ctx() -> Context:
    """A CLIP whose first ViT block has one head that attends uniformly (it gives every token
    some attention) and three sharp ones: under max-over-heads token scores, masking the broad
    head leaves most tokens with little attention received, so they fall below θ."""
    adapter = make_adapter()
    attn = adapter.model.vision_model.encoder.layers[0].self_attn
    d = attn.head_dim
    with torch.no_grad():
        attn.q_proj.weight[:d] = 0.0
        attn.q_proj.bias[:d] = 0.0
        attn.q_proj.weight[d:] *= 8.0
        attn.k_proj.weight[d:] *= 8.0
    data = SyntheticSource(SyntheticParams(task="retrieval", train_size=64, validation_size=32,
                                           test_size=32), seed=0).load(adapter)
    return Context(adapter, trace(adapter), data, "retrieval", seed=0, show_progress=False)


def _plan_broad_head(ctx: Context, refit: bool):
    p = CompParams(target=0.5, v_sub=32, probe_set=32, eval_batch_size=16, refit_tokens=refit)
    search = CompSearch(ctx, p, log=lambda m: None)
    search.rt.set_mode_theta("vision_tokens", 0.6)
    f0, _ = search.measure_flops(search.probe, dense=True)
    f_now, counts = search.measure_flops(search.probe)
    search.scores = {gid: torch.ones(g.size) for gid, g in search.graph.groups.items()}
    search.scores["vision.0.attn"][0] = -10.0          # the broad head is ranked first
    quantum = search._unit_flops(search.graph.groups["vision.0.attn"], counts) / f0
    plan = search.plan_params("vision_params", quantum, counts, f_now, f0)
    return search, plan, quantum, f_now, f0


@pytest.mark.parametrize("refit", [True, False])
def test_a_head_that_makes_tokens_drop_lowers_their_threshold_for_its_stage(broad_head_ctx, refit):
    search, plan, quantum, f_now, f0 = _plan_broad_head(broad_head_ctx, refit)
    assert plan.units == {"vision.0.attn": [0]}
    if not refit:    # the head alone takes about two quanta: one of its own, one of tokens
        assert plan.planned_flops > 1.5 * quantum and not plan.refit
        return
    old, new = plan.refit["vision_tokens"]
    assert old == 0.6 and 0.0 < new < old
    assert 0.95 * quantum <= plan.planned_flops <= 1.05 * quantum
    # the stage's end state removes what was planned; its start is the committed state
    search._apply(plan, 1.0)
    f_end = search.measure_flops(search.probe, sizes=search._sizes_after(plan))[0]
    assert (f_now - f_end) / f0 == pytest.approx(plan.planned_flops)
    search._apply(plan, 0.0)
    assert search.rt.mode_theta("vision_tokens") == old
    search._commit(plan)
    assert search.rt.mode_theta("vision_tokens") == new
