"""Training loop for zoo models: the passes' Trainer (AdamW, warm-up, cosine) over epochs of a split."""
from __future__ import annotations

from collections.abc import Callable

import datasets
import torch
from tqdm.auto import tqdm

from mmprune.data.batching import iterate_batches
from mmprune.models.base import Adapter
from mmprune.training import Trainer


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
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(freeze) if freeze else True)
    trainer = Trainer(adapter, task, steps, lr, weight_decay, warmup)
    losses: list[float] = []
    bar = tqdm(total=steps, desc="train", disable=not progress, dynamic_ncols=True)
    epoch = 0
    while len(losses) < steps:
        for batch in iterate_batches(adapter, ds, batch_size, shuffle=True, seed=seed * 1000 + epoch,
                                     drop_last=True):
            losses.append(trainer.step(batch))
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
