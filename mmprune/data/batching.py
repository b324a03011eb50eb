"""Batches of a `datasets.Dataset`, collated by a model adapter; shuffled deterministically."""
from __future__ import annotations

from collections.abc import Iterator

import datasets
import numpy as np
import torch


def collate_rows(adapter, ds: datasets.Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    rows = ds[indices]
    return adapter.collate([dict(zip(rows, values)) for values in zip(*rows.values())])


def iterate_batches(adapter, ds: datasets.Dataset, batch_size: int, *, shuffle: bool = False,
                    seed: int = 0, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    order = np.arange(len(ds))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(ds))
    stop = len(ds) - (len(ds) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        yield collate_rows(adapter, ds, order[start:start + batch_size].tolist())
