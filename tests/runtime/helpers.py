"""Shared by the runtime tests: one pruning applied two ways, as zero masks and as removal."""
import torch

from mmprune.graph import remove_units
from mmprune.runtime import SiteControl
from mmprune.runtime.runtime import TokenRuntime


def mask_and_slice(graph, sliced_graph, drop: dict[str, list[int]], theta: float) -> None:
    """Zero-mask `drop` (group id -> unit positions) on `graph`'s runtime, remove the same units
    physically from `sliced_graph`, and give both the same token sites at `theta`."""
    rt = TokenRuntime.attach(graph)
    for gid, units in drop.items():
        mask = torch.ones(graph.groups[gid].size)
        mask[units] = 0
        rt.set_mask(gid, mask)
        remove_units(sliced_graph, sliced_graph.groups[gid], units)
    for tower in ("vision", "language"):
        rt.set_sites(tower, SiteControl(theta=theta))
    TokenRuntime.attach(sliced_graph).apply_policy(rt.policy())
