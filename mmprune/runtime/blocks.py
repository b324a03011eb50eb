"""What an adapter tells the token-pruning runtime about one tower: how to run a block in parts.

The runtime (mmprune.runtime.tower) runs CoMP-managed towers itself, block by block, because it
must see the attention map, drop tokens between attention and MLP, and scale heads and MLP
channels by soft masks. The per-architecture knowledge (pre- or post-norm, fused or separate
q/k/v, where the residual goes) is in a `BlockOps` the adapter provides.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn


class BlockOps:
    """One transformer block split at the points the runtime needs. Tensors are [B, N, ·]."""

    def heads(self, layer: nn.Module) -> tuple[int, int]:
        """(current number of heads, head dimension) of the block's self-attention."""
        raise NotImplementedError

    def qkv(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of the self-attention, each [B, H, N, d], unscaled."""
        raise NotImplementedError

    def attention_out(self, layer: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The residual stream after self-attention, from its input `x` and the head contexts
        `context` [B, N, H·d] (the input of the output projection)."""
        raise NotImplementedError

    def out_proj(self, layer: nn.Module) -> nn.Linear:
        """The self-attention output projection (rows of W_o in CIP)."""
        raise NotImplementedError

    def mlp_hidden(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The MLP hidden activation after the nonlinearity, [B, N, m]."""
        raise NotImplementedError

    def mlp_out(self, layer: nn.Module, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream after the MLP, from its input `x` and the (masked) hidden activation."""
        raise NotImplementedError

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        """The MLP output projection (rows of W_2 in CIP)."""
        raise NotImplementedError

    # ---- cross-attention (BLIP's text encoder); blocks without one keep the defaults
    def has_cross(self, layer: nn.Module) -> bool:
        return False

    def cross_qkv(self, layer: nn.Module, x: torch.Tensor, states: torch.Tensor):
        """Queries from `x`, keys and values from the other tower's `states`, each [B, H, ·, d]."""
        raise NotImplementedError

    def cross_out(self, layer: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cross_out_proj(self, layer: nn.Module) -> nn.Linear:
        raise NotImplementedError


@dataclass(frozen=True)
class TokenMarks:
    """Per-token facts at a tower's input, each [B, N] bool."""

    valid: torch.Tensor       # real tokens (False: padding)
    protected: torch.Tensor   # never dropped (CLS, SOT, EOT, ...)
    global_: torch.Tensor     # the global token(s) (weight 1 in CIP, never a query in CIT)


@dataclass(frozen=True)
class ManagedTowerSpec:
    """A tower the runtime can run: where its blocks are and how to read its inputs.

    `root` is the tower's model (e.g. 'text_model'), whose call arguments `marks` reads through a
    forward pre-hook; `encoder` is the module whose forward the runtime replaces and `layers` the
    name of its block list. `output` says what the tower hands on: 'restore' scatters the kept
    tokens back to their original positions (poolers and later modules see the usual shape),
    'compact' hands on the kept tokens only, with `ManagedTower.last_valid` as their mask.
    Cross-attention, where blocks have it, runs after the token site on the kept tokens, with
    keys from the encoder states the tower is called with.
    """

    tower: str
    root: str
    encoder: str
    layers: str
    ops: BlockOps
    marks: Callable[[dict[str, Any], torch.Tensor], TokenMarks]
    causal: bool = False
    output: Literal["restore", "compact"] = "restore"
    #: the tower whose units are this tower's cross-attention heads (BLIP: 'cross')
    cross_tower: str | None = None


def first_token_marks(kwargs: dict[str, Any], hidden: torch.Tensor) -> TokenMarks:
    """ViT-style input: every token real, the first (CLS) protected and global."""
    b, n = hidden.shape[:2]
    first = torch.zeros(b, n, dtype=torch.bool, device=hidden.device)
    first[:, 0] = True
    return TokenMarks(torch.ones_like(first), first, first)
