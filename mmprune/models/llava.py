"""Adapter for HF `LlavaForConditionalGeneration`: a CLIP vision tower, a projector and a Llama
decoder with grouped-query attention; instructions (and VQA questions) answered by generation.

Prompt layout (the MiniVL tokenizer has no chat template): `[SOS] <image>×N instruction answer :`,
then the answer and `[EOS]`. The loss covers the answer and `[EOS]` only.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mmprune.errors import MMPruneError
from mmprune.models import inputs, llama_blocks
from mmprune.models.base import Adapter, AttentionSite, MLPSite, TowerSpec
from mmprune.models.clip import _merge, set_attention_heads

IMAGE_TOKEN = "<image>"
ANSWER_CUE = "answer:"

TINY_CONFIG = dict(
    vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    text_config=dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=0),
    image_token_index=121,  # the MiniVL tokenizer's vocabulary, then <image>
    vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=16,
)


def llava_config(overrides: dict | None = None) -> LlavaConfig:
    cfg = _merge(TINY_CONFIG, overrides or {})
    v = cfg["vision_config"]
    cfg["image_seq_length"] = (v["image_size"] // v["patch_size"]) ** 2  # CLS dropped ("default")
    return LlavaConfig(**cfg)


class LlavaAdapter(Adapter):
    name = "llava"
    model_types = ("llava",)
    model_class = LlavaForConditionalGeneration
    tasks = ("instruct", "vqa")
    headline_metric = {"instruct": "exact_match", "vqa": "accuracy"}
    max_answer_tokens = 4

    @classmethod
    def tiny_model(cls, seed: int, overrides: dict | None = None) -> LlavaForConditionalGeneration:
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(llava_config(overrides)).eval()

    @classmethod
    def default_processors(cls, model):
        from mmprune.data.minivl.text import build_tokenizer
        from mmprune.models.processors import square_image_processor

        tok = build_tokenizer(model.config.text_config.max_position_embeddings)
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        ip = square_image_processor(model.config.vision_config.image_size)
        fits = (tok.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_id
                and len(tok) <= model.config.text_config.vocab_size)
        return (tok if fits else None), ip

    # ---- structure
    # `vision`: the CLIP ViT; `language`: the Llama decoder (query heads of its grouped-query
    # attention, SwiGLU channels). Their blocks are what prune_layerwise sparsifies, what the
    # cost model counts and what structured pruning removes. CoMP prunes the decoder only:
    # its masks, statistics and token sites live in the runtime's `DecoderTokenPruner`.
    _VIT = "model.vision_tower.encoder.layers"
    _LLM = "model.language_model.layers"

    def attention_sites(self) -> list[AttentionSite]:
        vit, llm = self.model.config.vision_config, self.model.config.text_config
        head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
        return ([AttentionSite("vision", i, f"{self._VIT}.{i}.self_attn", "q_proj", "k_proj",
                               "v_proj", "out_proj", vit.num_attention_heads,
                               vit.hidden_size // vit.num_attention_heads)
                 for i in range(vit.num_hidden_layers)]
                + [AttentionSite("language", i, f"{self._LLM}.{i}.self_attn", "q_proj", "k_proj",
                                 "v_proj", "o_proj", llm.num_attention_heads, head_dim,
                                 num_kv_heads=llm.num_key_value_heads)
                   for i in range(llm.num_hidden_layers)])

    def mlp_sites(self) -> list[MLPSite]:
        vit, llm = self.model.config.vision_config, self.model.config.text_config
        return ([MLPSite("vision", i, f"{self._VIT}.{i}.mlp", ("fc1",), "fc2", vit.intermediate_size)
                 for i in range(vit.num_hidden_layers)]
                + [MLPSite("language", i, f"{self._LLM}.{i}.mlp", ("gate_proj", "up_proj"),
                           "down_proj", llm.intermediate_size) for i in range(llm.num_hidden_layers)])

    def towers(self) -> list[TowerSpec]:
        """Prefill FLOPs outside the blocks: the patch embedding and the projector on the vision
        side, the LM head on the one position whose next token the prefill predicts."""
        cfg = self.model.config
        vit, llm = cfg.vision_config, cfg.text_config
        patches = (vit.image_size // vit.patch_size) ** 2
        patch_embed = 2 * patches * vit.hidden_size * vit.num_channels * vit.patch_size ** 2
        proj = self.model.model.multi_modal_projector
        projector = 2 * cfg.image_seq_length * (proj.linear_1.in_features * proj.linear_1.out_features
                                                + proj.linear_2.in_features * proj.linear_2.out_features)
        return [TowerSpec("vision", vit.hidden_size, patch_embed + projector),
                TowerSpec("language", llm.hidden_size, 2 * llm.hidden_size * llm.vocab_size)]

    def set_num_heads(self, site: AttentionSite, num_heads: int) -> None:
        if site.num_kv_heads is not None:
            raise MMPruneError("grouped-query attention needs the kept heads: use set_heads")
        set_attention_heads(self.module(site.path), num_heads)     # the CLIP ViT

    def set_heads(self, site: AttentionSite, kept: list[int]) -> None:
        if site.num_kv_heads is None:
            return self.set_num_heads(site, len(kept))
        llama_blocks.set_query_heads(self.module(site.path), site, kept)

    def example_inputs(self, batch_size: int = 2) -> dict[str, torch.Tensor]:
        spec = self.input_spec()
        g = torch.Generator().manual_seed(0)
        text = torch.randint(4, self.model.config.image_token_id, (batch_size, 6), generator=g)
        head = torch.tensor([spec["bos_token_id"]] + [self.model.config.image_token_id]
                            * spec["image_tokens"]).expand(batch_size, -1)
        ids = torch.cat([head, text], 1)
        px = torch.randn(batch_size, spec["num_channels"], spec["image_size"], spec["image_size"],
                         generator=g)
        mask = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": px,
                "prompt_ids": ids, "prompt_mask": mask}

    # ---- data
    def input_spec(self) -> dict:
        vcfg, tcfg = self.model.config.vision_config, self.model.config.text_config
        return dict(image_size=vcfg.image_size, num_channels=vcfg.num_channels,
                    vocab_size=tcfg.vocab_size, max_text_len=tcfg.max_position_embeddings,
                    bos_token_id=tcfg.bos_token_id, eos_token_id=tcfg.eos_token_id,
                    pad_token_id=tcfg.pad_token_id, image_tokens=self.model.config.image_seq_length)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        inputs.require_processors(self)
        first = examples[0]
        key = "instruction" if "instruction" in first else "question" if "question" in first else None
        if key is None or "answer" not in first:
            raise MMPruneError(f"LLaVA model: rows need an 'instruction' (or 'question') and an "
                               f"'answer', got {sorted(first)}.")
        spec = self.input_spec()
        head = [spec["bos_token_id"]] + [self.model.config.image_token_id] * spec["image_tokens"]
        prompts = [head + self._ids(f"{e[key]} {ANSWER_CUE}") for e in examples]
        answers = [self._ids(str(e["answer"]))[:self.max_answer_tokens] + [spec["eos_token_id"]]
                   for e in examples]
        pad = spec["pad_token_id"]
        full = [p + a for p, a in zip(prompts, answers)]
        ids = inputs.pad_right(full, pad)
        mask = inputs.pad_right([[1] * len(f) for f in full], 0)
        labels = inputs.pad_right([[-100] * len(p) + a for p, a in zip(prompts, answers)], -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": inputs.pixels(self, [e["image"] for e in examples]),
                "prompt_ids": inputs.pad_left(prompts, pad),
                "prompt_mask": inputs.pad_left([[1] * len(p) for p in prompts], 0),
                "answer_ids": inputs.pad_right(answers, pad)}

    def tokens_per_example(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b = batch["pixel_values"].shape[0]
        vision = torch.full((b,), self.model.config.image_seq_length + 1, dtype=torch.float64)
        return {"vision": vision, "language": batch["prompt_mask"].sum(1).double()}

    def managed_towers(self) -> list:
        return []     # no block-by-block towers: token sites live between decoder layers

    def decoder_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    def decoder_token_pruner(self, sites: list, position: str, probe: str):
        from mmprune.runtime.decoder import DecoderTokenPruner
        return DecoderTokenPruner(self.model, sites, self.model.config.image_token_id,
                                  self.prompt_end, position=position, probe=probe,
                                  instruction_tokens=self.instruction_tokens)

    def instruction_tokens(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, N] the instruction text: after the last image token, before the answer cue that
        `prompt_end` finds (the cue, BOS, image tokens and answer are not instruction)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        image = input_ids == self.model.config.image_token_id
        after_image = torch.where(image, positions, -1).amax(1)
        cue_start, _ = self._answer_cue(input_ids, valid)
        return valid.bool() & (positions > after_image[:, None]) & (positions < cue_start[:, None])

    def prompt_end(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per example, the index of the token that ends the prompt: the last token of the last
        answer cue. In-LLM token scores are its attention (tokens.md §3; comp.md §3.1: the token
        before the answer span in training, the last prompt token at inference). Instructions
        may say "answer:" too, so the last cue counts; answers are short and never contain it.
        The token is the same whether the answer or generated tokens follow, so cached and
        recomputed generation drop the same tokens. Without a cue: the last valid token."""
        return self._answer_cue(input_ids, valid)[1]

    def _answer_cue(self, input_ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example, the first and last index of the last answer cue; both the last valid
        token when there is no cue."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        last_valid = torch.where(valid.bool(), positions, -1).amax(1)
        cue = self._ids(ANSWER_CUE) if self.tokenizer is not None else []
        if not cue or input_ids.shape[1] < len(cue):
            return last_valid, last_valid
        k = len(cue)
        windows = input_ids.unfold(1, k, 1)                              # [B, N − k + 1, k]
        hit = (windows == torch.tensor(cue, device=input_ids.device)).all(-1)
        end = torch.where(hit, positions[:, :hit.shape[1]] + k - 1, -1).amax(1)
        found = end >= 0
        return torch.where(found, end - k + 1, last_valid), torch.where(found, end, last_valid)

    # ---- task
    def task_loss(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    def generate(self, batch) -> torch.Tensor:
        spec = self.input_spec()
        out = self.model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"],
                                  pixel_values=batch["pixel_values"], do_sample=False,
                                  max_new_tokens=self.max_answer_tokens + 1,
                                  eos_token_id=spec["eos_token_id"], pad_token_id=spec["pad_token_id"])
        return out[:, batch["prompt_ids"].shape[1]:]

    def generate_tokens(self, batch, n: int) -> torch.Tensor:
        spec = self.input_spec()
        return self.model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"],
                                   pixel_values=batch["pixel_values"], do_sample=False,
                                   max_new_tokens=n, min_new_tokens=n, pad_token_id=spec["pad_token_id"])

    def forward(self, batch):
        # a fixed number of tokens: timed work must not depend on when each model says [EOS]
        return self.generate_tokens(batch, self.max_answer_tokens + 1)

    def prefill(self, batch):
        """The prompt's forward, as generation's first step runs it (the last position's logits)."""
        return self.model(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"],
                          pixel_values=batch["pixel_values"], use_cache=False, logits_to_keep=1)

    # ---- layer-wise pruning
    def layerwise_blocks(self) -> list[tuple[str, str]]:
        """The CLIP ViT's blocks (tower `vision`), then the Llama decoder's (tower `language`)."""
        vit, llm = self.model.config.vision_config, self.model.config.text_config
        return ([("vision", f"{self._VIT}.{i}") for i in range(vit.num_hidden_layers)]
                + [("language", f"{self._LLM}.{i}") for i in range(llm.num_hidden_layers)])

    def token_mask(self, tower: str, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        # the decoder runs the whole teacher-forced sequence (image tokens included)
        return None if tower == "vision" else batch["attention_mask"].bool()

    def calibration_forward(self, batch: dict[str, torch.Tensor]):
        """Teacher-forced over prompt and answer, without a KV cache: every decoder block sees
        the answer tokens generation would feed it, and calibrates on them too."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], use_cache=False)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], task: str) -> dict[str, float]:
        metric = self.headline_metric.get(task, "exact_match")
        return {metric: inputs.generated_exact_match(self, batches, "answer_ids")}
