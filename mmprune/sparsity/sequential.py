"""Sequential layer-wise pruning (ecoflap.md §4.1): block by block, each block calibrated on the
inputs the already-pruned blocks before it produce.

A block's inputs are captured by running the real model with a forward pre-hook on that block,
which records its positional and keyword arguments and stops the forward. Recapturing for every
block costs more forwards than propagating one block's outputs to the next, but every block gets
its own real keyword arguments (masks, position biases) and nothing is reused from block 0.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmprune.eval_mode import eval_mode
from mmprune.sparsity.local import (
    InputStats,
    magnitude_mask,
    sparsegpt_prune,
    wanda_mask,
)

CRITERIA = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Block:
    """One transformer block whose Linear weights are pruned: its tower, index and module path."""

    tower: str
    index: int
    path: str


class _Captured(Exception):
    """Raised by the capture hook: the block's inputs are recorded, the rest of the forward is not needed."""


def capture_inputs(model: nn.Module, block: nn.Module, batches: Sequence[dict],
                   forward: Callable[[dict], Any]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) `block` is called with on each batch, by running `forward(batch)`."""
    records: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        records.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                        {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                before = len(records)
                try:
                    forward(batch)
                except _Captured:
                    pass
                if len(records) == before:
                    raise RuntimeError(f"the model's forward never called {type(block).__name__}; "
                                       "the adapter's block list does not match its forward")
    finally:
        handle.remove()
    return records


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def block_weight_names(model: nn.Module, path: str) -> list[str]:
    """Parameter names of the Linear weights inside the block at `path` (a block score's group)."""
    return [f"{path}.{n}.weight" for n in linear_layers(model.get_submodule(path))]


@contextmanager
def collecting_inputs(layers: Mapping[Hashable, nn.Module], stats: Mapping[Hashable, InputStats],
                      token_mask: Callable[[Hashable], torch.Tensor | None]) -> Iterator[None]:
    """Inside, every call of `layers[k]` adds its input to `stats[k]`. `token_mask(k)` is the
    real-token mask [B, N] of the current batch; a layer whose input has that shape leaves the
    padding out, and layers reading other sequences (cross-attention keys from image states) use
    every token."""
    def hook_for(key):
        def hook(module, args):
            x, m = args[0], token_mask(key)
            stats[key].add(x, m if m is not None and m.shape == x.shape[:-1] else None)
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(k)) for k, layer in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def prune_block(block: nn.Module, inputs: list[tuple[tuple, dict]], sparsity: float,
                criterion: str, pattern: str | None = None,
                valid: Sequence[torch.Tensor | None] | None = None,
                sparsegpt_block: int = 128, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Prune every Linear of `block` to `sparsity` from one pass over its inputs; returns the
    masks (True = kept) by layer name. `valid[i]` is the real-token mask [B, N] of input i (None:
    all real): a layer whose input has that shape leaves the padding out of its statistics;
    layers reading other sequences (cross-attention keys from image states) use every token."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    layers = linear_layers(block)
    stats = {name: InputStats(hessian=criterion == "sparsegpt") for name in layers}
    if criterion != "magnitude":
        current: list[torch.Tensor | None] = [None]
        with collecting_inputs(layers, stats, lambda name: current[0]):
            for i, (args, kwargs) in enumerate(inputs):
                current[0] = None if valid is None else valid[i]
                block(*args, **kwargs)
    masks = {}
    for name, layer in layers.items():
        w = layer.weight
        if criterion == "magnitude":
            mask = magnitude_mask(w, sparsity, pattern)
        elif criterion == "wanda":
            mask = wanda_mask(w, stats[name].norms, sparsity, pattern)
        else:
            new, mask = sparsegpt_prune(w, stats[name].hessian, sparsity, pattern,
                                        block_size=sparsegpt_block, damp=damp)
            w.data.copy_(new)
        w.data.mul_(mask.to(w.dtype))
        masks[name] = mask
    return masks


def prune_sequential(model: nn.Module, blocks: Sequence[Block], batches: Sequence[dict],
                     forward: Callable[[dict], Any], sparsity_of: Callable[[Block], float],
                     criterion: str, pattern: str | None = None,
                     valid_of: Callable[[Block, dict], torch.Tensor | None] | None = None,
                     progress: Callable[[Iterable, str, int], Iterable] = lambda it, d, n: it,
                     **kwargs) -> dict[str, torch.Tensor]:
    """Prune `blocks` in order (upstream towers first), each calibrated on the pruned model's
    real inputs to it. `valid_of(block, batch)` is the real-token mask of that block's input on
    `batch` (None: every token real). Returns every mask by full parameter name."""
    masks: dict[str, torch.Tensor] = {}
    with eval_mode(model):
        for b in progress(blocks, f"{criterion} blocks", len(blocks)):
            module = model.get_submodule(b.path)
            s = sparsity_of(b)
            if s == 0:
                continue
            inputs = [] if criterion == "magnitude" else capture_inputs(model, module, batches, forward)
            valid = None if valid_of is None else [valid_of(b, batch) for batch in batches]
            layer_masks = prune_block(module, inputs, s, criterion, pattern, valid, **kwargs)
            masks.update({f"{b.path}.{name}.weight": m for name, m in layer_masks.items()})
    return masks
