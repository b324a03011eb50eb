"""Raw rows (PIL images, strings) to tensors with a model's own tokenizer and image processor."""
from __future__ import annotations

import torch

from mmprune.errors import MMPruneError


def require_processors(adapter) -> None:
    if adapter.tokenizer is None or adapter.image_processor is None:
        raise MMPruneError("this model has no tokenizer / image processor, so it cannot read raw "
                           "images and text; use a model directory that includes them.")


def pixels(adapter, images: list) -> torch.Tensor:
    return adapter.image_processor(images, return_tensors="pt")["pixel_values"]


def text(adapter, texts: list[str], max_length: int, *, special: bool = True,
         to_max: bool = False) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask, right-padded (to `max_length` when `to_max`)."""
    enc = adapter.tokenizer(list(texts), truncation=True, max_length=max_length,
                            padding="max_length" if to_max else True, add_special_tokens=special,
                            return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def pad_left(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, -len(r):] = torch.as_tensor(r, dtype=torch.long)
    return out


def accuracy(hits: list[bool]) -> float:
    return 100.0 * sum(hits) / max(1, len(hits))


def generated_exact_match(adapter, batches, gold_key: str) -> float:
    """Exact match (%) of `adapter.generate(batch)` against the token ids in `batch[gold_key]`."""
    return accuracy(generated_hits(adapter, batches, gold_key))


def generated_hits(adapter, batches, gold_key: str) -> list[bool]:
    """Per example, in batch order: whether `adapter.generate(batch)` decodes to the text of
    `batch[gold_key]`."""
    hits = []
    for batch in batches:
        pred = adapter.tokenizer.batch_decode(adapter.generate(batch), skip_special_tokens=True)
        gold = adapter.tokenizer.batch_decode(batch[gold_key], skip_special_tokens=True)
        hits += [p.strip() == g.strip() for p, g in zip(pred, gold)]
    return hits
