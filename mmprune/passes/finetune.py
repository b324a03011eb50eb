"""`finetune`: train the pruned model (token pruning active), select the best step on validation."""
from __future__ import annotations

import copy
from itertools import islice

from pydantic import Field

from mmprune.context import Context
from mmprune.errors import MMPruneError
from mmprune.measure import headline, measure
from mmprune.passes.base import FitSplit, Pass, PassParams
from mmprune.training import Trainer, batch_stream


class FinetuneParams(PassParams):
    steps: int = Field(200, ge=1, description="Optimiser steps.")
    lr: float = Field(1e-5, gt=0.0, description="AdamW learning rate (cosine to 0).")
    warmup: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay on weight matrices.")
    batch_size: int = Field(32, ge=2, description="Global batch size (split across torchrun ranks).")
    kd_weight: float = Field(0.0, ge=0.0, description="Weight of distillation from the dense model "
                             "(0: task loss only).")
    kd_temperature: float = Field(1.0, gt=0.0, description="Softmax temperature of distillation.")
    eval_every: int | None = Field(None, ge=1, description="Validate every this many steps "
                                   "(default: once at the end).")
    select: bool = Field(True, description="Keep the weights of the best validation evaluation "
                         "(else the last), among those within the FLOPs target.")
    max_flops: float | None = Field(None, gt=0.0, description="Largest mean validation FLOPs per "
                                    "example a selected step may have (default: the last comp "
                                    "pass's target plus its tolerance).")
    train_split: FitSplit = Field("train", description="Split trained on.")
    val_split: FitSplit = Field("validation", description="Split that selects the step (never test).")
    val_examples: int | None = Field(None, ge=1, description="Validation examples per evaluation "
                                     "(default: the whole split).")


class Finetune(Pass):
    """Fine-tune the compressed model with its token pruning active; select on validation."""

    name = "finetune"
    Params = FinetuneParams
    calibrates = True
    requires = frozenset({"model", "graph", "data"})
    provides = frozenset({"finetuned"})
    excludes = frozenset({"quantized"})

    def run(self, ctx: Context) -> None:
        p = self.params
        teacher = None
        if p.kd_weight > 0:
            if ctx.load_dense is None:
                raise MMPruneError("finetune: distillation needs the dense model, which this run cannot load")
            teacher = ctx.load_dense()
            teacher.model.eval()
        trainer = Trainer(ctx.adapter, ctx.task, p.steps, p.lr, p.weight_decay, p.warmup,
                          teacher=teacher, kd_weight=p.kd_weight, kd_temperature=p.kd_temperature)
        limit = p.max_flops if p.max_flops is not None else _comp_limit(ctx)
        stream = batch_stream(ctx, p.train_split, p.batch_size, ctx.seed + 17)
        every = p.eval_every or p.steps
        history, best, best_state = [], None, None
        losses = []
        for step, batch in enumerate(ctx.progress(islice(stream, p.steps), "finetune", total=p.steps), 1):
            losses.append(trainer.step(batch))
            if step % every == 0 or step == p.steps:
                q, flops = self._validate(ctx, p.val_split, p.val_examples)
                ok = limit is None or flops <= limit
                history.append({"step": step, "quality": q, "flops": flops, "within_target": ok,
                                "loss": sum(losses[-every:]) / len(losses[-every:])})
                ctx.log(f"finetune step {step}: validation {q:.2f}, FLOPs {flops:.4g}"
                        + ("" if ok else " (above the target)"))
                if ok and (best is None or q > best["quality"]):
                    best = history[-1]
                    if p.select:
                        best_state = copy.deepcopy(ctx.model.state_dict())
        if p.select and best_state is not None and best["step"] != p.steps:
            ctx.model.load_state_dict(best_state)
        ctx.model.eval()
        ctx.state.setdefault("finetune", []).append(
            {"steps": p.steps, "selected_step": best["step"] if (best and p.select) else p.steps,
             "flops_limit": limit, "history": history})

    @staticmethod
    def _validate(ctx: Context, split: str, max_examples: int | None) -> tuple[float, float]:
        spec = ctx.evaluation.model_copy(update=dict(split=split, max_examples=max_examples))
        result = measure(ctx, spec, with_latency=False)
        return headline(ctx, result["metrics"]), result["flops"]


def _comp_limit(ctx: Context) -> float | None:
    runs = ctx.state.get("comp")
    if not runs:
        return None
    last = runs[-1]
    return (last["target"] + last["params"]["tol"]) * last["dense_flops"]
