"""`token_prune`: training-free image-token pruning between the layers of a decoder LLM.

PDrop (PyramidDrop): sites at round(L·{1/4, 1/2, 3/4}), each keeping λ times what the one before
kept, scored by the attention the prompt's last token pays with the q / k of the layer about to
run, positions renumbered. FastV: one site at layer K keeping a share, scored with the previous
layer's attention, original positions kept (tokens.md §2, §7). A FLOPs target picks λ (or the
share) by bisection on validation prefills. The sites stay active at inference and are saved in
`mmprune.json`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmprune.context import Context
from mmprune.errors import MMPruneError
from mmprune.measure import group_token_counts
from mmprune.passes.base import FitSplit, Pass, PassParams
from mmprune.runtime.decoder import DECODER_TOWER, DecoderSite, geometric_sites, pdrop_sites
from mmprune.runtime.runtime import TokenRuntime

#: per method: position policy and probe layer of the published code (tokens.md §4)
DEFAULTS = {"pdrop": ("renumber", "current"), "fastv": ("keep_original", "previous")}


class TokenPruneParams(PassParams):
    method: Literal["pdrop", "fastv"] = Field("pdrop", description="pdrop: staged dropping at "
                                              "round(L·{1/4,1/2,3/4}); fastv: one site at `layers[0]`.")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="pdrop: λ, the share each stage keeps of "
                        "what the stage before kept; fastv: the share of image tokens kept. "
                        "Ignored when `flops_target` is set.")
    layers: list[int] | None = Field(None, description="Decoder layers with a site (pdrop default: "
                                     "round(L·{1/4,1/2,3/4}); fastv default: [2]).")
    flops_target: float | None = Field(None, gt=0.0, lt=1.0, description="FLOPs reduction of the "
                                       "whole prefill to reach, relative to the dense model; `keep` "
                                       "is found by bisection on `examples` of `split`.")
    flops_scope: Literal["model", "decoder"] = Field("model", description="What `flops_target` "
                                                     "is a reduction of: the whole prefill (vision "
                                                     "tower, projector, decoder) or the decoder "
                                                     "LLM's share alone.")
    position: Literal["default", "keep_original", "renumber"] = Field(
        "default", description="Positions after a drop: the method's own (pdrop renumbers, fastv "
        "keeps the original ids), or either policy.")
    examples: int = Field(64, ge=1, description="Examples of `split` that size `flops_target`.")
    split: FitSplit = Field("validation", description="Split the FLOPs target is sized on.")


class TokenPrune(Pass):
    """Drop image tokens inside the decoder LLM (PDrop / FastV), scored by an attention probe."""

    name = "token_prune"
    Params = TokenPruneParams
    calibrates = True
    requires = frozenset({"model", "graph", "data"})
    provides = frozenset({"pruned.tokens"})

    def sites(self, num_layers: int, keep: float) -> list[DecoderSite]:
        p = self.params
        if p.method == "fastv":
            layers = p.layers or [2]
            if len(layers) != 1:
                raise MMPruneError(f"token_prune: fastv has one site, got layers {layers}")
            return [DecoderSite(layers[0], keep)]
        return pdrop_sites(num_layers, keep) if p.layers is None else geometric_sites(p.layers, keep)

    def run(self, ctx: Context) -> None:
        p = self.params
        num_layers = ctx.adapter.decoder_layers()
        position, probe = DEFAULTS[p.method]
        position = position if p.position == "default" else p.position
        rt = TokenRuntime.attach(ctx.graph)
        keep = p.keep
        if p.flops_target is not None:
            keep = self._fit(ctx, rt, num_layers, position, probe)
        rt.set_decoder(self.sites(num_layers, keep), position, probe)
        sites = rt.decoder.policy()["sites"]
        ctx.state["token_prune"] = {"method": p.method, "keep": keep, "sites": sites,
                                    "position": position, "probe": probe}
        ctx.log(f"token_prune: {p.method}, sites (layer, kept share of image tokens) {sites}, "
                f"positions {position}")

    def _fit(self, ctx: Context, rt: TokenRuntime, num_layers: int, position: str, probe: str) -> float:
        """The keep share whose prefill FLOPs reduction on the sample is the target (bisection:
        fewer kept tokens never cost more)."""
        p = self.params
        batches = list(ctx.batches(p.split, min(p.examples, 64)))
        batches = batches[:max(1, -(-p.examples // 64))]
        cost = ctx.graph.cost
        tower = None if p.flops_scope == "model" else DECODER_TOWER

        def flops(sites: list[DecoderSite]) -> float:
            rt.set_decoder(sites, position, probe)
            counts = [group_token_counts(ctx, b) for b in batches]
            return float(sum(cost.flops_per_example(c, tower=tower).sum() for c in counts))

        dense = flops([])
        reduction = lambda keep: 1.0 - flops(self.sites(num_layers, keep)) / dense   # noqa: E731
        lo, hi = 1e-4, 1.0
        most = reduction(lo)
        if most < p.flops_target:
            raise MMPruneError(f"token_prune: dropping every image token at these sites removes "
                               f"{most:.3f} of the {p.flops_scope}'s FLOPs, less than "
                               f"the target {p.flops_target}; add earlier sites or prune parameters too")
        for _ in range(30):
            mid = (lo + hi) / 2
            if reduction(mid) >= p.flops_target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-4:
                break
        rt.set_decoder([])
        return lo
