"""`trace(adapter)`: a model as prunable unit groups, token sites, a dependency graph and a cost model."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import networkx as nx
import torch
import torch_pruning as tp

from mmprune.eval_mode import eval_mode
from mmprune.graph.cost import CostModel, kv_head_param_count, unit_param_count
from mmprune.graph.units import ChannelGroup, HeadGroup, TokenSite, UnitGroup
from mmprune.models.base import Adapter


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensor_leaves(o)]
    return []


class ModelGraph:
    """Prunable structure of one model, tagged by tower and layer.

    `groups` maps an id such as 'vision.3.attn' to a HeadGroup or ChannelGroup; `nx` is a networkx
    DiGraph of groups and token sites in data-flow order; `cost` is the analytic cost model. The
    torch-pruning DependencyGraph that finds the coupled channels is built on first use.
    """

    def __init__(self, adapter: Adapter, groups: dict[str, UnitGroup], token_sites: list[TokenSite],
                 cost: CostModel):
        self.adapter = adapter
        self.groups = groups
        self.token_sites = token_sites
        self.cost = cost
        self._dg: tp.DependencyGraph | None = None
        self.nx = self._build_nx()

    @property
    def towers(self) -> list[str]:
        return list(self.cost.towers)

    def _build_nx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        sites = {(s.spec.tower, s.spec.layer): s for s in self.token_sites}
        for tower in self.towers:
            chain: list[str] = []
            layers = sorted({grp.layer for grp in self.groups.values() if grp.tower == tower})
            for layer in layers:
                for gid in (f"{tower}.{layer}.attn",):
                    if gid in self.groups:
                        chain.append(gid)
                if (tower, layer) in sites:
                    chain.append(sites[(tower, layer)].id)
                if f"{tower}.{layer}.mlp" in self.groups:
                    chain.append(f"{tower}.{layer}.mlp")
            for node in chain:
                if node in self.groups:
                    grp = self.groups[node]
                    g.add_node(node, type=type(grp).__name__, tower=tower, layer=grp.layer,
                               kind=grp.kind, size=grp.size, total=grp.total, module=grp.site.path)
                else:
                    site = next(s for s in self.token_sites if s.id == node)
                    g.add_node(node, type="TokenSite", tower=tower, layer=site.spec.layer,
                               protected=list(site.spec.protected))
            nx.add_path(g, chain)
        return g

    def select(self, tower: str | None = None, kind: str | None = None) -> list[UnitGroup]:
        return [g for g in self.groups.values()
                if tower in (None, g.tower) and kind in (None, g.kind)]

    def structure(self) -> dict[str, dict]:
        """Per group: kind, original size and kept original indices (what mmprune.json records)."""
        return {gid: {"kind": g.kind, "total": g.total, "kept": list(g.kept)}
                for gid, g in self.groups.items()}

    def dependency_graph(self) -> tp.DependencyGraph:
        if self._dg is None:
            model = self.adapter.model
            with eval_mode(model), torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Unwrapped parameters")
                self._dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=self.adapter.example_inputs(),
                    output_transform=lambda out: sum(t.sum() for t in _tensor_leaves(out)))
        return self._dg


def trace(adapter: Adapter, tokens: Mapping[str, float] | None = None) -> ModelGraph:
    """Describe the dense `adapter.model` as a ModelGraph.

    `tokens` sets the default tokens per example of each tower for the cost model (default: the
    adapter's example inputs). A saved pruned model is rebuilt dense and then shrunk with
    `keep_units` (see mmprune.saved), so tracing only ever sees dense models.
    """
    groups: dict[str, UnitGroup] = {}
    for site in adapter.attention_sites():
        g = HeadGroup(site, site.num_heads, list(range(site.num_heads)))
        groups[g.id] = g
    for site in adapter.mlp_sites():
        g = ChannelGroup(site, site.width, list(range(site.width)))
        groups[g.id] = g
    token_sites = [TokenSite(spec) for spec in adapter.token_sites()]
    towers = {t.name: t for t in adapter.towers()}
    unit_params = {gid: unit_param_count(adapter.model, g) for gid, g in groups.items()}
    kv_params = {gid: kv_head_param_count(adapter.model, g) for gid, g in groups.items()
                 if isinstance(g, HeadGroup) and g.site.num_kv_heads is not None}
    total = sum(p.numel() for p in adapter.model.parameters())
    fixed = (total - sum(unit_params[gid] * g.size for gid, g in groups.items())
             - sum(n * groups[gid].site.num_kv_heads for gid, n in kv_params.items()))
    if tokens is None:
        per = adapter.tokens_per_example(adapter.example_inputs())
        tokens = {k: float(v.mean()) for k, v in per.items()}
    cost = CostModel(groups, towers, unit_params, fixed, dict(tokens), kv_params)
    return ModelGraph(adapter, groups, token_sites, cost)
