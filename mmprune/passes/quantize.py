"""`quantize`: int8 dynamic quantization of Linear layers, chained after pruning."""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Literal

from pydantic import Field
from torch import nn

from mmprune import quant
from mmprune.context import Context
from mmprune.errors import MMPruneError
from mmprune.passes.base import Pass, PassParams


class QuantizeParams(PassParams):
    scheme: Literal["int8_dynamic"] = Field("int8_dynamic", description="int8 weights, activations "
                                            "quantized on the fly (torch dynamic quantization).")
    towers: list[str] | None = Field(None, description="Only Linear layers inside these towers' "
                                     "blocks (default: every Linear layer of the model).")
    exclude: list[str] = Field([], description="fnmatch patterns of module names to keep in float, "
                               "e.g. '*.out_proj'.")


class Quantize(Pass):
    """Quantize Linear layers to int8 (dynamic): smaller on disk, faster matmuls on CPU."""

    name = "quantize"
    Params = QuantizeParams
    requires = frozenset({"model"})
    provides = frozenset({"quantized"})
    excludes = frozenset({"quantized"})

    def run(self, ctx: Context) -> None:
        p = self.params
        prefixes = None
        if p.towers is not None:
            unknown = set(p.towers) - set(ctx.graph.towers)
            if unknown:
                raise MMPruneError(f"quantize: unknown tower(s) {sorted(unknown)}; this model has "
                                   f"{', '.join(ctx.graph.towers)}.")
            prefixes = tuple(g.site.path.rsplit(".", 2)[0] + "." for g in ctx.graph.groups.values()
                             if g.tower in p.towers)
        names = [n for n, m in ctx.model.named_modules()
                 if type(m) is nn.Linear
                 and (prefixes is None or n.startswith(prefixes))
                 and not any(fnmatch(n, pat) for pat in p.exclude)]
        if not names:
            raise MMPruneError("quantize: no Linear layer matches the towers/exclude settings.")
        quant.quantize_linears(ctx.model, names)
        ctx.state["quantization"] = {"scheme": p.scheme, "layers": len(names)}
