"""The Context passes meet in: model, graph, data, scores, measurements and the run directory."""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmprune.data.batching import iterate_batches
from mmprune.errors import MMPruneError, did_you_mean
from mmprune.graph import ModelGraph
from mmprune.models.base import Adapter
from mmprune.recipe import EvaluationSpec


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Context:
    adapter: Adapter
    graph: ModelGraph
    data: datasets.DatasetDict
    task: str
    seed: int = 0
    run_dir: Path | None = None
    facts: set[str] = field(default_factory=set)
    #: fact name (e.g. 'scores.params') -> group id -> per-unit tensor
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: measurements taken by evaluate passes, in order
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    #: JSON-able facts passes leave for later passes and the report (e.g. quantization settings)
    state: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    #: how measurements are taken (the recipe's `evaluation` block)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    #: where `log` sends lines (the pipeline's logger); None: tqdm.write when progress is shown
    logger: Callable[[str], None] | None = None
    #: a split no code may read (the report split, while calibrating passes run)
    sealed_split: str | None = None
    #: loads a fresh copy of the run's dense source model (a distillation teacher); None: unavailable
    load_dense: Callable[[], Adapter] | None = None
    #: the teacher `load_dense` gave, kept so a second pass that distils does not load it again
    dense_teacher: Adapter | None = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    def examples(self, split: str, max_examples: int | None = None) -> datasets.Dataset:
        if split == self.sealed_split:
            raise MMPruneError(f"a pass that fits the model to data read the '{split}' split, "
                               "which the report is measured on; that split is sealed until the "
                               "final measurement.")
        if split not in self.data:
            raise MMPruneError(f"the data has no split '{split}'." + did_you_mean(split, self.data))
        ds = self.data[split]
        return ds.select(range(min(max_examples, len(ds)))) if max_examples else ds

    def batches(self, split: str, batch_size: int, *, max_examples: int | None = None,
                shuffle: bool = False, seed: int | None = None,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches of a split; shuffled deterministically from `seed` when asked."""
        yield from iterate_batches(self.adapter, self.examples(split, max_examples), batch_size,
                                   shuffle=shuffle, seed=self.seed if seed is None else seed,
                                   drop_last=drop_last)

    def log(self, message: str) -> None:
        """A line for the user, printed above any progress bar (silent when progress is off)."""
        if self.logger is not None:
            self.logger(message)
        elif self.show_progress:
            tqdm.write(message)

    def progress(self, iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
        return tqdm(iterable, desc=desc, total=total, leave=False, disable=not self.show_progress,
                    dynamic_ncols=True)
