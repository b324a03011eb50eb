"""Training loop for zoo models: AdamW, linear warm-up then cosine decay, deterministic."""
from __future__ import annotations

import math
from collections.abc import Callable

import datasets
import torch
from tqdm.auto import tqdm

from mmprune.data.batching import iterate_batches
from mmprune.models.base import Adapter


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(adapter: Adapter, ds: datasets.Dataset, task: str, *, steps: int, batch_size: int,
          lr: float, warmup: int = 100, weight_decay: float = 0.05, seed: int = 0,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          freeze: tuple[str, ...] = ()) -> list[float]:
    """Train `adapter.model` on `ds` for `steps` optimiser steps; returns the loss of every step.

    Parameters whose names start with a `freeze` prefix are not trained.
    """
    torch.manual_seed(seed)
    model = adapter.model
    model.train()
    trained = []
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(freeze) if freeze else True)
        if p.requires_grad:
            trained.append(p)
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, steps, min(warmup, steps)))
    losses: list[float] = []
    bar = tqdm(total=steps, desc="train", disable=not progress, dynamic_ncols=True)
    epoch = 0
    while len(losses) < steps:
        for batch in iterate_batches(adapter, ds, batch_size, shuffle=True, seed=seed * 1000 + epoch,
                                     drop_last=True):
            loss = adapter.task_loss(batch, task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if on_step:
                on_step(len(losses), losses[-1])
            if len(losses) >= steps:
                break
        epoch += 1
    bar.close()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses
