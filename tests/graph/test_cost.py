"""The analytic cost model against torch's FLOP counter and the live parameter count."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmprune.graph import remove_units, trace
from tests.conftest import make_adapter


def counted_flops(adapter, inputs) -> float:
    """FLOPs of one image-tower and one text-tower pass, as torch counts them (eager attention)."""
    m = adapter.model
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.get_image_features(pixel_values=inputs["pixel_values"])
        m.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return fc.get_total_flops() / inputs["pixel_values"].shape[0]


def prune_some(g):
    remove_units(g, g.groups["vision.0.attn"], [0, 1])
    remove_units(g, g.groups["language.1.attn"], [3])
    remove_units(g, g.groups["vision.1.mlp"], list(range(100)))
    remove_units(g, g.groups["language.0.mlp"], list(range(0, 256, 2)))


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("text_len", [8, 20])
def test_flops_match_flop_counter_within_2_percent(pruned, text_len):
    adapter = make_adapter(attn="eager")  # torch does not count the CPU SDPA kernel
    g = trace(adapter)
    if pruned:
        prune_some(g)
    inputs = adapter.example_inputs(4)
    ids = torch.randint(4, 256, (4, text_len))
    ids[:, 0], ids[:, -1] = 2, 3
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    tokens = {t: float(v.mean()) for t, v in adapter.tokens_per_example(inputs).items()}
    analytic = g.cost.flops(tokens)
    counted = counted_flops(adapter, inputs)
    assert abs(analytic - counted) / counted < 0.02, (analytic, counted)


def test_tower_breakdown_sums_to_total(adapter):
    g = trace(adapter)
    counts = {gid: torch.tensor([g.cost.tokens[grp.tower]]) for gid, grp in g.groups.items()}
    by_tower = [float(g.cost.flops_per_example(counts, tower=t)[0]) for t in g.towers]
    assert sum(by_tower) == pytest.approx(g.cost.flops())


def test_params_match_live_model_after_pruning(adapter):
    g = trace(adapter)
    assert g.cost.params() == sum(p.numel() for p in adapter.model.parameters())
    prune_some(g)
    assert g.cost.params() == sum(p.numel() for p in adapter.model.parameters())


def test_sizes_predict_pruned_costs_before_pruning(adapter):
    g = trace(adapter)
    sizes = {"vision.0.attn": 2, "vision.1.mlp": 156}
    predicted = g.cost.flops(sizes=sizes), g.cost.params(sizes)
    remove_units(g, g.groups["vision.0.attn"], [0, 1])
    remove_units(g, g.groups["vision.1.mlp"], list(range(100)))
    assert (g.cost.flops(), g.cost.params()) == predicted
