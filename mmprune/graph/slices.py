"""Per-unit views of parameters: which rows / columns of which weights belong to each unit."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmprune.graph.units import HeadGroup, UnitGroup


def unit_params(model: nn.Module, group: UnitGroup) -> list[tuple[nn.Parameter, int]]:
    """(parameter, dimension along which its channels run) for every parameter a unit owns."""
    root = model.get_submodule(group.site.path)
    if isinstance(group, HeadGroup):
        outs = [getattr(root, n) for n in (group.site.q, group.site.k, group.site.v)]
        ins = [getattr(root, group.site.o)]
    else:
        outs = [getattr(root, n) for n in group.site.fc_in]
        ins = [getattr(root, group.site.fc_out)]
    pairs = [(lin.weight, 0) for lin in outs] + [(lin.bias, 0) for lin in outs if lin.bias is not None]
    return pairs + [(lin.weight, 1) for lin in ins]


def reduce_per_unit(group: UnitGroup, tensors: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Sum each tensor over everything but its channel dimension, then over each unit's channels."""
    width = group.site.head_dim if isinstance(group, HeadGroup) else 1
    total = torch.zeros(group.size, dtype=torch.float64)
    for t, dim in tensors:
        per_channel = t.detach().double().movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)
        total += per_channel.reshape(group.size, width).sum(1)
    return total


def score_units(model: nn.Module, group: UnitGroup,
                fn: Callable[[nn.Parameter], torch.Tensor]) -> torch.Tensor:
    """Per-unit sum of the elementwise `fn(param)` over every parameter the unit owns."""
    return reduce_per_unit(group, [(fn(p), dim) for p, dim in unit_params(model, group)])
