"""Per-unit views of parameters: which rows / columns of which weights belong to each unit."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmprune.graph.units import HeadGroup, UnitGroup


def unit_params(model: nn.Module, group: UnitGroup) -> list[tuple[nn.Parameter, int, int]]:
    """(parameter, dimension its channels run along, folds) for every parameter a unit owns.

    `folds` > 1 marks a fused projection whose channel dimension holds that many stacked copies
    of the unit layout (BLIP's `qkv`: [q; k; v]); a unit owns its channels in every copy.
    A grouped-query head owns its q rows and o columns only: k and v belong to its KV head,
    shared with the group (as `cost.unit_param_count` counts them).
    """
    root = model.get_submodule(group.site.path)
    if isinstance(group, HeadGroup):
        s = group.site
        names = (s.q,) if s.fused_qkv or s.num_kv_heads is not None else (s.q, s.k, s.v)
        fold = 3 if s.fused_qkv else 1
        outs = [(root.get_submodule(n), fold) for n in names]
        ins = [root.get_submodule(s.o)]
    else:
        outs = [(root.get_submodule(n), 1) for n in group.site.fc_in]
        ins = [root.get_submodule(group.site.fc_out)]
    pairs = [(lin.weight, 0, f) for lin, f in outs] + [(lin.bias, 0, f) for lin, f in outs
                                                        if lin.bias is not None]
    return pairs + [(lin.weight, 1, 1) for lin in ins]


def reduce_per_unit(group: UnitGroup, tensors: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
    """Sum each tensor over everything but its channel dimension, then over each unit's channels."""
    width = group.site.head_dim if isinstance(group, HeadGroup) else 1
    total = torch.zeros(group.size, dtype=torch.float64)
    for t, dim, fold in tensors:
        per_channel = t.detach().double().movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)
        total += per_channel.reshape(fold, group.size, width).sum((0, 2))
    return total


def score_units(model: nn.Module, group: UnitGroup,
                fn: Callable[[nn.Parameter], torch.Tensor]) -> torch.Tensor:
    """Per-unit sum of the elementwise `fn(param)` over every parameter the unit owns."""
    return reduce_per_unit(group, [(fn(p), dim, fold) for p, dim, fold in unit_params(model, group)])
