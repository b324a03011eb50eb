"""The KV cache keyword: mmprune's replaced forwards accept it under either transformers name."""
import inspect

from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from mmprune.models.kv_cache import CACHE_KWARG, pop_cache


def test_the_keyword_is_the_one_the_installed_transformers_uses():
    assert CACHE_KWARG in inspect.signature(create_causal_mask).parameters
    assert CACHE_KWARG in BaseModelOutputWithPast.__dataclass_fields__


def test_either_name_is_taken_and_both_are_removed():
    cache = object()
    for name in ("cache", "past_key_values"):
        kwargs = {name: cache, "output_attentions": False}
        assert pop_cache(kwargs) is cache
        assert kwargs == {"output_attentions": False}
    kwargs = {"cache": None, "past_key_values": None}
    assert pop_cache(kwargs, cache) is cache and kwargs == {}    # a positional one wins over None
    assert pop_cache({}) is None
