"""Parameter-importance scoring passes: one score per head and per MLP channel (`scores.params`)."""
from __future__ import annotations

from itertools import islice
from typing import Literal

import torch
from pydantic import Field

from mmprune.context import Context
from mmprune.errors import MMPruneError
from mmprune.eval_mode import eval_mode
from mmprune.graph.slices import score_units
from mmprune.passes.base import Pass, PassParams


class MagnitudeParams(PassParams):
    norm: Literal["l1", "l2"] = Field("l2", description="Norm of the unit's weights: l1 or l2.")


class ScoreMagnitude(Pass):
    """Weight-magnitude importance: the l1/l2 norm of every weight a head or channel owns."""

    name = "score_magnitude"
    Params = MagnitudeParams
    requires = frozenset({"model", "graph"})
    provides = frozenset({"scores.params"})
    excludes = frozenset({"quantized"})

    def run(self, ctx: Context) -> None:
        fn = (lambda p: p.abs()) if self.params.norm == "l1" else (lambda p: p.pow(2))
        scores = {}
        for gid, group in ctx.graph.groups.items():
            s = score_units(ctx.model, group, fn)
            scores[gid] = (s if self.params.norm == "l1" else s.sqrt()).float()
        ctx.scores["scores.params"] = scores


class TaylorParams(PassParams):
    split: str = Field("train", description="Calibration split (never the test split).")
    batches: int = Field(8, ge=1, description="Calibration batches whose gradients are accumulated.")
    batch_size: int = Field(16, ge=2, description="Examples per calibration batch (contrastive "
                                                  "losses need at least 2).")


class ScoreTaylor(Pass):
    """First-order Taylor importance: |w·g| summed over every weight a head or channel owns."""

    name = "score_taylor"
    Params = TaylorParams
    calibrates = True
    requires = frozenset({"model", "graph", "data"})
    provides = frozenset({"scores.params"})
    excludes = frozenset({"quantized"})

    def run(self, ctx: Context) -> None:
        p = self.params
        if p.split == "test":
            raise MMPruneError("score_taylor: calibrating on the test split is not allowed; use train or validation.")
        model = ctx.model
        model.zero_grad(set_to_none=True)
        batches = islice(ctx.batches(p.split, p.batch_size, shuffle=True, drop_last=True), p.batches)
        n = 0
        with eval_mode(model):  # deterministic (no dropout); gradients still flow
            for batch in ctx.progress(batches, "score_taylor", total=p.batches):
                with torch.enable_grad():
                    loss = ctx.adapter.task_loss(batch, ctx.task)
                    loss.backward()
                n += 1
        if n == 0:
            raise MMPruneError(f"score_taylor: split '{p.split}' has fewer than {p.batch_size} examples")
        scores = {}
        for gid, group in ctx.graph.groups.items():
            scores[gid] = score_units(model, group,
                                      lambda w: (w * w.grad / n).abs() if w.grad is not None
                                      else torch.zeros_like(w)).float()
        model.zero_grad(set_to_none=True)
        ctx.scores["scores.params"] = scores
