"""The MiniVL zoo: small real-architecture models, each trained on its MiniVL task on a CPU."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str                 # adapter name
    task: str                   # MiniVL task it is trained on
    config: dict                # overrides of the family's tiny config
    steps: int                  # optimiser steps
    batch_size: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.05
    data: dict = field(default_factory=dict)   # MiniVL params beyond the task
    description: str = ""
    #: start from another zoo model's weights (its name, or a directory): {prefix: source prefix}
    init_from: str | None = None
    init_map: dict = field(default_factory=dict)
    #: a converter of `mmprune.zoo.convert` applied to the parent's weights first (another family)
    init_convert: str | None = None
    #: parameter-name prefixes kept frozen (LLaVA trains its projector and LLM, not its ViT)
    freeze: tuple[str, ...] = ()


def _clip_config(width: int, layers: int, heads: int) -> dict:
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                 num_attention_heads=heads)
    return dict(text_config=dict(tower, vocab_size=128, max_position_embeddings=32),
                vision_config=dict(tower, image_size=64, patch_size=8), projection_dim=width)


def _blip_config(width: int, layers: int, heads: int) -> dict:
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                 num_attention_heads=heads)
    # quick_gelu: the ViT starts from clip-minivl's, trained with it
    return dict(text_config=dict(tower, vocab_size=128, max_position_embeddings=40),
                vision_config=dict(tower, image_size=64, patch_size=8, hidden_act="quick_gelu"),
                image_text_hidden_size=width, projection_dim=width)


def _llava_config(width: int, layers: int, heads: int, kv_heads: int) -> dict:
    # the vision tower is clip-minivl's, whose weights it starts from
    return dict(vision_config=_clip_config(128, 4, 4)["vision_config"],
                text_config=dict(hidden_size=width, intermediate_size=4 * width,
                                 num_hidden_layers=layers, num_attention_heads=heads,
                                 num_key_value_heads=kv_heads))


_BLIP_ALL = {"vision_model.": "vision_model.", "text_encoder.": "text_encoder.",
             "vision_proj.": "vision_proj.", "text_proj.": "text_proj.", "itm_head.": "itm_head."}
_BLIP_VQA = {"vision_model.": "vision_model.", "text_encoder.": "text_encoder.",
             "text_decoder.bert.": "text_encoder."}

CATALOG: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("clip-minivl", "clip", "retrieval", _clip_config(128, 4, 4), steps=1000,
             batch_size=64, lr=1e-3,
             description="CLIPModel, ViT 4x128 (64 px, patch 8: 65 tokens) + text 4x128, MLP ratio 4, "
                         "trained contrastively on MiniVL retrieval"),
    # fine-tuned from clip-minivl: from scratch, 1000 steps left it near chance (test R@1 1.0);
    # at 2e-3 it collapsed (loss pinned at ln(batch))
    ZooEntry("clip-minivl-digits", "clip", "digits", _clip_config(128, 4, 4), steps=600,
             batch_size=64, lr=5e-4,
             description="clip-minivl fine-tuned on scenes of real handwritten digits "
                         "(scikit-learn's), captioned by digit and position",
             init_from="clip-minivl", init_map={"": ""}),
    # its ViT starts from clip-minivl's (converted, see mmprune.zoo.convert): from scratch, 450
    # steps left it nearly blind (test R@1 2.0); at 1e-3 it collapsed to chance
    ZooEntry("blip-minivl", "blip", "retrieval", _blip_config(128, 4, 4), steps=400,
             batch_size=48, lr=5e-4,
             description="BlipForImageTextRetrieval, ViT 4x128 (from clip-minivl's) + BERT-style "
                         "text encoder 4x128 with cross-attention; ITC + ITM (hard negatives) on "
                         "MiniVL retrieval, evaluated by ITC then ITM re-ranking of the top 8",
             init_from="clip-minivl", init_convert="clip_vision_to_blip",
             init_map={"vision_model.": "vision_model.", "vision_proj.": "vision_proj."}),
    # 1200 steps: at 600 its loss was still falling and 1000 more steps of plain training took
    # test accuracy from 69.8 to 86.0, so pruned models that train on gained more than they lost
    ZooEntry("blip-minivl-nlvr", "blip", "nlvr", _blip_config(128, 4, 4), steps=1200,
             batch_size=48, lr=5e-4,
             description="BlipForImageTextRetrieval on MiniVL nlvr, fine-tuned from blip-minivl: "
                         "each image in a ViT pass and a fused pass of its own (65 vision tokens "
                         "each), the statement read behind its side's name, the ITM head on the "
                         "mean fused [CLS] as the true / false classifier",
             init_from="blip-minivl", init_map=_BLIP_ALL),
    ZooEntry("blip-minivl-vqa", "blip-vqa", "vqa", _blip_config(128, 4, 4), steps=400,
             batch_size=48, lr=5e-4,
             description="BlipForQuestionAnswering (vision, text encoder, answer decoder) on MiniVL "
                         "vqa, fine-tuned from blip-minivl (its text encoder also starts the answer "
                         "decoder); answers generated greedily, exact match",
             init_from="blip-minivl", init_map=_BLIP_VQA),
    ZooEntry("llava-minivl", "llava", "instruct", _llava_config(96, 4, 4, 2), steps=500,
             batch_size=48, lr=5e-4,
             description="LlavaForConditionalGeneration: CLIP ViT 4x128 (64 patch tokens) + "
                         "projector + Llama 4x96 with grouped-query attention (4 query, 2 KV heads); "
                         "MiniVL instruct answered by generation; the ViT is clip-minivl's, frozen",
             init_from="clip-minivl", init_map={"model.vision_tower.": "vision_model."},
             freeze=("model.vision_tower.",)),
]}
