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
from mmprune.training import Trainer
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


@pytest.fixture
def clip_ctx() -> Context:
    adapter = make_adapter()
    data = SyntheticSource(SyntheticParams(task="retrieval", train_size=64, validation_size=32,
                                           test_size=32), seed=0).load(adapter)
    return Context(adapter, trace(adapter), data, "retrieval", seed=0, show_progress=False)


def _masks(search: CompSearch) -> list:
    return [None if m is None else m.clone() for host in search.rt._hosts() for c in host.controls
            for m in (c.head_mask, c.mlp_mask, c.cross_mask)]


def _same_masks(a: list, b: list) -> bool:
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None
                                    and torch.equal(x, y)) for x, y in zip(a, b))


def test_a_stage_that_loses_too_much_is_undone(clip_ctx):
    """rollback_drop near 0 undoes every stage that raises the validation loss at all; a high
    learning rate makes some do. An undone stage leaves weights, masks, thresholds and quality as
    they were at its start; an undone token mode sits out the next stage, an undone parameter
    stage's units are never removed, and the target is still reached."""
    p = CompParams(target=0.4, stage_quantum=0.1, k_min=2, search_steps=4, warmup_steps=2,
                   batch_size=8, eval_batch_size=16, v_sub=32, probe_set=32, lr=3e-3,
                   cost_metric="val_loss", rollback_drop=1e-6, rollback_bar=1)
    search = CompSearch(clip_ctx, p, log=lambda m: None)
    model = clip_ctx.model
    before, restored, committed, undone_units = {}, [], [], []
    start, undo, commit = search._stage_start, search._undo, search._commit

    def stage_start(trainer):
        before.update(quality=search.quality(), thetas=search._thetas(),
                      frozen={g: set(u) for g, u in search.frozen.items()}, masks=_masks(search),
                      weights={n: t.detach().clone() for n, t in model.named_parameters()})
        return start(trainer)

    def undo_and_check(plan, at_start, trainer):
        undo(plan, at_start, trainer)
        undone_units.append({(g, i) for g, units in plan.units.items() for i in units})
        restored.append(search.quality() == before["quality"]
                        and search._thetas() == before["thetas"]
                        and search.frozen == before["frozen"]
                        and _same_masks(_masks(search), before["masks"])
                        and all(torch.equal(t, before["weights"][n]) for n, t in model.named_parameters()))

    def record_commit(plan):
        committed.append({(g, i) for g, units in plan.units.items() for i in units})
        commit(plan)

    search._stage_start, search._undo, search._commit = stage_start, undo_and_check, record_commit
    result = search.run(lambda total: Trainer(clip_ctx.adapter, clip_ctx.task, total, p.lr))
    stages = result["trajectory"][1:]
    assert restored and all(restored)
    assert sum(t.get("undone", False) for t in stages) == len(restored)
    kept = set().union(*undone_units)
    assert kept, "no parameter stage was undone"
    accepted = [c for c, t in zip(committed, stages) if not t.get("undone")]
    assert not kept & set().union(*accepted)     # what an undone stage tried is never removed
    for t, nxt in zip(stages, stages[1:]):
        if t.get("undone"):
            assert t["tried_quality"] < t["quality"]
            if t["mode"].endswith("tokens"):
                assert nxt["mode"] != t["mode"] or nxt.get("unguarded"), (t, nxt)
    assert result["final_flops"] <= result["target"] + p.tol + 1e-9


def test_units_kept_by_undone_stages_are_released_to_reach_the_target(clip_ctx):
    """Parameters only, every stage that raises the loss undone: the kept units leave both modes
    exhausted short of the target; they are given back and the search ends at the target,
    without undoing stages from then on."""
    p = CompParams(target=0.4, stage_quantum=0.1, k_min=2, search_steps=4, warmup_steps=2,
                   batch_size=8, eval_batch_size=16, v_sub=32, probe_set=32, lr=3e-3,
                   modes=["vision_params", "language_params"], cost_metric="val_loss",
                   rollback_drop=1e-6, rollback_bar=1)
    logs = []
    search = CompSearch(clip_ctx, p, log=logs.append)
    result = search.run(lambda total: Trainer(clip_ctx.adapter, clip_ctx.task, total, p.lr))
    assert result["kept_released"] and any("are released" in m for m in logs)
    stages = result["trajectory"][1:]
    first_free = next(i for i, t in enumerate(stages) if t.get("unguarded"))
    assert any(t.get("undone") for t in stages[:first_free])
    assert not any(t.get("undone") for t in stages[first_free:])
    assert result["final_flops"] <= result["target"] + p.tol + 1e-9
