"""`prune_structured`: remove attention heads and MLP channels physically to a FLOPs or params target."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from mmprune.context import Context
from mmprune.errors import MMPruneError
from mmprune.graph import ModelGraph, remove_units
from mmprune.graph.units import HeadGroup, UnitGroup
from mmprune.passes.base import Pass, PassParams


class StructuredParams(PassParams):
    target: float = Field(0.5, ge=0.0, lt=1.0, description="Fraction of the dense model's FLOPs "
                          "(or parameters) to remove, in [0, 1). Relative to the unpruned model.")
    metric: Literal["flops", "params"] = Field("flops", description="What `target` counts: "
                                               "per-example FLOPs or parameters.")
    scope: Literal["global", "per_tower"] = Field("global", description="global: one ranking over "
                                                  "all towers; per_tower: each tower meets the target.")
    towers: list[str] | None = Field(None, description="Towers that may be pruned (default: all).")
    units: list[Literal["head", "channel"]] = Field(["head", "channel"],
                                                    description="Unit kinds that may be removed.")
    score: str = Field("scores.params", description="Context fact holding the unit scores.")
    normalize: Literal["none", "group_mean"] = Field("none", description="none: rank raw scores "
                                                     "(Taylor scores estimate the loss increase of "
                                                     "removing a unit, so they compare across modules); "
                                                     "group_mean: divide by the module's mean first.")
    per_cost: bool = Field(True, description="Rank by score per FLOP (or parameter) the unit costs, "
                           "so a head and a channel compete on importance per unit of budget.")
    min_heads: int = Field(1, ge=1, description="Heads every attention module keeps at least.")
    min_channel_frac: float = Field(0.02, gt=0.0, le=1.0, description="Share of each MLP's "
                                    "channels it keeps at least.")

    @field_validator("units")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one unit kind")
        return v

    @field_validator("score")
    @classmethod
    def _a_score_table(cls, v: str) -> str:
        if not v.startswith("scores."):
            raise ValueError("must name a score fact such as 'scores.params'")
        return v

    @model_validator(mode="after")
    def _per_tower_flops(self) -> StructuredParams:
        if self.scope == "per_tower" and self.metric == "params":
            raise ValueError("scope 'per_tower' supports metric 'flops' only")
        return self


@dataclass(frozen=True)
class Candidate:
    group: str
    position: int
    priority: float   # lower = removed first
    cost: float


def _cost(graph: ModelGraph, group: UnitGroup, metric: str) -> float:
    if metric == "params":
        return graph.cost.unit_param_cost(group)
    return graph.cost.unit_flops(group)


def _dense_total(graph: ModelGraph, metric: str, tower: str | None) -> float:
    dense = {gid: g.total for gid, g in graph.groups.items()}
    if metric == "params":
        return float(graph.cost.params(dense))
    return graph.cost.flops(sizes=dense, tower=tower)


def _current_total(graph: ModelGraph, metric: str, tower: str | None) -> float:
    if metric == "params":
        return float(graph.cost.params())
    return graph.cost.flops(tower=tower)


def _floor(group: UnitGroup, p: StructuredParams) -> int:
    if isinstance(group, HeadGroup):
        return min(p.min_heads, group.total)
    return max(1, math.ceil(p.min_channel_frac * group.total))


def select_removals(graph: ModelGraph, scores: dict[str, torch.Tensor], p: StructuredParams,
                    groups: list[UnitGroup], budget: float) -> dict[str, list[int]]:
    """Greedy knapsack: drop units in order of score per unit cost until `budget` is removed."""
    candidates = []
    for g in groups:
        if g.id not in scores:
            raise MMPruneError(f"prune_structured: '{p.score}' has no scores for {g.id}; "
                               "run a scoring pass after any structural change.")
        s = scores[g.id].double()
        if s.numel() != g.size:
            raise MMPruneError(f"prune_structured: {g.id} has {g.size} units but {s.numel()} "
                               "scores (stale scores: score again after pruning).")
        if p.normalize == "group_mean":
            s = s / s.mean().clamp_min(1e-30)
        cost = _cost(graph, g, p.metric)
        div = cost if p.per_cost else 1.0
        candidates += [Candidate(g.id, i, float(s[i]) / div, cost) for i in range(g.size)]
    candidates.sort(key=lambda c: (c.priority, c.group, c.position))
    left = {g.id: g.size - _floor(g, p) for g in groups}
    chosen: dict[str, list[int]] = {}
    removed = 0.0
    for c in candidates:
        if removed >= budget:
            break
        if left[c.group] <= 0:
            continue
        left[c.group] -= 1
        chosen.setdefault(c.group, []).append(c.position)
        removed += c.cost
    if removed < budget:
        raise MMPruneError(f"prune_structured: the target cannot be reached: at most "
                           f"{removed:.4g} of the {budget:.4g} {p.metric} asked for can be removed "
                           "with the minimum heads/channels per module. Lower `target`, prune more "
                           "towers or unit kinds, or lower the minimums.")
    return chosen


class PruneStructured(Pass):
    """Remove the least important heads and MLP channels physically, to a FLOPs or params target."""

    name = "prune_structured"
    Params = StructuredParams
    requires = frozenset({"model", "graph", "scores.params"})
    provides = frozenset({"pruned.structured"})
    excludes = frozenset({"quantized"})

    def needs(self) -> frozenset[str]:
        return frozenset({"model", "graph", self.params.score})

    def run(self, ctx: Context) -> None:
        p, graph = self.params, ctx.graph
        towers = p.towers or graph.towers
        unknown = [t for t in towers if t not in graph.towers]
        if unknown:
            raise MMPruneError(f"prune_structured: unknown tower(s) {unknown}; this model has "
                               f"{', '.join(graph.towers)}.")
        scopes = [[t] for t in towers] if p.scope == "per_tower" else [towers]
        scores = ctx.scores[p.score]
        plan: dict[str, list[int]] = {}
        for scope in scopes:
            tower = scope[0] if p.scope == "per_tower" else None
            dense = _dense_total(graph, p.metric, tower)
            budget = _current_total(graph, p.metric, tower) - (1 - p.target) * dense
            if budget <= 0:
                continue
            groups = [g for g in graph.groups.values() if g.tower in scope and g.kind in p.units]
            plan.update(select_removals(graph, scores, p, groups, budget))
        for gid, positions in ctx.progress(sorted(plan.items()), "prune_structured"):
            remove_units(graph, graph.groups[gid], positions)
        # scores were per unit of the old structure; drop the removed units' entries
        for gid, positions in plan.items():
            keep = torch.ones(scores[gid].numel(), dtype=torch.bool)
            keep[positions] = False
            scores[gid] = scores[gid][keep]
        ctx.state.setdefault("prune_structured", []).append(
            {"target": p.target, "metric": p.metric, "scope": p.scope,
             "removed_units": {gid: len(v) for gid, v in sorted(plan.items())}})
