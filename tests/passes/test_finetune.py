"""finetune: trains with token pruning active, selects on validation, runs data-parallel."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmprune.passes.finetune import Finetune, FinetuneParams
from mmprune.runtime import SiteControl
from mmprune.runtime.runtime import TokenRuntime
from tests.conftest import ROOT


def test_two_processes_end_with_identical_weights(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(ROOT / "tests" / "passes" / "ddp_finetune.py"),
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = (tmp_path / "rank0.txt").read_text().split()
    b = (tmp_path / "rank1.txt").read_text().split()
    assert a[0] == b[0] == "2"
    assert a[1] == b[1]


def test_finetune_trains_with_tokens_pruned_and_selects_on_validation(ctx):
    rt = TokenRuntime.attach(ctx.graph)
    rt.set_sites("vision", SiteControl(theta=1.0))
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    seen = []
    tower = rt.towers["vision"]
    orig = tower.forward

    def spy(*a, **k):
        out = orig(*a, **k)
        seen.append(float(tower.last_counts[(1, "attn")].max()))
        return out

    tower.model.get_submodule(tower.spec.encoder).forward = spy
    Finetune(FinetuneParams(steps=4, batch_size=8, lr=1e-3, eval_every=2)).run(ctx)
    assert seen and max(seen) < 17                       # every forward ran with tokens dropped
    hist = ctx.state["finetune"][0]["history"]
    assert [h["step"] for h in hist] == [2, 4]
    best = max(hist, key=lambda h: h["quality"])
    assert ctx.state["finetune"][0]["selected_step"] == best["step"]
    changed = any(not torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())
    assert changed


def test_with_no_step_within_the_flops_limit_the_best_validation_step_is_kept(ctx):
    """A search stopped at its floors, short of its target: every step has the same FLOPs, so
    the best one on validation is kept, not the last by default."""
    Finetune(FinetuneParams(steps=4, batch_size=8, lr=1e-3, eval_every=1, max_flops=1.0)).run(ctx)
    state = ctx.state["finetune"][0]
    hist = state["history"]
    assert not any(h["within_target"] for h in hist) and len({h["flops"] for h in hist}) == 1
    best = max(hist, key=lambda h: h["quality"])
    assert state["selected_step"] == best["step"] != 4      # the last step would be the old rule's


def test_steps_above_the_limit_rank_by_flops_then_quality_within_a_tie():
    from mmprune.passes.finetune import _better

    def step(flops, quality, ok=False):
        return {"flops": flops, "quality": quality, "within_target": ok}

    assert _better(step(100.0, 10.0), step(110.0, 50.0))        # fewer FLOPs first
    assert _better(step(100.2, 50.0), step(100.0, 10.0))        # within 0.5%: one budget
    assert not _better(step(100.0, 10.0), step(100.2, 50.0))
    assert _better(step(200.0, 1.0, ok=True), step(100.0, 50.0))  # within the limit beats above it
    assert not _better(step(90.0, 99.0), step(200.0, 1.0, ok=True))
    assert _better(step(200.0, 2.0, ok=True), step(150.0, 1.0, ok=True))


def test_distillation_from_the_dense_model(ctx):
    from mmprune.training import distillation_loss
    from tests.conftest import clone

    logits = torch.randn(4, 6)
    assert float(distillation_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, logits.flip(1), 2.0)) > 0
    loaded = []
    teacher = clone(ctx.adapter)
    ctx.load_dense = lambda: loaded.append(1) or teacher
    Finetune(FinetuneParams(steps=2, batch_size=8, lr=1e-3, kd_weight=1.0, kd_temperature=2.0)).run(ctx)
    assert loaded == [1]
    assert not teacher.model.training


def test_distillation_without_a_dense_model_is_a_clear_error(ctx):
    from mmprune.errors import MMPruneError

    with pytest.raises(MMPruneError, match="dense model"):
        Finetune(FinetuneParams(steps=1, batch_size=8, kd_weight=1.0)).run(ctx)


@pytest.mark.parametrize("refit", [True, False])
def test_thresholds_rise_when_a_step_is_above_the_flops_limit(ctx, refit):
    from mmprune.passes.finetune import _mean_flops

    rt = TokenRuntime.attach(ctx.graph)
    rt.set_sites("vision", SiteControl(theta=0.5))
    limit = 0.97 * _mean_flops(ctx, "validation", None)     # training alone will not get there
    Finetune(FinetuneParams(steps=2, batch_size=8, lr=1e-12, eval_every=1, max_flops=limit,
                            refit_thresholds=refit)).run(ctx)
    hist = ctx.state["finetune"][0]["history"]
    if not refit:
        assert not any(h["within_target"] for h in hist) and rt.theta("vision") == 0.5
        return
    assert all(h["within_target"] and h["flops"] <= limit for h in hist)
    raised = hist[0]["theta"]["vision_tokens"]
    assert raised > 0.5 and rt.theta("vision") == raised
    assert "theta" not in hist[1]          # the raised θ kept the next step within the limit
    # the least such θ: a little lower is above the limit again
    rt.set_mode_theta("vision_tokens", 0.5 + 0.9 * (raised - 0.5))
    assert _mean_flops(ctx, "validation", None) > limit


def test_a_limit_no_threshold_can_reach_leaves_the_thresholds_alone(ctx):
    from mmprune.passes.finetune import _mean_flops, fit_thresholds

    rt = TokenRuntime.attach(ctx.graph)
    rt.set_sites("vision", SiteControl(theta=0.5))
    limit = 0.1 * _mean_flops(ctx, "validation", None)      # below the text tower alone
    assert fit_thresholds(ctx, limit, "validation", None) == {}
    assert rt.theta("vision") == 0.5
