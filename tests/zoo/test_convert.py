"""Weight converters between zoo families: CLIP's ViT as BLIP's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmprune.models.blip import BlipRetrievalAdapter
from mmprune.models.clip import CLIPAdapter
from mmprune.zoo.catalog import _blip_config
from mmprune.zoo.convert import clip_vision_to_blip, convert


class _FoldedNorm(nn.Module):
    """CLIP's pre-block layer norm with one fixed deviation: what the converter folds."""

    def __init__(self, norm: nn.LayerNorm, sigma: float):
        super().__init__()
        self.norm, self.sigma = norm, sigma

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / self.sigma * self.norm.weight + self.norm.bias


def test_blip_vit_from_clip_equals_clip_with_its_first_norm_folded():
    """Fused qkv, embeddings and projections convert exactly: the converted BLIP tower equals CLIP
    whose pre-block layer norm divides by the converter's one deviation instead of each token's."""
    clip = CLIPAdapter.tiny_model(0, {"vision_config": {"image_size": 64}, "projection_dim": 64})
    torch.manual_seed(1)
    with torch.no_grad():   # a non-trivial pre-block norm
        clip.vision_model.pre_layrnorm.weight.uniform_(0.5, 1.5)
        clip.vision_model.pre_layrnorm.bias.normal_(0, 0.1)
    sample = {"pixel_values": torch.randn(8, 3, 64, 64)}
    w = clip.state_dict()
    converted = convert("clip_vision_to_blip", w, sample)
    vcfg = clip.config.vision_config
    width = vcfg.hidden_size
    blip = BlipRetrievalAdapter.tiny_model(0, _blip_config(width, vcfg.num_hidden_layers,
                                                           vcfg.num_attention_heads))
    assert not blip.load_state_dict(converted, strict=False).unexpected_keys
    layer = blip.vision_model.encoder.layers[1].self_attn.qkv.weight
    assert torch.equal(layer[width:2 * width], w["vision_model.encoder.layers.1.self_attn.k_proj.weight"])

    with torch.no_grad():
        emb = clip.vision_model.embeddings(sample["pixel_values"])
    sigma = float(emb.std(-1, unbiased=False).median())
    clip.vision_model.pre_layrnorm = _FoldedNorm(clip.vision_model.pre_layrnorm, sigma)
    px = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=px).pooler_output
        got = blip.vision_proj(blip.vision_model(pixel_values=px).last_hidden_state[:, 0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unknown_converter_is_a_clear_error():
    from mmprune.errors import MMPruneError
    with pytest.raises(MMPruneError, match="clip_vision_to_blip"):
        convert("clip_vision_to_blipp", {}, {})
    assert clip_vision_to_blip   # the name the catalog uses
