"""Training steps for passes that train (CoMP search, finetune): AdamW, cosine, data parallel.

Data parallel runs under `torchrun`: every rank draws the same shuffled global batch and trains
on its own share of it; gradients are averaged with an all-reduce before each step (what
DistributedDataParallel does, without wrapping the model, so adapters keep calling their
model's own methods). Identical initial weights + identical averaged gradients keep the ranks'
weights identical, which tests/passes/test_finetune.py checks with two processes.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmprune.context import Context
from mmprune.data.batching import collate_rows
from mmprune.errors import MMPruneError
from mmprune.models.base import Adapter
from mmprune.sparsity.masks import apply_masks


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the torchrun process group (gloo, CPU) when launched by torchrun; no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def is_main() -> bool:
    return world()[0] == 0


def cosine(step: int, total: int, warmup: int = 0) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_stream(ctx: Context, split: str, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of `split`; under torchrun each rank gets its share of each batch."""
    import numpy as np

    rank, size = world()
    ds = ctx.examples(split)
    if len(ds) < batch_size:
        raise MMPruneError(f"split '{split}' has {len(ds)} examples, fewer than one batch of {batch_size}")
    epoch = 0
    while True:
        order = np.random.default_rng(seed * 1009 + epoch).permutation(len(ds))
        for start in range(0, len(ds) - batch_size + 1, batch_size):
            chunk = order[start:start + batch_size].tolist()
            yield collate_rows(ctx.adapter, ds, chunk[rank::size])
        epoch += 1


def dense_teacher(ctx: Context, kd_weight: float, pass_name: str) -> Adapter | None:
    """The dense model, in eval mode, to distil from when `kd_weight` > 0 (else None). It is
    loaded afresh, so no mask, threshold or removal a pass applied to `ctx.adapter` reaches it,
    once per run: it is frozen, so the search and the fine-tuning can share it."""
    if kd_weight <= 0:
        return None
    if ctx.dense_teacher is not None:
        return ctx.dense_teacher
    if ctx.load_dense is None:
        raise MMPruneError(f"{pass_name}: distillation (kd_weight {kd_weight}) needs the dense "
                           f"model, which this run cannot load; set kd_weight: 0")
    teacher = ctx.load_dense()
    teacher.model.eval()
    for param in teacher.model.parameters():
        param.requires_grad_(False)
    ctx.dense_teacher = teacher
    return teacher


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) on softened logits, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1),
                    reduction="batchmean") * t * t


class Trainer:
    """AdamW (weight decay on matrices only) with a cosine schedule over `total_steps`."""

    def __init__(self, adapter: Adapter, task: str, total_steps: int, lr: float,
                 weight_decay: float = 0.05, warmup: int = 0, grad_clip: float = 1.0,
                 teacher: Adapter | None = None, kd_weight: float = 0.0, kd_temperature: float = 1.0):
        self.adapter, self.task = adapter, task
        self.teacher, self.kd_weight, self.kd_temperature = teacher, kd_weight, kd_temperature
        self.grad_clip = grad_clip
        self.total = max(1, total_steps)
        self.step_count = 0
        params = [p for p in adapter.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        self.params = params
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: cosine(s, self.total, min(warmup, self.total)))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.adapter.task_loss(batch, self.task)
        if self.teacher is not None and self.kd_weight > 0:
            with torch.no_grad():
                target = self.teacher.distill_logits(batch)
            loss = loss + self.kd_weight * distillation_loss(
                self.adapter.distill_logits(batch), target, self.kd_temperature)
        return loss

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        model = self.adapter.model
        model.train()
        loss = self.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._all_reduce_grads()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        apply_masks(model)      # sparsity from layer-wise pruning survives fine-tuning
        self.sched.step()
        self.step_count += 1
        return float(loss.detach())

    def _all_reduce_grads(self) -> None:
        _, size = world()
        if size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= size
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
