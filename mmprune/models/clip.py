"""Adapter for HF `CLIPModel`: a ViT image tower and a causal text transformer, contrastive task."""
from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from mmprune.errors import MMPruneError
from mmprune.models.base import (
    Adapter,
    AttentionSite,
    MLPSite,
    TokenSiteSpec,
    TowerSpec,
)
from mmprune.models.clip_blocks import PreNormBlockOps, clip_text_marks
from mmprune.runtime.blocks import ManagedTowerSpec, first_token_marks

TOWER_PATHS = {"vision": "vision_model", "language": "text_model"}

TINY_CONFIG = dict(
    text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32, bos_token_id=2,
                     eos_token_id=3, pad_token_id=0),  # the MiniVL tokenizer's special ids
    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8),
    projection_dim=32,
)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recall_at_k(sim: torch.Tensor, k: int) -> float:
    """Share of rows whose matching column (the diagonal) ranks in the top k.

    Ties count against the model (a collapsed model that scores everything equal gets chance or
    worse, never 100), and rows with non-finite similarities are misses.
    """
    target = sim.diagonal().unsqueeze(1)
    rank = (sim >= target).sum(dim=1) - 1
    hit = (rank < k) & torch.isfinite(sim).all(dim=1)
    return float(hit.float().mean() * 100)


def set_attention_heads(attention, num_heads: int) -> None:
    """HF `CLIPAttention`'s attributes after heads were removed (also LLaVA's CLIP tower)."""
    attention.num_heads = num_heads
    attention.embed_dim = num_heads * attention.head_dim  # attention width; the residual's is unchanged


class CLIPAdapter(Adapter):
    name = "clip"
    model_types = ("clip",)
    model_class = CLIPModel
    tasks = ("retrieval", "digits")
    headline_metric = {"retrieval": "r1_mean", "digits": "r1_mean"}
    #: SigLIP-style text: padded to the full length and pooled at the last position, no mask
    text_to_max_length: ClassVar[bool] = False
    text_attention_mask: ClassVar[bool] = True
    #: tokens the vision tower adds to its patches (CLIP's CLS; SigLIP has none)
    vision_extra_tokens: ClassVar[int] = 1

    @classmethod
    def default_processors(cls, model: CLIPModel):
        from mmprune.data.minivl.text import build_tokenizer
        from mmprune.models.processors import square_image_processor

        vcfg, tcfg = model.config.vision_config, model.config.text_config
        tok = build_tokenizer(tcfg.max_position_embeddings)
        if len(tok) > tcfg.vocab_size or tok.eos_token_id != tcfg.eos_token_id:
            return None, square_image_processor(vcfg.image_size)
        return tok, square_image_processor(vcfg.image_size)

    @classmethod
    def tiny_model(cls, seed: int, overrides: dict | None = None) -> CLIPModel:
        torch.manual_seed(seed)
        config = CLIPConfig(**_merge(TINY_CONFIG, overrides or {}))
        return CLIPModel(config).eval()

    # ---- structure
    def _layers(self, tower: str):
        return getattr(self.model, TOWER_PATHS[tower]).encoder.layers

    def attention_sites(self) -> list[AttentionSite]:
        sites = []
        for tower, root in TOWER_PATHS.items():
            for i, layer in enumerate(self._layers(tower)):
                att = layer.self_attn
                sites.append(AttentionSite(tower, i, f"{root}.encoder.layers.{i}.self_attn",
                                           "q_proj", "k_proj", "v_proj", "out_proj",
                                           att.num_heads, att.head_dim))
        return sites

    def mlp_sites(self) -> list[MLPSite]:
        return [MLPSite(tower, i, f"{root}.encoder.layers.{i}.mlp", ("fc1",), "fc2",
                        layer.mlp.fc1.out_features)
                for tower, root in TOWER_PATHS.items()
                for i, layer in enumerate(self._layers(tower))]

    def token_sites(self) -> list[TokenSiteSpec]:
        protected = {"vision": ("cls",), "language": ("sot", "eot")}
        return [TokenSiteSpec(tower, i, protected[tower])
                for tower in TOWER_PATHS for i in range(len(self._layers(tower)))]

    def towers(self) -> list[TowerSpec]:
        vcfg, tcfg = self.model.config.vision_config, self.model.config.text_config
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        patch_embed = 2 * patches * vcfg.hidden_size * vcfg.num_channels * vcfg.patch_size ** 2
        proj = self.model.config.projection_dim
        return [TowerSpec("vision", vcfg.hidden_size, patch_embed + 2 * vcfg.hidden_size * proj),
                TowerSpec("language", tcfg.hidden_size, 2 * tcfg.hidden_size * proj)]

    def managed_towers(self) -> list[ManagedTowerSpec]:
        if self.vision_extra_tokens != 1 or not self.text_attention_mask:
            raise self._undescribed("token pooling (it pools without a CLS / EOT token)")
        ops, eos = PreNormBlockOps(), self.model.config.text_config.eos_token_id
        return [ManagedTowerSpec("vision", "vision_model", "vision_model.encoder", "layers", ops,
                                 first_token_marks),
                ManagedTowerSpec("language", "text_model", "text_model.encoder", "layers", ops,
                                 clip_text_marks(eos), causal=True)]

    def downstream_towers(self, tower: str) -> set[str]:
        return set()   # a dual encoder: the towers meet only in the loss

    def set_num_heads(self, site: AttentionSite, num_heads: int) -> None:
        set_attention_heads(self.module(site.path), num_heads)

    # ---- data and task
    def input_spec(self) -> dict:
        vcfg, tcfg = self.model.config.vision_config, self.model.config.text_config
        return dict(image_size=vcfg.image_size, num_channels=vcfg.num_channels,
                    vocab_size=tcfg.vocab_size, max_text_len=tcfg.max_position_embeddings,
                    bos_token_id=tcfg.bos_token_id, eos_token_id=tcfg.eos_token_id,
                    pad_token_id=tcfg.pad_token_id)

    def example_inputs(self, batch_size: int = 2) -> dict[str, torch.Tensor]:
        spec = self.input_spec()
        g = torch.Generator().manual_seed(0)
        n = min(8, spec["max_text_len"])
        ids = torch.randint(4, spec["vocab_size"], (batch_size, n), generator=g)  # no special ids
        ids[:, 0], ids[:, -1] = spec["bos_token_id"], spec["eos_token_id"]
        px = torch.randn(batch_size, spec["num_channels"], spec["image_size"], spec["image_size"],
                         generator=g)
        return {**self._text(ids, torch.ones_like(ids)), "pixel_values": px}

    def _text(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(input_ids=ids, attention_mask=mask) if self.text_attention_mask else dict(input_ids=ids)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if "input_ids" not in examples[0]:
            return self._collate_raw(examples)
        pad = self.model.config.text_config.pad_token_id or 0
        max_len = self.model.config.text_config.max_position_embeddings
        rows = [torch.as_tensor(e["input_ids"])[:max_len] for e in examples]
        length = max_len if self.text_to_max_length else max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        px = torch.stack([torch.as_tensor(e["pixel_values"], dtype=torch.float32) for e in examples])
        return {**self._text(ids, mask), "pixel_values": px}

    def _collate_raw(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Rows with an `image` and a `caption`: the model's own tokenizer and image processor."""
        if self.tokenizer is None or self.image_processor is None:
            raise MMPruneError("this model has no tokenizer / image processor, so it cannot read "
                               "raw images and captions; use a model directory that includes them.")
        max_len = self.model.config.text_config.max_position_embeddings
        enc = self.tokenizer([e["caption"] for e in examples], truncation=True, max_length=max_len,
                             padding="max_length" if self.text_to_max_length else True,
                             return_tensors="pt")
        px = self.image_processor([e["image"] for e in examples], return_tensors="pt")["pixel_values"]
        return {**self._text(enc["input_ids"], enc["attention_mask"]), "pixel_values": px}

    def tokens_per_example(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        vcfg = self.model.config.vision_config
        b, n = batch["input_ids"].shape
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        vision = torch.full((b,), patches + self.vision_extra_tokens, dtype=torch.float64)
        mask = batch.get("attention_mask")  # without one, every (padded) position is computed
        language = mask.sum(1).double() if mask is not None else torch.full((b,), n, dtype=torch.float64)
        return {"vision": vision, "language": language}

    def task_loss(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        out = self.model(**batch)
        labels = torch.arange(out.logits_per_text.shape[0])
        return (F.cross_entropy(out.logits_per_text, labels)
                + F.cross_entropy(out.logits_per_image, labels)) / 2

    def distill_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).logits_per_image  # each image's distribution over the batch's texts

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], task: str) -> dict[str, float]:
        img, txt = [], []
        for batch in batches:
            img.append(F.normalize(self._features(self.model.get_image_features,
                                                  pixel_values=batch["pixel_values"]), dim=-1))
            txt.append(F.normalize(self._features(self.model.get_text_features,
                                                  input_ids=batch["input_ids"],
                                                  attention_mask=batch.get("attention_mask")), dim=-1))
        sim = torch.cat(img) @ torch.cat(txt).T
        m = {"i2t_r1": recall_at_k(sim, 1), "i2t_r5": recall_at_k(sim, 5),
             "t2i_r1": recall_at_k(sim.T, 1), "t2i_r5": recall_at_k(sim.T, 5)}
        m["r1_mean"] = (m["i2t_r1"] + m["t2i_r1"]) / 2
        return m

    @staticmethod
    def _features(fn, **inputs) -> torch.Tensor:
        out = fn(**inputs)
        # transformers 5 returns a model output whose pooler_output is the projected embedding
        return out if isinstance(out, torch.Tensor) else out.pooler_output
