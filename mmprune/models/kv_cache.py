"""The KV cache's keyword in transformers' decoder forwards: `cache` from 5.24, `past_key_values` before.

mmprune replaces the LLaVA language model's forward (token pruning inside the decoder) and the
attention forward of uneven GQA groups, so it calls transformers' internals by keyword; 5.24
renamed that keyword in the model and layer forwards, `create_causal_mask` and the outputs.
"""
from __future__ import annotations

import inspect

from transformers.masking_utils import create_causal_mask

#: the keyword the installed transformers gives the KV cache
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def pop_cache(kwargs: dict, given=None):
    """The KV cache a caller passed under either name; both names are removed from `kwargs`."""
    for name in ("cache", "past_key_values"):
        value = kwargs.pop(name, None)
        if given is None:
            given = value
    return given
