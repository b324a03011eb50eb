"""Adapter for HF `SiglipModel`: CLIP's dual-encoder layout with SigLIP's own conventions.

What differs from CLIP, and why this subclass exists: no CLS token (the vision tower pools with
a multi-head attention "probe" head, which is not pruned), text is padded to the full length and
pooled at the last position, and the loss is the pairwise sigmoid loss.
"""
from __future__ import annotations

import torch
from transformers import SiglipConfig, SiglipModel

from mmprune.models.clip import CLIPAdapter, _merge
from mmprune.models.processors import square_image_processor

TINY_CONFIG = dict(
    text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32, pad_token_id=0,
                     bos_token_id=2, eos_token_id=3),
    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8),
)


class SiglipAdapter(CLIPAdapter):
    name = "siglip"
    model_types = ("siglip",)
    model_class = SiglipModel
    text_to_max_length = True
    text_attention_mask = False
    vision_extra_tokens = 0

    @classmethod
    def tiny_model(cls, seed: int, overrides: dict | None = None) -> SiglipModel:
        torch.manual_seed(seed)
        return SiglipModel(SiglipConfig(**_merge(TINY_CONFIG, overrides or {}))).eval()

    @classmethod
    def default_processors(cls, model: SiglipModel):
        tok, _ = super().default_processors(model)
        return tok, square_image_processor(model.config.vision_config.image_size)

    def towers(self):
        from mmprune.models.base import TowerSpec

        vcfg, tcfg = self.model.config.vision_config, self.model.config.text_config
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        d, m = vcfg.hidden_size, vcfg.intermediate_size
        patch_embed = 2 * patches * d * vcfg.num_channels * vcfg.patch_size ** 2
        # attention-pooling head: a 1-token probe attends over every patch, then an MLP on 1 token
        probe = 2 * d * d + 2 * 2 * patches * d * d + 2 * 2 * patches * d + 2 * d * d + 4 * d * m
        text_head = 2 * tcfg.hidden_size * tcfg.projection_size
        return [TowerSpec("vision", d, patch_embed + (probe if vcfg.vision_use_head else 0)),
                TowerSpec("language", tcfg.hidden_size, text_head)]

    def token_sites(self):
        from mmprune.models.base import TokenSiteSpec

        return [TokenSiteSpec(t, i, ("last",) if t == "language" else ())
                for t in ("vision", "language") for i in range(len(self._layers(t)))]

    def task_loss(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return self.model(**batch, return_loss=True).loss
