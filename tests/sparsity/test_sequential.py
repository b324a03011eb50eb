"""Sequential block-by-block pruning on a tiny CLIP: real per-block inputs, exact per-row counts."""
from __future__ import annotations

import copy

import pytest
import torch

from mmprune.models.clip import CLIPAdapter
from mmprune.sparsity.sequential import (
    Block,
    capture_inputs,
    linear_layers,
    prune_block,
    prune_sequential,
)


def _clip():
    model = CLIPAdapter.tiny_model(0)
    adapter = CLIPAdapter(model, *CLIPAdapter.default_processors(model))
    return adapter


def _batches(adapter, n=2):
    out = []
    for k in range(n):
        b = adapter.example_inputs(3)
        b["pixel_values"] = b["pixel_values"] + k
        b["attention_mask"][1, 5:] = 0      # one padded caption
        out.append(b)
    return out


def _blocks(adapter):
    return [Block(spec.tower, i, f"{spec.encoder}.{spec.layers}.{i}")
            for spec in adapter.managed_towers()
            for i in range(len(getattr(adapter.model.get_submodule(spec.encoder), spec.layers)))]


@torch.no_grad()
def test_captured_inputs_are_the_real_block_inputs():
    """Replay fidelity: what the hook records for block k is what block k receives in a full forward."""
    adapter = _clip()
    batch = _batches(adapter, 1)[0]
    for block in _blocks(adapter):
        module = adapter.model.get_submodule(block.path)
        (args, kwargs), = capture_inputs(adapter.model, module, [batch], adapter.forward)
        seen = []
        h = module.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
        adapter.forward(batch)
        h.remove()
        assert torch.equal(args[0], seen[0][0][0])
        assert kwargs.keys() == seen[0][1].keys()
        for key, value in kwargs.items():
            if torch.is_tensor(value):
                assert torch.equal(value, seen[0][1][key]), (block, key)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
@torch.no_grad()
def test_every_block_row_has_its_zeros_and_target_zero_is_identity(criterion):
    adapter = _clip()
    batches = _batches(adapter)
    dense = adapter.forward(batches[0]).logits_per_image
    blocks = _blocks(adapter)
    other = copy.deepcopy(adapter)
    same = other.model
    for b in blocks:    # the kernels themselves at s = 0 (prune_sequential would skip the block)
        module = same.get_submodule(b.path)
        masks = prune_block(module, capture_inputs(same, module, batches, other.forward), 0.0,
                            criterion)
        assert all(m.all() for m in masks.values())
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(),
                                                 adapter.model.state_dict().values()))
    masks = prune_sequential(adapter.model, blocks, batches, adapter.forward, lambda b: 0.5,
                             criterion, valid_of=lambda b, batch: None if b.tower == "vision"
                             else batch["attention_mask"].bool())
    assert len(masks) == sum(len(linear_layers(adapter.model.get_submodule(b.path))) for b in blocks)
    for name, mask in masks.items():
        w = adapter.model.get_parameter(name)
        assert (w[~mask] == 0).all()
        if criterion != "sparsegpt":       # SparseGPT's threshold is per column block, not per row
            assert ((~mask).sum(1) == mask.shape[1] // 2).all(), name
        else:
            assert (~mask).sum() == mask.numel() // 2
    assert not torch.allclose(adapter.forward(batches[0]).logits_per_image, dense)


@torch.no_grad()
def test_padding_does_not_change_the_masks():
    """Statistics leave padded text tokens out: junk in the padding changes nothing."""
    adapter = _clip()
    batches = _batches(adapter)
    junk = [dict(b) for b in batches]
    for b in junk:
        ids = b["input_ids"].clone()
        ids[1, 5:] = 7                         # different (padded) tokens behind the mask
        b["input_ids"] = ids
    valid = lambda b, batch: None if b.tower == "vision" else batch["attention_mask"].bool()
    blocks = [b for b in _blocks(adapter) if b.tower == "language"]
    other = copy.deepcopy(adapter)
    m1 = prune_sequential(adapter.model, blocks, batches, adapter.forward, lambda b: 0.5, "wanda",
                          valid_of=valid)
    m2 = prune_sequential(other.model, blocks, junk, other.forward, lambda b: 0.5, "wanda",
                          valid_of=valid)
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
