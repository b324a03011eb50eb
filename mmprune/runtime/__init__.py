"""Running CoMP-managed towers: soft masks, attention-based token scores and token dropping.

`TokenRuntime` lives in mmprune.runtime.runtime (it needs the graph, which needs the adapters,
which describe their towers with the classes here).
"""
from mmprune.runtime.blocks import BlockOps, ManagedTowerSpec, TokenMarks
from mmprune.runtime.tower import BlockControl, ManagedTower, SiteControl

__all__ = ["BlockControl", "BlockOps", "ManagedTower", "ManagedTowerSpec", "SiteControl", "TokenMarks"]
