"""`eval_mode`: run a block of code with a model in eval mode (no dropout) and put back its mode."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Deterministic forwards (dropout off) inside; the model's train / eval mode restored after,
    also when the block raises. Gradients are unaffected."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
