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


def _clip_config(width: int, layers: int, heads: int) -> dict:
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                 num_attention_heads=heads)
    return dict(text_config=dict(tower, vocab_size=128, max_position_embeddings=32),
                vision_config=dict(tower, image_size=64, patch_size=8), projection_dim=width)


CATALOG: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("clip-minivl", "clip", "retrieval", _clip_config(128, 4, 4), steps=1000,
             batch_size=64, lr=1e-3,
             description="CLIPModel, ViT 4x128 (64 px, patch 8: 65 tokens) + text 4x128, MLP ratio 4, "
                         "trained contrastively on MiniVL retrieval"),
    # digits collapse at the retrieval model's 2x-higher rates (loss pinned at ln(batch)); 5e-4 learns
    ZooEntry("clip-minivl-digits", "clip", "digits", _clip_config(128, 4, 4), steps=1000,
             batch_size=64, lr=5e-4,
             description="the clip-minivl architecture trained on scenes of real handwritten digits "
                         "(scikit-learn's), captioned by digit and position"),
]}
