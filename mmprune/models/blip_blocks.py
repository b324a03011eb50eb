"""BLIP's prunable structure: the ViT with a fused `qkv`, the BERT-style text encoder, and its
cross-attention as a tower of its own.

transformers' `BlipAttention.forward` splits the fused projection with the *residual* width
(`embed_dim // num_heads` of its input), which is only right while no head has been removed. The
adapter therefore gives pruned vision attention modules `head_aware_forward`, which splits by
`head_dim`; it computes the same thing as the original on an unpruned module.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from mmprune.models.base import AttentionSite, MLPSite
from mmprune.runtime.blocks import BlockOps, TokenMarks


def head_aware_forward(self, hidden_states: torch.Tensor, **kwargs):
    """`BlipAttention.forward` with the fused projection split by head, not by residual width."""
    bsz, tgt_len, _ = hidden_states.size()
    qkv = (self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, self.head_dim)
           .permute(2, 0, 3, 1, 4))
    scores = torch.matmul(qkv[0], qkv[1].transpose(-1, -2)) * self.scale
    probs = self.dropout(nn.functional.softmax(scores, dim=-1))
    context = torch.matmul(probs, qkv[2]).permute(0, 2, 1, 3)
    context = context.reshape(bsz, tgt_len, self.num_heads * self.head_dim)
    return self.projection(context), probs


def set_vision_heads(attention: nn.Module, num_heads: int) -> None:
    attention.num_heads = num_heads
    attention.embed_dim = num_heads * attention.head_dim
    attention.forward = types.MethodType(head_aware_forward, attention)


def set_text_heads(attention_self: nn.Module, num_heads: int) -> None:
    attention_self.num_attention_heads = num_heads
    attention_self.all_head_size = num_heads * attention_self.attention_head_size


def vision_sites(vision_model: nn.Module, root: str) -> tuple[list[AttentionSite], list[MLPSite]]:
    att, mlp = [], []
    for i, layer in enumerate(vision_model.encoder.layers):
        a = layer.self_attn
        att.append(AttentionSite("vision", i, f"{root}.encoder.layers.{i}.self_attn", "qkv", "qkv", "qkv",
                                 "projection", a.num_heads, a.head_dim, fused_qkv=True))
        mlp.append(MLPSite("vision", i, f"{root}.encoder.layers.{i}.mlp", ("fc1",), "fc2",
                           layer.mlp.fc1.out_features))
    return att, mlp


def text_sites(text_model: nn.Module, root: str, tower: str = "language",
               cross_tower: str | None = "cross") -> tuple[list[AttentionSite], list[MLPSite]]:
    """Self-attention heads and MLP channels of a BERT-style encoder (tower `tower`) and, where
    its layers have cross-attention, the cross-attention heads (tower `cross_tower`)."""
    att, mlp = [], []
    for i, layer in enumerate(text_model.encoder.layer):
        base = f"{root}.encoder.layer.{i}"
        s = layer.attention.self
        att.append(AttentionSite(tower, i, f"{base}.attention", "self.query", "self.key", "self.value",
                                 "output.dense", s.num_attention_heads, s.attention_head_size))
        cross = getattr(layer, "crossattention", None)
        if cross is not None and cross_tower is not None:
            c = cross.self
            att.append(AttentionSite(cross_tower, i, f"{base}.crossattention", "self.query", "self.key",
                                     "self.value", "output.dense", c.num_attention_heads,
                                     c.attention_head_size, kv_hidden_size=c.key.in_features))
        mlp.append(MLPSite(tower, i, base, ("intermediate.dense",), "output.dense",
                           layer.intermediate.dense.out_features))
    return att, mlp


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.view(*t.shape[:2], -1, head_dim).transpose(1, 2)


class BlipVisionBlockOps(BlockOps):
    """BLIP's ViT block: pre-norm, one fused [q; k; v] projection."""

    def heads(self, layer):
        return layer.self_attn.num_heads, layer.self_attn.head_dim

    def qkv(self, layer, x):
        att = layer.self_attn
        t = att.qkv(layer.layer_norm1(x)).reshape(*x.shape[:2], 3, -1, att.head_dim).permute(2, 0, 3, 1, 4)
        return t[0], t[1], t[2]

    def attention_dropout(self, layer) -> float:
        return float(layer.self_attn.dropout.p)

    def attention_out(self, layer, x, context):
        return x + layer.self_attn.projection(context)

    def out_proj(self, layer):
        return layer.self_attn.projection

    def mlp_hidden(self, layer, x):
        return layer.mlp.activation_fn(layer.mlp.fc1(layer.layer_norm2(x)))

    def mlp_out(self, layer, x, hidden):
        return x + layer.mlp.fc2(hidden)

    def down_proj(self, layer):
        return layer.mlp.fc2


class BlipTextBlockOps(BlockOps):
    """BLIP's BERT block: post-norm self-attention, cross-attention to the image, post-norm MLP."""

    def heads(self, layer):
        s = layer.attention.self
        return s.num_attention_heads, s.attention_head_size

    def qkv(self, layer, x):
        s = layer.attention.self
        d = s.attention_head_size
        return _heads(s.query(x), d), _heads(s.key(x), d), _heads(s.value(x), d)

    def attention_dropout(self, layer) -> float:
        return float(layer.attention.self.dropout.p)

    def attention_out(self, layer, x, context):
        return layer.attention.output(context, x)

    def out_proj(self, layer):
        return layer.attention.output.dense

    def has_cross(self, layer) -> bool:
        return getattr(layer, "crossattention", None) is not None

    def cross_qkv(self, layer, x, states):
        s = layer.crossattention.self
        d = s.attention_head_size
        return _heads(s.query(x), d), _heads(s.key(states), d), _heads(s.value(states), d)

    def cross_out(self, layer, x, context):
        return layer.crossattention.output(context, x)

    def cross_out_proj(self, layer):
        return layer.crossattention.output.dense

    def mlp_hidden(self, layer, x):
        return layer.intermediate(x)

    def mlp_out(self, layer, x, hidden):
        return layer.output(hidden, x)

    def down_proj(self, layer):
        return layer.output.dense


def first_text_token_marks(kwargs, hidden: torch.Tensor) -> TokenMarks:
    """BLIP text: the first token ([CLS] / [ENC]) is global and protected; padding is invalid."""
    b, n = hidden.shape[:2]
    mask = kwargs.get("attention_mask")
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.bool()
    first = torch.zeros(b, n, dtype=torch.bool)
    first[:, 0] = True
    dev = hidden.device
    return TokenMarks(valid.to(dev), first.to(dev), first.to(dev))
