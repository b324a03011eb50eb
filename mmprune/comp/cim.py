"""CIP: token-weighted structured-Wanda importance of heads and MLP channels (comp.md §3.2).

The runtime hands every managed block's head contexts and MLP activations to `CIPStatistics`
with the CIT scores of the tokens they were computed on. The statistics are running weighted
second moments per input channel of W_o / W_2; the score reads the *current* |W| when asked.
"""
from __future__ import annotations

import torch

from mmprune.graph.model_graph import ModelGraph
from mmprune.runtime.tokens import cip_weights


class CIPStatistics:
    """Running Σ ω·X² per channel, per unit group. `token_weighted=False` gives plain Wanda."""

    def __init__(self, graph: ModelGraph, token_weighted: bool = True):
        self.graph = graph
        self.token_weighted = token_weighted
        self.sums: dict[str, torch.Tensor] = {}
        self.examples: dict[str, int] = {}
        self._ids = {(g.tower, g.layer, g.kind): gid for gid, g in graph.groups.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.examples.clear()

    def _weights(self, s, valid, global_) -> torch.Tensor:
        if self.token_weighted:
            return cip_weights(s, valid, global_)
        return valid.to(s.dtype)  # ‖X_{:,i}‖₂ over the real tokens: structured Wanda

    def _add(self, gid: str | None, x: torch.Tensor, w: torch.Tensor) -> None:
        if gid is None:
            return
        with torch.no_grad():
            moment = torch.einsum("bn,bnc->c", w.to(x.dtype), x.detach().pow(2)).double()
        if gid in self.sums and self.sums[gid].shape == moment.shape:
            self.sums[gid] += moment
        else:
            self.sums[gid] = moment
            self.examples[gid] = 0
        self.examples[gid] += x.shape[0]

    # ---- the runtime's Observer interface
    def attention(self, tower, layer, context, s, valid, global_) -> None:
        self._add(self._ids.get((tower, layer, "head")), context, self._weights(s, valid, global_))

    def mlp(self, tower, layer, hidden, s, valid, global_) -> None:
        self._add(self._ids.get((tower, layer, "channel")), hidden, self._weights(s, valid, global_))

    # ---- scores
    def scores(self) -> dict[str, torch.Tensor]:
        """Per group, one score per current unit: mean_j |W_ij| · sqrt(G_i / examples)."""
        out = {}
        adapter = self.graph.adapter
        towers = {spec.tower: spec for spec in adapter.managed_towers()}   # LLaVA: none
        towers.update({spec.cross_tower: spec for spec in towers.values() if spec.cross_tower})
        for gid, moment in self.sums.items():
            g = self.graph.groups[gid]
            spec = towers.get(g.tower)
            if spec is None:        # a decoder LLM's layer (no managed tower): the sites say
                lin = adapter.module(f"{g.site.path}.{g.site.o if g.kind == 'head' else g.site.fc_out}")
            else:
                layer = getattr(adapter.module(spec.encoder), spec.layers)[g.layer]
                if g.kind != "head":
                    lin = spec.ops.down_proj(layer)
                elif g.tower == spec.tower:
                    lin = spec.ops.out_proj(layer)
                else:
                    lin = spec.ops.cross_out_proj(layer)
            # torch keeps W as [out, in]; the paper's rows (input channels) are its columns
            w = lin.weight.detach().abs().double().mean(dim=0)
            per_channel = w * (moment / max(self.examples[gid], 1)).sqrt()
            if g.kind == "head":
                per_channel = per_channel.view(g.size, -1).mean(dim=1)
            out[gid] = per_channel.float()
        return out
