"""Analytic cost model: FLOPs and parameters as functions of kept heads, channels and tokens.

FLOPs = 2 × multiply-accumulates of every matmul and convolution (what
torch.utils.flop_counter counts): per self-attention layer with N tokens, width D and H kept heads
of size d: 8·N·D·H·d + 4·N²·H·d (grouped-query, with H_kv key / value heads:
4·N·D·(H + H_kv)·d + 4·N²·H·d); per cross-attention with N_q queries and N_kv keys of width D_kv:
4·N_q·D·H·d + 4·N_kv·D_kv·H·d + 4·N_q·N_kv·H·d; per MLP with m kept channels: 4·N·D·m (SwiGLU: 6·N·D·m). Norms,
softmax and activations are not counted. Cross-attention towers read their key count from the
token entry '<tower>_kv'.

A tower can run more than once per example (BLIP's NLVR model reads each image of a pair in a pass
of its own): its token counts are then [B, P], one column per pass, and an example's FLOPs are the
sum over its passes, since the quadratic attention terms are per pass.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mmprune.graph.units import ChannelGroup, HeadGroup, UnitGroup
from mmprune.models.base import TowerSpec


def attention_flops(tokens: float, hidden: int, heads: int, head_dim: int,
                    kv_heads: int | None = None) -> float:
    """q and o for `heads` query heads, k and v for `kv_heads` (grouped-query; default: as many)."""
    kv = heads if kv_heads is None else kv_heads
    return (4 * tokens * hidden * (heads + kv) * head_dim + 4 * tokens ** 2 * heads * head_dim)


def kv_heads_kept(group: HeadGroup, size: int) -> int | None:
    """Key / value heads a grouped-query module keeps with `size` query heads: those with a kept
    query head. For a hypothetical size the kept set is unknown, and every group that could still
    have a head is counted (an upper bound)."""
    if group.site.num_kv_heads is None:
        return None
    now = len(group.site.kv_heads(group.kept))
    return now if size == group.size else min(now, size)


def cross_attention_flops(queries, keys, hidden: int, kv_hidden: int, heads: int, head_dim: int):
    """q and o on the queries, k and v on the other tower's states, QKᵀ and A·V between them."""
    width = heads * head_dim
    return 4 * queries * hidden * width + 4 * keys * kv_hidden * width + 4 * queries * keys * width


def mlp_flops(tokens: float, hidden: int, channels: int, n_in: int = 1) -> float:
    return 2 * (n_in + 1) * tokens * hidden * channels


def over_passes(flops):
    """FLOPs per example from FLOPs per pass: [B, P] (one column per pass) sums to [B]."""
    return flops.sum(-1) if isinstance(flops, torch.Tensor) and flops.dim() == 2 else flops


@dataclass
class CostModel:
    groups: Mapping[str, UnitGroup]
    towers: Mapping[str, TowerSpec]
    unit_params: Mapping[str, int]     # group id -> parameters of one unit
    fixed_params: int                  # parameters outside every unit
    tokens: dict[str, float]           # default tokens per example, per tower
    #: grouped-query groups: parameters of one key / value head (k and v rows)
    kv_params: Mapping[str, int] = field(default_factory=dict)

    def group_flops(self, group: UnitGroup, size: int | None = None,
                    tokens: Mapping[str, float] | None = None) -> float:
        n = (tokens or self.tokens)[group.tower]
        d = self.towers[group.tower].hidden_size
        size = group.size if size is None else size
        if isinstance(group, HeadGroup):
            site = group.site
            if site.kv_hidden_size is not None:  # cross-attention: keys/values from another tower
                kv = (tokens or self.tokens).get(f"{group.tower}_kv", n)
                return cross_attention_flops(n, kv, d, site.kv_hidden_size, size, site.head_dim)
            return attention_flops(n, d, size, site.head_dim, kv_heads_kept(group, size))
        return mlp_flops(n, d, size, len(group.site.fc_in))

    def unit_flops(self, group: UnitGroup, tokens: Mapping[str, float] | None = None) -> float:
        """FLOPs one unit of `group` costs per example: the group's FLOPs per kept unit (every
        term is linear in units, except grouped-query k / v, shared by a KV head's query heads)."""
        return self.group_flops(group, None, tokens) / max(group.size, 1)

    def flops(self, tokens: Mapping[str, float] | None = None,
              sizes: Mapping[str, int] | None = None, tower: str | None = None) -> float:
        """Per-example FLOPs with the current structure, or with `sizes` (group id -> kept units)."""
        total = sum(t.extra_flops for name, t in self.towers.items() if tower in (None, name))
        for gid, g in self.groups.items():
            if tower in (None, g.tower):
                total += self.group_flops(g, None if sizes is None else sizes.get(gid, g.size), tokens)
        return float(total)

    def flops_per_example(self, counts: Mapping[str, torch.Tensor],
                          sizes: Mapping[str, int] | None = None,
                          tower: str | None = None) -> torch.Tensor:
        """FLOPs of each example [B] from its own token counts at every unit group.

        `counts` maps a group id to tokens per example (attention: tokens entering the block;
        MLP: tokens kept after the block's token site), as `TokenRuntime.counts()` reports them.
        Groups without counts use the tower default. Quadratic attention terms are evaluated per
        example, so the mean of this is not the FLOPs at the mean token count.
        """
        b = len(next(iter(counts.values()))) if counts else 1
        total = torch.zeros(b, dtype=torch.float64)
        for name, t in self.towers.items():
            if tower in (None, name):   # the patch embedding runs in every pass of its tower
                total += t.extra_flops * self._passes(counts, name)
        for gid, g in self.groups.items():
            if tower not in (None, g.tower):
                continue
            n, kv = counts.get(gid), counts.get(f"{gid}:kv")
            tokens = {**self.tokens, g.tower: n if n is not None else self.tokens[g.tower]}
            if kv is not None:
                tokens[f"{g.tower}_kv"] = kv
            total = total + over_passes(self.group_flops(
                g, None if sizes is None else sizes.get(gid, g.size), tokens))
        return total

    def _passes(self, counts: Mapping[str, torch.Tensor], tower: str) -> int:
        """How many passes per example `tower` ran (1 unless its counts are [B, P]); a count's
        key is a group id, or '<group id>:kv' for a cross-attention's keys."""
        return max((c.shape[1] for key, c in counts.items()
                    if c.dim() == 2 and getattr(self.groups.get(key.split(":")[0]), "tower", None) == tower),
                   default=1)

    def unit_param_cost(self, group: UnitGroup) -> float:
        """Parameters one unit of `group` stands for: the group's parameters per kept unit, so a
        grouped-query head carries its share of the k / v rows its KV head goes with."""
        kv = self.kv_params[group.id] * kv_heads_kept(group, group.size) if group.id in self.kv_params else 0
        return (self.unit_params[group.id] * group.size + kv) / max(group.size, 1)

    def params(self, sizes: Mapping[str, int] | None = None) -> int:
        total = self.fixed_params
        for gid, g in self.groups.items():
            size = g.size if sizes is None else sizes.get(gid, g.size)
            total += self.unit_params[gid] * size
            if gid in self.kv_params:
                total += self.kv_params[gid] * kv_heads_kept(g, size)
        return total


def unit_param_count(model, group: UnitGroup) -> int:
    """Parameters removed with one unit of `group`, read off the live modules."""
    root = model.get_submodule(group.site.path)
    if isinstance(group, HeadGroup):
        d = group.site.head_dim
        per_head = 0
        s = group.site
        # grouped-query: k and v belong to the KV heads, counted by `kv_head_param_count`
        names = (s.q,) * 3 if s.fused_qkv else (s.q,) if s.num_kv_heads is not None else (s.q, s.k, s.v)
        for name in names:
            lin = root.get_submodule(name)
            per_head += d * lin.in_features + (d if lin.bias is not None else 0)
        per_head += d * root.get_submodule(group.site.o).out_features
        return per_head
    assert isinstance(group, ChannelGroup)
    per = 0
    for name in group.site.fc_in:
        lin = root.get_submodule(name)
        per += lin.in_features + (1 if lin.bias is not None else 0)
    per += root.get_submodule(group.site.fc_out).out_features
    return per


def kv_head_param_count(model, group: HeadGroup) -> int:
    """Parameters of one key / value head of a grouped-query module (k and v rows)."""
    s, d = group.site, group.site.head_dim
    root = model.get_submodule(s.path)
    return sum(d * lin.in_features + (d if lin.bias is not None else 0)
               for lin in (root.get_submodule(s.k), root.get_submodule(s.v)))
