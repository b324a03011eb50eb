"""`finetune`: train the pruned model (token pruning active), select the best step on validation."""
from __future__ import annotations

import copy
import math
from itertools import islice

from pydantic import Field

from mmprune.context import Context
from mmprune.measure import flops_stats, group_token_counts, headline, measure
from mmprune.passes.base import FitSplit, Pass, PassParams
from mmprune.runtime.runtime import TokenRuntime, runtime_of
from mmprune.training import Trainer, batch_stream, dense_teacher


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
                         "(else the last), among those within the FLOPs target; when none is "
                         "(the search stopped short of its target), among those with the "
                         "fewest FLOPs (within 0.5% of each other).")
    max_flops: float | None = Field(None, gt=0.0, description="Largest mean validation FLOPs per "
                                    "example a selected step may have (default: the last comp "
                                    "pass's target plus its tolerance, of the decoder's FLOPs "
                                    "where that pass had flops_scope 'decoder').")
    refit_thresholds: bool = Field(True, description="Token thresholds are relative to each "
                                   "example's attention, so training moves the FLOPs: when a "
                                   "validation step is above the FLOPs limit, raise every token "
                                   "mode's θ by one common factor until it is within (and train on "
                                   "from there), rather than pass the step over.")
    train_split: FitSplit = Field("train", description="Split trained on.")
    val_split: FitSplit = Field("validation", description="Split that selects the step (never test).")
    val_examples: int | None = Field(None, ge=1, description="Validation examples per evaluation "
                                     "(default: the whole split).")


#: FLOPs within this share of each other are one budget (token-pruned steps drift a little)
FLOPS_TIE = 0.005


def _better(step: dict, best: dict | None) -> bool:
    """Whether validation `step` beats `best`: within the FLOPs limit, by quality; where no step
    is (a search stopped at its floors, short of its target), by fewer FLOPs first, steps within
    FLOPS_TIE of each other by quality; a step within the limit beats every step above it."""
    if best is None or step["within_target"] != best["within_target"]:
        return best is None or step["within_target"]
    if not step["within_target"] and abs(step["flops"] - best["flops"]) > FLOPS_TIE * best["flops"]:
        return step["flops"] < best["flops"]
    return step["quality"] > best["quality"]


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
        teacher = dense_teacher(ctx, p.kd_weight, "finetune")
        trainer = Trainer(ctx.adapter, ctx.task, p.steps, p.lr, p.weight_decay, p.warmup,
                          teacher=teacher, kd_weight=p.kd_weight, kd_temperature=p.kd_temperature)
        limit, tower = (p.max_flops, None) if p.max_flops is not None else _comp_limit(ctx)
        stream = batch_stream(ctx, p.train_split, p.batch_size, ctx.seed + 17)
        every = p.eval_every or p.steps
        history, best, best_state, best_thetas = [], None, None, {}
        losses = []
        for step, batch in enumerate(ctx.progress(islice(stream, p.steps), "finetune", total=p.steps), 1):
            losses.append(trainer.step(batch))
            if step % every == 0 or step == p.steps:
                q, flops = self._validate(ctx, p.val_split, p.val_examples, tower)
                refit = {}
                if p.refit_thresholds and limit is not None and flops > limit:
                    refit = fit_thresholds(ctx, limit, p.val_split, p.val_examples, tower)
                    if refit:       # measured again at the raised θ
                        q, flops = self._validate(ctx, p.val_split, p.val_examples, tower)
                ok = limit is None or flops <= limit
                history.append({"step": step, "quality": q, "flops": flops, "within_target": ok,
                                "loss": sum(losses[-every:]) / len(losses[-every:]),
                                **({"theta": refit} if refit else {})})
                ctx.log(f"finetune step {step}: validation {q:.2f}, FLOPs {flops:.4g}"
                        + ("" if ok else " (above the target)"))
                if _better(history[-1], best):
                    best = history[-1]
                    if p.select:
                        best_state = copy.deepcopy(ctx.model.state_dict())
                        best_thetas = token_thetas(ctx)
        if p.select and best is not None and not best["within_target"]:
            ctx.log(f"finetune: no validation step is within the FLOPs limit {limit:.4g}; "
                    f"kept step {best['step']}, the best among the fewest FLOPs")
        if p.select and best_state is not None and best["step"] != p.steps:
            ctx.model.load_state_dict(best_state)
            rt = runtime_of(ctx.model)
            for mode, theta in best_thetas.items():
                rt.set_mode_theta(mode, theta)
        ctx.model.eval()
        ctx.state.setdefault("finetune", []).append(
            {"steps": p.steps, "selected_step": best["step"] if (best and p.select) else p.steps,
             "flops_limit": limit, "flops_tower": tower, "history": history})

    @staticmethod
    def _validate(ctx: Context, split: str, max_examples: int | None,
                  tower: str | None) -> tuple[float, float]:
        """The headline metric, and the mean FLOPs of the model (or of `tower`)."""
        spec = ctx.evaluation.model_copy(update=dict(split=split, max_examples=max_examples))
        result = measure(ctx, spec, with_latency=False)
        return headline(ctx, result["metrics"]), (result["flops_by_tower"][tower] if tower
                                                   else result["flops"])


def _comp_limit(ctx: Context) -> tuple[float | None, str | None]:
    """The last comp pass's target plus its tolerance, in FLOPs, and the tower they are of
    (None: the whole model; a decoder LLM's with `flops_scope: decoder`)."""
    runs = ctx.state.get("comp")
    if not runs:
        return None, None
    last = runs[-1]
    return (last["target"] + last["params"]["tol"]) * last["dense_flops"], last.get("flops_tower")


def token_thetas(ctx: Context) -> dict[str, float]:
    """θ of every token mode of the model's runtime that drops tokens."""
    rt = runtime_of(ctx.model)
    if rt is None:
        return {}
    return {m: rt.mode_theta(m) for m in rt.token_modes() if rt.mode_theta(m) > 0}


def fit_thresholds(ctx: Context, limit: float, split: str, max_examples: int | None,
                   tower: str | None = None, iterations: int = 8) -> dict[str, float]:
    """Raise the θ of every token mode that drops tokens by the least common factor that
    brings the mean FLOPs on `split` (of the model, or of `tower`) within `limit`; the new θ,
    or {} when they already are (or no θ can: a model without token pruning)."""
    old = token_thetas(ctx)
    if not old or _mean_flops(ctx, split, max_examples, tower) <= limit:
        return {}
    rt: TokenRuntime = runtime_of(ctx.model)

    def scale(by: float) -> None:
        for mode, theta in old.items():
            rt.set_mode_theta(mode, by * theta)

    def flops_at(by: float) -> float:
        scale(by)
        return _mean_flops(ctx, split, max_examples, tower)

    lo, hi, f_lo = 1.0, 1.25, math.inf
    while (f_hi := flops_at(hi)) > limit:
        if f_hi >= f_lo:        # every site at its floor and still above: keep the old θ
            scale(1.0)
            return {}
        lo, hi, f_lo = hi, 2 * hi, f_hi
    for _ in range(iterations):  # the smallest scale found within the limit
        mid = (lo + hi) / 2
        if flops_at(mid) <= limit:
            hi = mid
        else:
            lo = mid
    scale(hi)
    new = token_thetas(ctx)
    ctx.log(f"finetune: token θ raised ×{hi:.3f} to stay within the FLOPs limit")
    return new


def _mean_flops(ctx: Context, split: str, max_examples: int | None,
                tower: str | None = None) -> float:
    ctx.model.eval()
    counts = [group_token_counts(ctx, b) for b in ctx.batches(split, ctx.evaluation.batch_size,
                                                               max_examples=max_examples)]
    stats = flops_stats(ctx, counts)
    return stats["by_tower"][tower] if tower else stats["mean"]
