"""Grouped-query attention (HF `LlamaAttention`) after query heads were removed.

The units are query heads (comp.md §2): a key / value head goes when the last query head that
reads it goes. HF's attention repeats every KV head for `num_key_value_groups` consecutive query
heads, so it can run a pruned module only while every kept KV head still serves the same number
of query heads. When the counts differ, the module gets a forward that expands its keys and
values to one per query head through an index (after the KV cache, which keeps the compact
heads) and runs the same attention interface with no further repetition: exact, and cached
generation is unchanged.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from mmprune.models.base import AttentionSite
from mmprune.models.kv_cache import pop_cache


def set_query_heads(attention: nn.Module, site: AttentionSite, kept: list[int]) -> None:
    """Fit `attention`'s attributes (and, for uneven groups, its forward) to the original query
    heads `kept` of grouped-query `site`, whose projections were already cut."""
    groups = [site.kv_head_of(h) for h in kept]
    kv = site.kv_heads(kept)
    counts = [groups.count(g) for g in kv]
    if len(set(counts)) == 1:         # even groups: HF's own forward repeats each KV head
        attention.num_key_value_groups = counts[0]
        vars(attention).pop("forward", None)
        if hasattr(attention, "kv_index"):
            del attention.kv_index
        return
    attention.num_key_value_groups = 1
    index = torch.tensor([kv.index(g) for g in groups], device=attention.q_proj.weight.device)
    if hasattr(attention, "kv_index"):
        attention.kv_index = index
    else:
        attention.register_buffer("kv_index", index, persistent=False)
    attention.forward = types.MethodType(uneven_groups_forward, attention)


def uneven_groups_forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                          attention_mask=None, past_key_values=None, **kwargs):
    """`LlamaAttention.forward`, with each query head's key / value head picked by `kv_index`."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    cache = pop_cache(kwargs, past_key_values)   # transformers ≥ 5.24 passes it as `cache`
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    key, value = key.index_select(1, self.kv_index), value.index_select(1, self.kv_index)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                   eager_attention_forward)
    out, weights = attend(self, query, key, value, attention_mask,
                          dropout=0.0 if not self.training else self.attention_dropout,
                          scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights
