"""Pure-tensor kernels of post-training pruning (ecoflap.md §2.4, §4.2-4.3).

`allocate` turns global group scores into per-group sparsities under an exact budget (stage 1);
`magnitude_mask`, `wanda_mask` and `sparsegpt_prune` prune one matrix at a given sparsity
(stage 2), from calibration statistics gathered by `InputStats`. Nothing here knows about models.
"""
from mmprune.sparsity.allocate import Allocation, allocate, allocate_sparsity
from mmprune.sparsity.local import (
    InputStats,
    magnitude_mask,
    parse_pattern,
    pruned_count,
    sparsegpt_prune,
    wanda_mask,
)

__all__ = [
    "Allocation",
    "InputStats",
    "allocate",
    "allocate_sparsity",
    "magnitude_mask",
    "parse_pattern",
    "pruned_count",
    "sparsegpt_prune",
    "wanda_mask",
]
