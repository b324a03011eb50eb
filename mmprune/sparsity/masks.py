"""Sparsity masks that travel with a model: kept through fine-tuning, saved bit-packed beside the
dense weights, restored and checked on load.

Unstructured and N:M sparsity keep dense shapes (ecoflap.md §6: stored dense with a mask). The
mask is what makes it sparsity rather than a few zeros: fine-tuning re-applies it after every
optimizer step, and an export records it in 1 bit per weight.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn

_MASKS: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Record `masks` (parameter name -> bool, True = kept) as part of `model`, merged with any
    it already has (a later prune of the same weight keeps only what both kept)."""
    have = _MASKS.setdefault(model, {})
    for name, m in masks.items():
        m = m.bool().cpu()
        have[name] = have[name] & m if name in have else m


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(_MASKS.get(model, {}))


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every masked weight (after an optimizer step moved them)."""
    masks = _MASKS.get(model)
    if not masks:
        return
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name in params:
            params[name].mul_(m.to(device=params[name].device, dtype=params[name].dtype))


def pack(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """1 bit per weight (uint8, numpy's packbits order); shapes are recorded separately."""
    return {name: torch.from_numpy(np.packbits(m.numpy().reshape(-1))) for name, m in masks.items()}


def unpack(packed: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, bits in packed.items():
        shape = shapes[name]
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool)).view(*shape)
    return out


def summary(masks: dict[str, torch.Tensor]) -> dict:
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {"masked_weights": len(masks), "masked_params": total,
            "sparsity": zeros / total if total else 0.0}
