"""Physical removal of heads and channels is exact against a zero-masked copy, whole heads only."""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp

from mmprune.graph import remove_units, trace
from mmprune.graph.surgery import SurgeryError
from tests.conftest import clone, make_adapter


def logits(adapter, inputs):
    with torch.no_grad():
        out = adapter.model(**inputs)
    return out.logits_per_image


def zero_heads(adapter, path: str, heads: list[int]) -> None:
    att = adapter.model.get_submodule(path)
    d = att.head_dim
    with torch.no_grad():
        for h in heads:
            att.out_proj.weight[:, h * d:(h + 1) * d] = 0


def zero_channels(adapter, path: str, channels: list[int]) -> None:
    with torch.no_grad():
        adapter.model.get_submodule(path).fc2.weight[:, channels] = 0


def test_keep_all_leaves_outputs_unchanged(adapter):
    x = adapter.example_inputs(3)
    before = logits(adapter, x)
    g = trace(adapter)
    for group in g.groups.values():
        remove_units(g, group, [])
    assert torch.equal(before, logits(adapter, x))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_head_removal_matches_zero_masked_copy(attn):
    adapter = make_adapter(attn=attn)
    ref = clone(adapter)
    x = adapter.example_inputs(3)
    g = trace(adapter)
    remove_units(g, g.groups["vision.0.attn"], [1, 3])
    remove_units(g, g.groups["language.1.attn"], [0])
    zero_heads(ref, "vision_model.encoder.layers.0.self_attn", [1, 3])
    zero_heads(ref, "text_model.encoder.layers.1.self_attn", [0])
    torch.testing.assert_close(logits(adapter, x), logits(ref, x), atol=1e-5, rtol=1e-5)
    att = adapter.model.vision_model.encoder.layers[0].self_attn
    # torch-pruning leaves HF attributes stale; the adapter must have updated them
    assert att.num_heads == 2 and att.embed_dim == 2 * att.head_dim
    assert att.q_proj.out_features == att.k_proj.out_features == att.v_proj.out_features == 2 * att.head_dim
    assert att.out_proj.in_features == 2 * att.head_dim
    assert g.groups["vision.0.attn"].kept == [0, 2]


def test_kept_heads_are_whole_heads(adapter):
    """Each surviving head's q rows are an intact copy of one original head's rows."""
    att = adapter.model.vision_model.encoder.layers[1].self_attn
    d = att.head_dim
    original = att.q_proj.weight.detach().clone()
    g = trace(adapter)
    remove_units(g, g.groups["vision.1.attn"], [0, 2])
    new = att.q_proj.weight.detach()
    for pos, head in enumerate(g.groups["vision.1.attn"].kept):
        assert torch.equal(new[pos * d:(pos + 1) * d], original[head * d:(head + 1) * d])


def test_channel_removal_matches_zero_masked_copy(adapter):
    ref = clone(adapter)
    x = adapter.example_inputs(3)
    g = trace(adapter)
    drop = list(range(0, 256, 3))
    remove_units(g, g.groups["vision.1.mlp"], drop)
    remove_units(g, g.groups["language.0.mlp"], drop[:10])
    zero_channels(ref, "vision_model.encoder.layers.1.mlp", drop)
    zero_channels(ref, "text_model.encoder.layers.0.mlp", drop[:10])
    torch.testing.assert_close(logits(adapter, x), logits(ref, x), atol=1e-5, rtol=1e-5)
    assert adapter.model.vision_model.encoder.layers[1].mlp.fc1.out_features == 256 - len(drop)


def test_repeated_removal_tracks_original_indices(adapter):
    g = trace(adapter)
    grp = g.groups["language.0.attn"]
    remove_units(g, grp, [0])      # original 0
    remove_units(g, grp, [1])      # position 1 is now original 2
    assert grp.kept == [1, 3]


def test_refuses_to_empty_a_module(adapter):
    g = trace(adapter)
    with pytest.raises(SurgeryError, match="every unit"):
        remove_units(g, g.groups["vision.0.attn"], [0, 1, 2, 3])


def test_layer_missed_by_dependency_graph_is_still_pruned(adapter, monkeypatch):
    """torch-pruning can fail to couple a projection (LLaMA rotary q/k, upstream #527).

    Simulate that failure by dropping k_proj from the dependency group: the surgery must still
    prune k_proj with the same head indices, and the result must stay exact.
    """
    ref = clone(adapter)
    x = adapter.example_inputs(2)
    g = trace(adapter)
    att = adapter.model.vision_model.encoder.layers[0].self_attn
    real = tp.DependencyGraph.get_pruning_group

    def without_k(self, module, fn, idxs):
        group = real(self, module, fn, idxs)
        kept = [item for item in group._group if item.dep.target.module is not att.k_proj]
        group._group = kept
        return group

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", without_k)
    remove_units(g, g.groups["vision.0.attn"], [2])
    assert att.k_proj.out_features == att.q_proj.out_features == 3 * att.head_dim
    zero_heads(ref, "vision_model.encoder.layers.0.self_attn", [2])
    torch.testing.assert_close(logits(adapter, x), logits(ref, x), atol=1e-5, rtol=1e-5)


def test_unaligned_channel_indices_would_scramble_heads(adapter):
    """Why indices always come from whole heads: raw torch-pruning accepts any channel subset."""
    x = adapter.example_inputs(2)
    g = trace(adapter)
    ref = clone(adapter)
    att = adapter.model.vision_model.encoder.layers[0].self_attn
    d = att.head_dim
    # half of head 0 and half of head 1: same count as one head, but not a head
    idxs = list(range(d // 2)) + list(range(d, d + d // 2))
    g.dependency_graph().get_pruning_group(att.q_proj, tp.prune_linear_out_channels, idxs).prune()
    zero_heads(ref, "vision_model.encoder.layers.0.self_attn", [0])
    assert not torch.allclose(logits(adapter, x), logits(ref, x), atol=1e-3)
    assert g.groups["vision.0.attn"].channels([0]) == list(range(d))
