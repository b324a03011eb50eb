"""`synthetic`: random image-caption pairs shaped for the model at hand, for smoke runs and tests.

The pairs carry no learnable relation, so task metrics sit at chance: this source exercises the
pipeline, it does not measure compression quality (the MiniVL tasks do that).
"""
from __future__ import annotations

from typing import Literal

import datasets
import numpy as np
from pydantic import Field

from mmprune.data.base import DataParams, DatasetSource


class SyntheticParams(DataParams):
    task: Literal["retrieval"] = Field("retrieval", description="Only 'retrieval' (image-caption pairs).")
    train_size: int = Field(128, ge=2, description="Examples in the train split.")
    validation_size: int = Field(64, ge=2, description="Examples in the validation split.")
    test_size: int = Field(64, ge=2, description="Examples in the test split.")
    min_text_len: int = Field(4, ge=3, description="Shortest caption, in tokens (with SOT/EOT).")


class SyntheticSource(DatasetSource):
    """Random image-caption pairs matching the model's input shapes (chance-level metrics)."""

    name = "synthetic"
    Params = SyntheticParams

    def load(self, adapter) -> datasets.DatasetDict:
        spec = adapter.input_spec()
        p = self.params
        sizes = {"train": p.train_size, "validation": p.validation_size, "test": p.test_size}
        out = {}
        for offset, (split, n) in enumerate(sizes.items()):
            rng = np.random.default_rng([self.seed, offset])
            out[split] = datasets.Dataset.from_dict(self._pairs(rng, n, spec))
        return datasets.DatasetDict(out)

    def _pairs(self, rng: np.random.Generator, n: int, spec: dict) -> dict:
        s, c = spec["image_size"], spec["num_channels"]
        images = rng.standard_normal((n, c, s, s), dtype=np.float32)
        longest = spec["max_text_len"]
        captions = []
        for _ in range(n):
            length = int(rng.integers(self.params.min_text_len, longest + 1))
            body = rng.integers(4, spec["vocab_size"], length - 2).tolist()  # above special ids
            captions.append([spec["bos_token_id"], *body, spec["eos_token_id"]])
        return {"pixel_values": list(images), "input_ids": captions}
