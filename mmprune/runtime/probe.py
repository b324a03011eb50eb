"""The attention probe (tokens.md §3): one query row's attention probabilities, recomputed from a
decoder layer's own q / k, so token scores never need eager attention or a second layer pass.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, d] rotated by cos / sin [B, n, d] (Llama's half-rotation)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def attention_probe(layer: nn.Module, x: torch.Tensor, query: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor],
                    allowed: torch.Tensor) -> torch.Tensor:
    """Attention of token `query[b]` over every token of `x`, as Llama decoder `layer` computes it.

    x [B, N, D]: the layer's input hidden states; query [B]: one index per example;
    position_embeddings: (cos, sin) [B or 1, N, d] for those tokens; allowed [B, N]: the keys the
    query may attend (valid and not after it). Returns probabilities [B, H, N] in fp32, softmax
    over all allowed keys, with the layer's own normalisation, RoPE and grouped-query sharing.
    """
    attn = layer.self_attn
    b, n, _ = x.shape
    d = attn.head_dim
    rows = torch.arange(b, device=x.device)
    u = layer.input_layernorm(x)
    q = attn.q_proj(u[rows, query]).view(b, 1, -1, d).transpose(1, 2)      # [B, H, 1, d]
    k = attn.k_proj(u).view(b, n, -1, d).transpose(1, 2)                     # [B, H_kv, N, d]
    cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)
    q = _rope(q, cos[rows, query].unsqueeze(1), sin[rows, query].unsqueeze(1))
    k = _rope(k, cos, sin)
    if hasattr(attn, "kv_index"):          # uneven query groups after head removal
        k = k.index_select(1, attn.kv_index)
    else:
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    z = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scaling   # [B, H, N]
    z = z.masked_fill(~allowed[:, None, :], float("-inf"))
    return z.softmax(dim=-1)
