"""Adapters for HF BLIP: `BlipForImageTextRetrieval` (retrieval, NLVR) and `BlipForQuestionAnswering`.

BLIP's text encoder is BERT-style with a cross-attention block in every layer: without image
states it is the unimodal text encoder of the contrastive (ITC) head; with them it is the
multimodal encoder of the image-text matching (ITM) head. NLVR uses the retrieval model unchanged,
so a zoo model loads with `BlipForImageTextRetrieval.from_pretrained` like any checkpoint: each
image of the pair goes through the ViT and one fused pass of its own (as in BLIP's NLVR model,
which has a cross-attention per image), the statement read behind a word naming the side that
pass sees ("left" / "right"), and the ITM head's two logits on the mean of the two fused [CLS]
states read as false / true. Without the side word a pass cannot know which image it sees, and a
statement about one side cannot be learnt (benchmarks/nlvr_layouts.py).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipForQuestionAnswering

from mmprune.errors import MMPruneError
from mmprune.models import blip_blocks, inputs
from mmprune.models.base import Adapter, AttentionSite, MLPSite, TowerSpec
from mmprune.models.clip import _merge, recall_at_k
from mmprune.runtime.blocks import ManagedTowerSpec, first_token_marks

TINY_CONFIG = dict(
    text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=40, bos_token_id=2,
                     sep_token_id=3, eos_token_id=3, pad_token_id=0),  # the MiniVL tokenizer's ids
    # BlipVisionConfig defaults to initializer_range 1e-10 (meant for loading checkpoints): a
    # ViT trained from that start maps every image to the same features for hundreds of steps
    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8, initializer_range=0.02),
    image_text_hidden_size=64, projection_dim=64,
)

#: contrastive temperature (HF's BlipForImageTextRetrieval has no learnable one)
ITC_TEMPERATURE = 0.07
#: ITC candidates re-ranked by the ITM head at evaluation, as in BLIP's retrieval protocol
RERANK_K = 8
#: NLVR: the word each fused pass reads before the statement, in pass order
NLVR_SIDES = ("left", "right")


def _cross_attention_mask(module, args, kwargs):
    """transformers' BlipTextLayer hands the cross-attention its mask as `attention_mask`, which
    BlipTextSelfAttention ignores in cross mode (it reads `encoder_attention_mask`), so decoder
    queries attend to the question's padding and answers depend on how a batch was padded.
    Route the mask to where it is read."""
    if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None:
        kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
    return args, kwargs


def fix_cross_attention_masks(model) -> None:
    for name, module in model.named_modules():
        if name.endswith("crossattention.self") and not getattr(module, "_mmprune_mask_fix", False):
            module.register_forward_pre_hook(_cross_attention_mask, with_kwargs=True)
            module._mmprune_mask_fix = True


class _BlipBase(Adapter):
    model_types = ("blip",)

    def __init__(self, model, tokenizer=None, image_processor=None):
        super().__init__(model, tokenizer, image_processor)
        fix_cross_attention_masks(model)

    @classmethod
    def tiny_model(cls, seed: int, overrides: dict | None = None):
        torch.manual_seed(seed)
        return cls.model_class(BlipConfig(**_merge(TINY_CONFIG, overrides or {}))).eval()

    @classmethod
    def default_processors(cls, model):
        from mmprune.data.minivl.text import build_tokenizer
        from mmprune.models.processors import square_image_processor

        tcfg = model.config.text_config
        tok = build_tokenizer(tcfg.max_position_embeddings)
        size = model.config.vision_config.image_size
        if len(tok) > tcfg.vocab_size or tok.eos_token_id != tcfg.sep_token_id:
            return None, square_image_processor(size)
        return tok, square_image_processor(size)

    def input_spec(self) -> dict:
        vcfg, tcfg = self.model.config.vision_config, self.model.config.text_config
        return dict(image_size=vcfg.image_size, num_channels=self._channels(),
                    vocab_size=tcfg.vocab_size, max_text_len=tcfg.max_position_embeddings,
                    bos_token_id=tcfg.bos_token_id, eos_token_id=tcfg.sep_token_id,
                    pad_token_id=tcfg.pad_token_id)

    def _channels(self) -> int:
        # BlipVisionConfig has no num_channels: the patch embedding fixes it
        return self.model.vision_model.embeddings.patch_embedding.in_channels

    def _max_len(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def _vision(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image token states and which of them are real [B, N] (all of them, unless token
        pruning handed on a batch padded to its longest example)."""
        from mmprune.runtime.runtime import runtime_of

        states = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
        rt = runtime_of(self.model)
        valid = None if rt is None or "vision" not in rt.towers else rt.towers["vision"].last_valid
        if valid is None or valid.shape != states.shape[:2]:
            valid = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return states, valid.long()

    # ---- structure: the ViT, the text encoder, its cross-attention as a tower of its own
    def attention_sites(self) -> list[AttentionSite]:
        return (blip_blocks.vision_sites(self.model.vision_model, "vision_model")[0]
                + blip_blocks.text_sites(self.model.text_encoder, "text_encoder")[0])

    def mlp_sites(self) -> list[MLPSite]:
        return (blip_blocks.vision_sites(self.model.vision_model, "vision_model")[1]
                + blip_blocks.text_sites(self.model.text_encoder, "text_encoder")[1])

    def towers(self) -> list[TowerSpec]:
        vcfg, tcfg = self.model.config.vision_config, self.model.config.text_config
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        patch_embed = 2 * patches * vcfg.hidden_size * self._channels() * vcfg.patch_size ** 2
        return [TowerSpec("vision", vcfg.hidden_size, patch_embed),
                TowerSpec("language", tcfg.hidden_size, self._head_flops()),
                TowerSpec("cross", tcfg.hidden_size, 0.0)]

    def _head_flops(self) -> float:
        """Per-example FLOPs of the task head after the text encoder (not pruned)."""
        raise NotImplementedError

    def set_num_heads(self, site: AttentionSite, num_heads: int) -> None:
        if site.fused_qkv:
            blip_blocks.set_vision_heads(self.module(site.path), num_heads)
        else:
            blip_blocks.set_text_heads(self.module(site.path).self, num_heads)

    def managed_towers(self) -> list[ManagedTowerSpec]:
        return [ManagedTowerSpec("vision", "vision_model", "vision_model.encoder", "layers",
                                 blip_blocks.BlipVisionBlockOps(), first_token_marks, output="compact"),
                ManagedTowerSpec("language", "text_encoder", "text_encoder.encoder", "layer",
                                 blip_blocks.BlipTextBlockOps(), blip_blocks.first_text_token_marks,
                                 cross_tower="cross")]

    def tokens_per_example(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tokens per example [B], or [B, P] for a model that runs its towers once per image of
        a P-image example (NLVR)."""
        patch = self.model.config.vision_config.patch_size
        px = batch["pixel_values"]
        h, w = px.shape[-2:]
        vision = torch.full(px.shape[:-3], (h // patch) * (w // patch) + 1, dtype=torch.float64)
        language = batch["attention_mask"].sum(-1).double()
        return {"vision": vision, "language": language, "cross": language, "cross_kv": vision}

    def example_inputs(self, batch_size: int = 2) -> dict[str, torch.Tensor]:
        spec = self.input_spec()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, spec["vocab_size"], (batch_size, 8), generator=g)
        ids[:, 0], ids[:, -1] = spec["bos_token_id"], spec["eos_token_id"]
        px = torch.randn(batch_size, spec["num_channels"], spec["image_size"], spec["image_size"],
                         generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px}


def _pad_cat(batches: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B_i, N_i, ...] batches along dim 0, zero-padding dim 1 to the longest."""
    width = max(t.shape[1] for t in batches)
    return torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])) for t in batches])


class BlipRetrievalAdapter(_BlipBase):
    """`BlipForImageTextRetrieval`: ITC + ITM retrieval, and NLVR through the ITM head."""

    name = "blip"
    model_class = BlipForImageTextRetrieval
    tasks = ("retrieval", "nlvr", "digits")
    headline_metric = {"retrieval": "r1_mean", "digits": "r1_mean", "nlvr": "accuracy"}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        inputs.require_processors(self)
        first = examples[0]
        if "statement" in first:  # NLVR: [B, 2, ...], one entry per side
            pixels = [inputs.pixels(self, [e[f"image_{side}"] for e in examples]) for side in NLVR_SIDES]
            text = inputs.text(self, [f"{side} {e['statement']}" for e in examples for side in NLVR_SIDES],
                               self._max_len())
            return {**{k: v.view(len(examples), len(NLVR_SIDES), -1) for k, v in text.items()},
                    "pixel_values": torch.stack(pixels, dim=1),
                    "labels": torch.tensor([int(e["label"]) for e in examples])}
        if "caption" in first:
            return {**inputs.text(self, [e["caption"] for e in examples], self._max_len()),
                    "pixel_values": inputs.pixels(self, [e["image"] for e in examples])}
        raise MMPruneError(f"BLIP retrieval model: rows with fields {sorted(first)} are neither "
                           "image-caption (retrieval) nor image-pair-statement (nlvr) rows.")

    def _head_flops(self) -> float:
        # the measured forward is vision + one ITM fusion pass: the ITM head follows
        return 2 * self.model.config.text_config.hidden_size * self.model.itm_head.out_features

    # ---- heads
    def _text_cls(self, batch, image=None) -> torch.Tensor:
        """[CLS] state of the text encoder: unimodal, or fused with `image` (states, mask)."""
        kwargs = {}
        if image is not None:
            kwargs = dict(encoder_hidden_states=image[0], encoder_attention_mask=image[1])
        out = self.model.text_encoder(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"], **kwargs)
        return out.last_hidden_state[:, 0]

    def _itc(self, image, batch) -> tuple[torch.Tensor, torch.Tensor]:
        img = F.normalize(self.model.vision_proj(image[0][:, 0]), dim=-1)
        txt = F.normalize(self.model.text_proj(self._text_cls(batch)), dim=-1)
        return img, txt

    def _itm(self, image, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cls = self._text_cls({"input_ids": ids, "attention_mask": mask}, image)
        return self.model.itm_head(cls)

    def _pair_itm(self, batch) -> torch.Tensor:
        """NLVR: the ITM logits [B, 2] on the mean fused [CLS] of the pair's passes, which run as
        one batch of [P·B] rows, pass after pass."""
        px, ids, mask = (batch[k].transpose(0, 1).flatten(0, 1)
                         for k in ("pixel_values", "input_ids", "attention_mask"))
        cls = self._text_cls({"input_ids": ids, "attention_mask": mask}, self._vision(px))
        return self.model.itm_head(cls.view(batch["pixel_values"].shape[1], -1, cls.shape[-1]).mean(0))

    def forward(self, batch):
        if batch["pixel_values"].dim() == 5:
            return self._pair_itm(batch)
        return self._itm(self._vision(batch["pixel_values"]), batch["input_ids"], batch["attention_mask"])

    # ---- task
    def task_loss(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        if "labels" in batch:
            return F.cross_entropy(self._pair_itm(batch), batch["labels"])
        image = self._vision(batch["pixel_values"])
        img, txt = self._itc(image, batch)
        sim = img @ txt.T / ITC_TEMPERATURE
        target = torch.arange(sim.shape[0])
        itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
        return itc + self._itm_loss(image, batch, sim.detach())

    def distill_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """NLVR: the ITM head's false / true logits; retrieval: each image's ITC logits over the
        batch's captions."""
        if "labels" in batch:
            return self._pair_itm(batch)
        img, txt = self._itc(self._vision(batch["pixel_values"]), batch)
        return img @ txt.T / ITC_TEMPERATURE

    def _itm_loss(self, image, batch, sim: torch.Tensor) -> torch.Tensor:
        """BLIP's ITM loss: each positive pair plus a hard negative text and a hard negative image,
        sampled in proportion to their contrastive similarity."""
        b = sim.shape[0]
        if b < 2:
            return sim.new_zeros(())
        weights = sim.softmax(dim=1).masked_fill(torch.eye(b, dtype=torch.bool), 0) + 1e-6
        neg_text = torch.multinomial(weights, 1).squeeze(1)
        neg_image = torch.multinomial(weights.T.contiguous(), 1).squeeze(1)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pairs = [torch.cat([t, t, t[neg_image]]) for t in image]
        logits = self._itm(pairs, torch.cat([ids, ids[neg_text], ids]),
                           torch.cat([mask, mask[neg_text], mask]))
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long()
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], task: str) -> dict[str, float]:
        if task == "nlvr":
            return {"accuracy": inputs.accuracy(self.example_hits(batches, task))}
        return self._retrieval_metrics(list(batches))

    @torch.no_grad()
    def example_hits(self, batches: Iterable[dict[str, torch.Tensor]], task: str) -> list[bool]:
        """Whether each NLVR example is answered right, in batch order (per-example accuracy, for
        paired comparisons of two models on the same examples). Retrieval ranks each query
        against the whole split, so it has no per-example hit."""
        if task != "nlvr":
            raise MMPruneError(f"a BLIP retrieval model has per-example hits for NLVR, not {task!r} "
                               "(a recall ranks against the whole split)")
        hits = []
        for batch in batches:
            hits += (self.forward(batch).argmax(-1) == batch["labels"]).tolist()
        return hits

    def _retrieval_metrics(self, batches: list[dict]) -> dict[str, float]:
        states, valid, img, txt, ids, masks = [], [], [], [], [], []
        for batch in batches:
            image = self._vision(batch["pixel_values"])
            i, t = self._itc(image, batch)
            states.append(image[0])
            valid.append(image[1])
            img.append(i)
            txt.append(t)
            ids.append(batch["input_ids"])
            masks.append(batch["attention_mask"])
        # batches differ in length (text padding; image tokens when token pruning is on)
        states, valid, ids, masks = (_pad_cat(t) for t in (states, valid, ids, masks))
        sim = torch.cat(img) @ torch.cat(txt).T
        m = {"itc_i2t_r1": recall_at_k(sim, 1), "itc_t2i_r1": recall_at_k(sim.T, 1)}
        i2t = self._rerank(sim, lambda rows, cols: ((states[rows], valid[rows]), ids[cols], masks[cols]))
        t2i = self._rerank(sim.T, lambda rows, cols: ((states[cols], valid[cols]), ids[rows], masks[rows]))
        m.update(i2t_r1=recall_at_k(i2t, 1), i2t_r5=recall_at_k(i2t, 5),
                 t2i_r1=recall_at_k(t2i, 1), t2i_r5=recall_at_k(t2i, 5))
        m["r1_mean"] = (m["i2t_r1"] + m["t2i_r1"]) / 2
        return m

    def _rerank(self, sim: torch.Tensor, pairs, chunk: int = 256) -> torch.Tensor:
        """Scores with each row's top-k ITC candidates re-scored by the ITM head (above the rest)."""
        k = min(RERANK_K, sim.shape[1])
        top = sim.topk(k, dim=1).indices
        rows = torch.arange(sim.shape[0]).repeat_interleave(k)
        cols = top.reshape(-1)
        scores = []
        for s in range(0, len(rows), chunk):
            e, i, m = pairs(rows[s:s + chunk], cols[s:s + chunk])
            width = int(m.sum(1).max())
            logits = self._itm(e, i[:, :width], m[:, :width])
            scores.append(logits[:, 1] - logits[:, 0])
        out = torch.full_like(sim, float("-inf"))
        out[rows, cols] = torch.cat(scores).to(out.dtype)
        # candidates outside the top k keep their ITC order, below every re-ranked one
        return torch.where(torch.isinf(out), sim - 1e4, out)


class BlipVQAAdapter(_BlipBase):
    """`BlipForQuestionAnswering`: answers generated by the text decoder (exact match)."""

    name = "blip-vqa"
    model_class = BlipForQuestionAnswering
    tasks = ("vqa",)
    headline_metric = {"vqa": "accuracy"}
    max_answer_tokens: ClassVar[int] = 4

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        inputs.require_processors(self)
        if "question" not in examples[0] or "answer" not in examples[0]:
            raise MMPruneError(f"BLIP VQA model: rows need 'question' and 'answer' fields, got "
                               f"{sorted(examples[0])}.")
        q = inputs.text(self, [e["question"] for e in examples], self._max_len())
        a = inputs.text(self, [str(e["answer"]) for e in examples], self.max_answer_tokens + 2)
        labels = a["input_ids"].masked_fill(a["attention_mask"] == 0, -100)
        return {**q, "pixel_values": inputs.pixels(self, [e["image"] for e in examples]),
                "decoder_input_ids": a["input_ids"], "decoder_attention_mask": a["attention_mask"],
                "labels": labels}

    def example_inputs(self, batch_size: int = 2) -> dict[str, torch.Tensor]:
        # BlipForQuestionAnswering.forward (what the dependency graph traces) runs the decoder,
        # and returns something that depends on it, only when given answer labels
        out = super().example_inputs(batch_size)
        answer = out["input_ids"][:, :4].clone()
        return {**out, "decoder_input_ids": answer, "decoder_attention_mask": torch.ones_like(answer),
                "labels": answer}

    def _head_flops(self) -> float:
        """The answer decoder (not pruned), greedy with a KV cache for `max_answer_tokens` steps,
        its cross-attention keys and values computed once over a full-length question: an upper
        bound, since token counts here are per tower and the decoder has no tower of its own."""
        cfg = self.model.config.text_config
        d, inner, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        steps, question = self.max_answer_tokens, self._max_len()
        per_layer = (2 * question * 2 * d * d                       # cross keys / values, once
                     + sum(2 * (4 * d * d + 2 * d * d + 2 * d * inner)   # projections and MLP
                           + 2 * 2 * d * (t + 1 + question)          # self- and cross-attention
                           for t in range(steps)))
        head = steps * 2 * (d * d + d * vocab)
        return float(cfg.num_hidden_layers * per_layer + head)

    def task_loss(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return self._answer(batch).loss

    def layerwise_blocks(self) -> list[tuple[str, str]]:
        # the answer decoder is pruned layer-wise too (it has no heads or tokens CoMP prunes)
        layers = self.model.text_decoder.bert.encoder.layer
        return super().layerwise_blocks() + [("decoder", f"text_decoder.bert.encoder.layer.{i}")
                                             for i in range(len(layers))]

    def token_mask(self, tower: str, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if tower == "decoder":     # the decoder's blocks read the answer tokens
            return batch["decoder_attention_mask"].bool()
        return super().token_mask(tower, batch)

    def calibration_forward(self, batch: dict[str, torch.Tensor]):
        """Teacher-forced answers: greedy generation would show the decoder one token at a time."""
        return self._answer(batch)

    def distill_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's logits over the answer tokens (teacher-forced), padding zeroed."""
        logits = self._answer(batch).logits
        return logits * batch["decoder_attention_mask"][..., None]

    def _answer(self, batch):
        """Teacher-forced answer decoding, as `BlipForQuestionAnswering.forward` does it, but on
        the question encoded by `_question` (which masks image tokens that token pruning padded)."""
        return self.model.text_decoder(
            input_ids=batch["decoder_input_ids"], attention_mask=batch["decoder_attention_mask"],
            encoder_hidden_states=self._question(batch), encoder_attention_mask=batch["attention_mask"],
            labels=batch["labels"], reduction="mean")

    def _question(self, batch) -> torch.Tensor:
        states, valid = self._vision(batch["pixel_values"])
        return self.model.text_encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            encoder_hidden_states=states, encoder_attention_mask=valid).last_hidden_state

    def forward(self, batch):
        # a fixed number of tokens: timed work must not depend on when each model says [SEP]
        return self.generate(batch, fixed_length=True)

    def generate(self, batch, fixed_length: bool = False) -> torch.Tensor:
        """Greedy answers; the decoder attends to the question without its padding (HF's
        `generate` passes an all-ones mask over the question). `fixed_length`: always
        `max_answer_tokens` tokens, [SEP] or not."""
        q = self._question(batch)
        cfg = self.model.config.text_config
        start = torch.full((q.shape[0], 1), cfg.bos_token_id, dtype=torch.long)
        return self.model.text_decoder.generate(
            input_ids=start, encoder_hidden_states=q, encoder_attention_mask=batch["attention_mask"],
            eos_token_id=cfg.sep_token_id, pad_token_id=cfg.pad_token_id,
            max_new_tokens=self.max_answer_tokens, do_sample=False,
            min_new_tokens=self.max_answer_tokens if fixed_length else None)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], task: str) -> dict[str, float]:
        return {"accuracy": inputs.accuracy(self.example_hits(batches, task))}

    @torch.no_grad()
    def example_hits(self, batches: Iterable[dict[str, torch.Tensor]], task: str) -> list[bool]:
        """Whether each generated answer matches exactly, in batch order (for paired comparisons)."""
        if task != "vqa":
            raise MMPruneError(f"a BLIP VQA model answers 'vqa', not {task!r}")
        return inputs.generated_hits(self, batches, "decoder_input_ids")
