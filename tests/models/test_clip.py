"""CLIP adapter: retrieval metrics, raw-row collation, token counts."""
from __future__ import annotations

import torch

from mmprune.models.clip import recall_at_k


def test_recall_counts_ties_against_the_model():
    assert recall_at_k(torch.zeros(10, 10), 1) == 0.0          # a collapsed model is not perfect
    assert recall_at_k(torch.full((4, 4), float("nan")), 5) == 0.0
    assert recall_at_k(torch.eye(4), 1) == 100.0


def test_recall_at_k_hand_example():
    sim = torch.tensor([[0.9, 0.1, 0.0],    # right at rank 0
                        [0.8, 0.5, 0.1],    # right at rank 1
                        [0.9, 0.8, 0.1]])   # right at rank 2
    assert abs(recall_at_k(sim, 1) - 100 / 3) < 1e-4
    assert abs(recall_at_k(sim, 2) - 200 / 3) < 1e-4


def test_raw_rows_use_the_models_tokenizer_and_image_processor(adapter):
    import numpy as np
    from PIL import Image
    rows = [{"image": Image.fromarray(np.zeros((32, 32, 3), np.uint8)), "caption": "a red ring."},
            {"image": Image.fromarray(np.full((32, 32, 3), 255, np.uint8)), "caption": "a blue square on the left."}]
    batch = adapter.collate(rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"][0, 0] == adapter.tokenizer.bos_token_id
    assert batch["attention_mask"].sum(1).tolist() == [6, 9]
    assert adapter.tokens_per_example(batch)["language"].tolist() == [6, 9]
    assert (batch["input_ids"] != adapter.tokenizer.unk_token_id).all()
