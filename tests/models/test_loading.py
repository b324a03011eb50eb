"""Model references: tiny models with config overrides, HF directories, clear errors."""
from __future__ import annotations

import pytest

from mmprune.errors import ModelLoadError
from mmprune.models.loading import load_model
from mmprune.recipe import ModelSpec
from tests.conftest import make_adapter


def test_tiny_with_config_override(registry):
    adapter, bundle = load_model(ModelSpec(tiny="clip", config={"vision_config": {"num_hidden_layers": 3}}),
                                 registry, seed=0)
    assert bundle is None and len(adapter.model.vision_model.encoder.layers) == 3
    assert adapter.model.config.text_config.num_hidden_layers == 2


def test_tiny_with_bad_config_is_a_clear_error(registry):
    with pytest.raises(ModelLoadError, match="config overrides are invalid"):
        load_model(ModelSpec(tiny="clip", config={"vision_config": {"hidden_size": 30}}), registry, 0)


def test_hf_directory_loads_with_its_adapter(registry, tmp_path):
    make_adapter(seed=1).model.save_pretrained(tmp_path / "m")
    adapter, bundle = load_model(ModelSpec(path=str(tmp_path / "m")), registry, seed=0)
    assert adapter.name == "clip" and bundle is None


def test_unknown_model_type_names_supported_ones(registry, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="no adapter handles model_type 'bert'.*clip"):
        load_model(ModelSpec(path=str(tmp_path / "m")), registry, seed=0)


def test_a_family_without_sdpa_loads_with_the_default_spec(registry, tmp_path):
    """BLIP has no SDPA attention in transformers: the default `sdpa` falls back to eager."""
    from mmprune.models.blip import BlipRetrievalAdapter

    BlipRetrievalAdapter.tiny_model(0).save_pretrained(tmp_path)
    adapter, _ = load_model(ModelSpec(path=str(tmp_path)), registry, 0)
    assert isinstance(adapter, BlipRetrievalAdapter)
    assert adapter.model.config._attn_implementation == "eager"
