"""CLIP's encoder block (pre-norm, separate q/k/v) split for the token-pruning runtime."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmprune.runtime.blocks import BlockOps, TokenMarks


class PreNormBlockOps(BlockOps):
    """x + attn(ln1(x)), then x + mlp(ln2(x)): CLIP and SigLIP encoder layers."""

    def heads(self, layer: nn.Module) -> tuple[int, int]:
        return layer.self_attn.num_heads, layer.self_attn.head_dim

    def qkv(self, layer, x):
        att, h = layer.self_attn, layer.layer_norm1(x)
        split = lambda t: t.view(*x.shape[:2], -1, att.head_dim).transpose(1, 2)
        return split(att.q_proj(h)), split(att.k_proj(h)), split(att.v_proj(h))

    def attention_dropout(self, layer) -> float:
        return float(layer.self_attn.dropout)

    def attention_out(self, layer, x, context):
        return x + layer.self_attn.out_proj(context)

    def out_proj(self, layer) -> nn.Linear:
        return layer.self_attn.out_proj

    def mlp_hidden(self, layer, x):
        return layer.mlp.activation_fn(layer.mlp.fc1(layer.layer_norm2(x)))

    def mlp_out(self, layer, x, hidden):
        return x + layer.mlp.fc2(hidden)

    def down_proj(self, layer) -> nn.Linear:
        return layer.mlp.fc2


def clip_text_marks(eos_token_id: int):
    """SOT and the pooled EOT token are protected; EOT is the global token; padding is invalid."""

    def marks(kwargs: dict[str, Any], hidden: torch.Tensor) -> TokenMarks:
        ids = kwargs["input_ids"]
        b, n = ids.shape
        mask = kwargs.get("attention_mask")
        valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.bool()
        # the position CLIPTextModel pools from (it keeps a legacy rule for eos_token_id == 2)
        eot = ids.argmax(dim=-1) if eos_token_id == 2 else (ids == eos_token_id).int().argmax(dim=-1)
        global_ = torch.zeros(b, n, dtype=torch.bool)
        global_[torch.arange(b), eot] = True
        protected = global_.clone()
        protected[:, 0] = True
        return TokenMarks(valid.to(hidden.device), protected.to(hidden.device), global_.to(hidden.device))

    return marks
