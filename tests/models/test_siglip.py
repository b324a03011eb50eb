"""SigLIP: the same pruning machinery on a family with no CLS, last-token pooling, a probe head."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmprune.graph import remove_units, trace
from mmprune.models.siglip import SiglipAdapter
from mmprune.pipeline import run
from mmprune.recipe import load_recipe
from tests.conftest import small_recipe


def make(attn="sdpa") -> SiglipAdapter:
    model = SiglipAdapter.tiny_model(0)
    model.set_attn_implementation(attn)
    return SiglipAdapter(model, *SiglipAdapter.default_processors(model))


def logits(adapter, x):
    with torch.no_grad():
        return adapter.model(**x).logits_per_image


@pytest.mark.parametrize("pruned", [False, True])
def test_cost_model_matches_flop_counter(pruned):
    adapter = make("eager")
    g = trace(adapter)
    if pruned:
        remove_units(g, g.groups["vision.1.attn"], [0, 2])
        remove_units(g, g.groups["language.0.mlp"], list(range(0, 256, 2)))
    x = adapter.example_inputs(4)
    tokens = {t: float(v.mean()) for t, v in adapter.tokens_per_example(x).items()}
    m = adapter.model
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.get_image_features(pixel_values=x["pixel_values"])
        m.get_text_features(input_ids=x["input_ids"])
    counted = fc.get_total_flops() / 4
    assert abs(g.cost.flops(tokens) - counted) / counted < 0.02, (g.cost.flops(tokens), counted)
    assert g.cost.params() == sum(p.numel() for p in m.parameters())


def test_head_and_channel_removal_is_exact():
    adapter = make()
    ref = SiglipAdapter(copy.deepcopy(adapter.model))
    x = adapter.example_inputs(3)
    g = trace(adapter)
    remove_units(g, g.groups["vision.0.attn"], [1])
    remove_units(g, g.groups["language.1.mlp"], list(range(50)))
    att = ref.model.vision_model.encoder.layers[0].self_attn
    with torch.no_grad():
        att.out_proj.weight[:, att.head_dim:2 * att.head_dim] = 0
        ref.model.text_model.encoder.layers[1].mlp.fc2.weight[:, :50] = 0
    torch.testing.assert_close(logits(adapter, x), logits(ref, x), atol=1e-5, rtol=1e-5)
    assert adapter.model.vision_model.encoder.layers[0].self_attn.num_heads == 3


def test_recipe_runs_prune_quantize_export_and_reloads(write_recipe, registry, tmp_path):
    passes = [{"score_taylor": {"batches": 2, "batch_size": 8}}, {"prune_structured": {"target": 0.4}},
              {"quantize": {}}, {"export": {}}]
    recipe = small_recipe(tmp_path / "run", passes)
    recipe["model"] = {"tiny": "siglip"}
    recipe["data"] = {"minivl": "retrieval", "train_size": 64, "validation_size": 32, "test_size": 32}
    report = run(load_recipe(write_recipe(recipe), registry), registry, show_progress=False, log=lambda m: None)
    assert report["ratios"]["flops_reduction"] > 0.35
    from mmprune.data.batching import iterate_batches
    from mmprune.data.minivl.source import MiniVLParams, load_task
    from mmprune.saved import load_bundle
    b = load_bundle(tmp_path / "run" / "model")
    assert isinstance(b.adapter, SiglipAdapter) and b.spec["quantization"]
    test = load_task(MiniVLParams(task="retrieval", train_size=64, validation_size=32, test_size=32))["test"]
    with torch.inference_mode():
        metrics = b.adapter.evaluate(iterate_batches(b.adapter, test, 32), "retrieval")
    assert metrics == report["final"]["metrics"]
