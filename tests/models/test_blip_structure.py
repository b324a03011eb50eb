"""BLIP's prunable structure: fused-qkv vision heads, text heads, cross-attention heads, MLPs."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmprune.graph import remove_units, trace
from mmprune.models.blip import BlipRetrievalAdapter, BlipVQAAdapter

REMOVE = {"vision.0.attn": [1, 2], "vision.1.attn": [0], "language.1.attn": [3],
          "cross.0.attn": [0, 2], "vision.1.mlp": list(range(0, 256, 4)), "language.0.mlp": [1, 2, 9]}


def _adapter(seed=0):
    model = BlipRetrievalAdapter.tiny_model(seed)
    return BlipRetrievalAdapter(model, *BlipRetrievalAdapter.default_processors(model))


def _zero_masked(adapter, graph):
    """A copy whose removed units are zeroed instead of cut: their outputs contribute nothing."""
    model = copy.deepcopy(adapter.model)
    for gid, units in REMOVE.items():
        g = graph.groups[gid]
        root = model.get_submodule(g.site.path)
        if g.kind == "head":
            cols = g.channels(units)
            root.get_submodule(g.site.o).weight.data[:, cols] = 0
        else:
            root.get_submodule(g.site.fc_out).weight.data[:, units] = 0
    return model


def test_towers_and_groups_are_tagged():
    graph = trace(_adapter())
    towers = {g.tower for g in graph.groups.values()}
    assert towers == {"vision", "language", "cross"}
    assert graph.groups["vision.0.attn"].site.fused_qkv
    assert graph.groups["cross.1.attn"].site.kv_hidden_size == 64
    assert "cross.0.mlp" not in graph.groups       # the FFN belongs to the text tower


@torch.no_grad()
def test_removal_is_exact_against_a_zero_masked_copy():
    adapter = _adapter()
    graph = trace(adapter)
    batch = adapter.example_inputs(3)
    reference = _zero_masked(adapter, graph)
    params_before = sum(p.numel() for p in adapter.model.parameters())
    for gid, units in REMOVE.items():
        remove_units(graph, graph.groups[gid], units)
    assert sum(p.numel() for p in adapter.model.parameters()) < params_before
    assert graph.cost.params() == sum(p.numel() for p in adapter.model.parameters())
    att = adapter.model.vision_model.encoder.layers[0].self_attn
    assert att.qkv.out_features == 3 * 2 * att.head_dim and att.num_heads == 2
    got = adapter.forward(batch)
    ref_adapter = BlipRetrievalAdapter(reference)
    expected = ref_adapter.forward(batch)
    assert (got - expected).abs().max() < 1e-5


def test_transformers_split_is_wrong_after_pruning_and_ours_is_not():
    """HF's BlipAttention splits the fused projection by the residual width: after a head is
    removed that either fails or mixes heads. The adapter's forward splits by head."""
    from transformers.models.blip.modeling_blip import BlipAttention

    adapter = _adapter()
    graph = trace(adapter)
    remove_units(graph, graph.groups["vision.0.attn"], [3])
    att = adapter.model.vision_model.encoder.layers[0].self_attn
    x = torch.randn(2, 17, 64)
    with pytest.raises(RuntimeError):
        BlipAttention.forward(att, x)
    out, _ = att(x)
    assert out.shape == (2, 17, 64)


@torch.no_grad()
def test_analytic_flops_match_the_flop_counter_dense_and_pruned():
    adapter = _adapter()
    graph = trace(adapter)
    batch = adapter.example_inputs(1)
    for step in range(2):
        with FlopCounterMode(display=False) as fc:
            adapter.forward(batch)
        assert graph.cost.flops() == pytest.approx(fc.get_total_flops(), rel=0.02)
        if step == 0:
            for gid, units in REMOVE.items():
                remove_units(graph, graph.groups[gid], units)


def _vqa_adapter(seed=0):
    model = BlipVQAAdapter.tiny_model(seed)
    return BlipVQAAdapter(model, *BlipVQAAdapter.default_processors(model))


@torch.no_grad()
def test_vqa_model_has_the_same_towers_and_removal_is_exact():
    """BlipForQuestionAnswering: the ViT and question encoder are pruned like the retrieval
    model's; the answer decoder, which reads the encoder's residual stream only, is untouched."""
    adapter = _vqa_adapter()
    graph = trace(adapter)
    assert {g.tower for g in graph.groups.values()} == {"vision", "language", "cross"}
    assert not any(g.site.path.startswith("text_decoder") for g in graph.groups.values())
    batch = adapter.example_inputs(3)
    reference = BlipVQAAdapter(_zero_masked(adapter, graph))
    for gid, units in REMOVE.items():
        remove_units(graph, graph.groups[gid], units)
    assert graph.cost.params() == sum(p.numel() for p in adapter.model.parameters())
    got, expected = adapter.distill_logits(batch), reference.distill_logits(batch)
    assert (got - expected).abs().max() < 1e-5
    assert torch.equal(adapter.generate(batch), reference.generate(batch))


@torch.no_grad()
def test_vqa_encoder_flops_match_the_flop_counter():
    adapter = _vqa_adapter()
    graph = trace(adapter)
    batch = adapter.example_inputs(1)
    for gid, units in REMOVE.items():
        remove_units(graph, graph.groups[gid], units)
    with FlopCounterMode(display=False) as fc:
        adapter._question(batch)
    decoder = graph.cost.towers["language"].extra_flops
    assert graph.cost.flops() - decoder == pytest.approx(fc.get_total_flops(), rel=0.02)
