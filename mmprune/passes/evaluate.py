"""`evaluate`: record task metrics, FLOPs, parameters, size and latency at this point of the plan."""
from __future__ import annotations

from pydantic import Field

from mmprune.context import Context
from mmprune.measure import measure
from mmprune.passes.base import Pass, PassParams


class EvaluateParams(PassParams):
    split: str = Field("validation", description="Split to measure on. Use 'validation' for "
                       "decisions; the report's baseline/final numbers always come from the "
                       "recipe's `evaluation.split`.")
    max_examples: int | None = Field(None, ge=1, description="At most this many examples.")
    batch_size: int = Field(32, ge=1, description="Evaluation batch size.")
    latency: bool = Field(True, description="Also time the forward pass (median of repeats).")
    label: str | None = Field(None, description="Name of this measurement in the report.")


class Evaluate(Pass):
    """Measure task metrics, FLOPs, params, size and latency of the model as it is now.

    Latency uses the recipe's `evaluation` settings (batch size, repeats, threads), so the
    numbers compare with the report's baseline and final.
    """

    name = "evaluate"
    Params = EvaluateParams
    requires = frozenset({"model", "data"})
    provides = frozenset({"metrics"})

    def run(self, ctx: Context) -> None:
        p = self.params
        spec = ctx.evaluation.model_copy(update=dict(split=p.split, batch_size=p.batch_size,
                                                     max_examples=p.max_examples))
        result = measure(ctx, spec, with_latency=p.latency)
        result["label"] = p.label or f"after {len(ctx.state.get('_records', []))} passes"
        ctx.evaluations.append(result)
