"""Physical removal of heads and channels through torch-pruning, with the fixes HF models need.

torch-pruning finds every layer coupled to a pruned channel, but it knows nothing of heads: given
arbitrary channel indices it would happily cut half a head. So indices are always expanded from
whole heads here. It also leaves HF module attributes (num_heads, embed_dim) stale; the adapter
updates them. Where the dependency graph misses a layer that belongs to the unit (it does for
rotary-embedded LLaMA q/k, upstream issue #527), the missing layer is pruned directly with the
same indices, so removal stays exact.
"""
from __future__ import annotations

import torch_pruning as tp
from torch import nn

from mmprune.errors import MMPruneError
from mmprune.graph.model_graph import ModelGraph
from mmprune.graph.units import HeadGroup, UnitGroup


class SurgeryError(MMPruneError):
    pass


def _expected(graph: ModelGraph, group: UnitGroup) -> tuple[list[nn.Module], list[nn.Module]]:
    """(modules whose out-channels the unit owns, modules whose in-channels it owns)."""
    root = graph.adapter.module(group.site.path)
    if isinstance(group, HeadGroup):
        s = group.site
        return [root.get_submodule(s.q), root.get_submodule(s.k), root.get_submodule(s.v)], [root.get_submodule(s.o)]
    return [root.get_submodule(n) for n in group.site.fc_in], [root.get_submodule(group.site.fc_out)]


def remove_units(graph: ModelGraph, group: UnitGroup, positions: list[int]) -> None:
    """Remove the units at current `positions` of `group` from the model, physically."""
    positions = sorted(set(int(p) for p in positions))
    if not positions:
        return
    if positions[-1] >= group.size or positions[0] < 0:
        raise SurgeryError(f"{group.id}: unit positions {positions} outside 0..{group.size - 1}")
    if len(positions) >= group.size:
        raise SurgeryError(f"{group.id}: refusing to remove every unit of the module")
    outs, ins = _expected(graph, group)
    idxs = group.channels(positions)
    drop = set(positions)
    kept = [k for i, k in enumerate(group.kept) if i not in drop]
    if isinstance(group, HeadGroup) and group.site.fused_qkv:
        _remove_fused_heads(group, outs[0], ins[0], idxs)
    elif isinstance(group, HeadGroup) and group.site.num_kv_heads is not None:
        _remove_query_heads(group, outs, ins[0], idxs, kept)
    else:
        _remove_with_dependency_graph(graph, group, outs, ins, idxs)
    group.kept = kept
    if isinstance(group, HeadGroup):
        graph.adapter.set_heads(group.site, group.kept)
    else:
        graph.adapter.set_mlp_width(group.site, group.size)
    if group.id in graph.nx:
        graph.nx.nodes[group.id]["size"] = group.size


def _remove_fused_heads(group: HeadGroup, qkv: nn.Module, out: nn.Module, idxs: list[int]) -> None:
    """A fused [q; k; v] projection: the head's rows in each third, and its columns of the output.

    torch-pruning cannot see heads through the reshape/permute that splits a fused projection
    (it would treat the 3·H·d outputs as independent channels), so these two layers, the only
    ones a head owns, are cut directly with the indices each needs.
    """
    width = qkv.out_features // 3
    tp.prune_linear_out_channels(qkv, [part * width + i for part in range(3) for i in idxs])
    tp.prune_linear_in_channels(out, idxs)


def _remove_query_heads(group: HeadGroup, outs: list[nn.Module], out: nn.Module, idxs: list[int],
                        kept: list[int]) -> None:
    """Grouped-query attention: the query heads' rows of q and columns of o, and the rows of k and
    v of each key / value head whose last query head goes (comp.md §2).

    Cut directly: torch-pruning's dependency graph never finishes grouping q / k through the
    rotary half-rotation (upstream issue #527), and these four layers are all a head owns.
    """
    s = group.site
    q, k, v = outs
    tp.prune_linear_out_channels(q, idxs)
    tp.prune_linear_in_channels(out, idxs)
    before, after = s.kv_heads(group.kept), set(s.kv_heads(kept))
    gone = [i * s.head_dim + j for i, h in enumerate(before) if h not in after for j in range(s.head_dim)]
    if gone:
        tp.prune_linear_out_channels(k, gone)
        tp.prune_linear_out_channels(v, gone)


def _remove_with_dependency_graph(graph: ModelGraph, group: UnitGroup, outs: list[nn.Module],
                                  ins: list[nn.Module], idxs: list[int]) -> None:
    dg = graph.dependency_graph()
    pg = dg.get_pruning_group(outs[0], tp.prune_linear_out_channels, idxs=idxs)
    touched = {(dep.target.module, dep.handler.__name__ if hasattr(dep.handler, "__name__")
                else type(dep.handler).__name__) for dep, _ in pg}
    touched_modules = {m for m, _ in touched if isinstance(m, nn.Module)}
    allowed = set(outs) | set(ins)
    stray = [m for m in touched_modules
             if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm)) and m not in allowed]
    if stray:
        raise SurgeryError(f"{group.id}: torch-pruning couples modules outside the unit "
                           f"({', '.join(type(m).__name__ for m in stray)}); the adapter must "
                           "describe this architecture differently")
    pg.prune()
    # Layers the dependency graph did not reach are pruned directly with the same indices.
    for m in outs:
        if m not in touched_modules:
            tp.prune_linear_out_channels(m, idxs)
    for m in ins:
        if m not in touched_modules:
            tp.prune_linear_in_channels(m, idxs)


def keep_units(graph: ModelGraph, group: UnitGroup, original: list[int]) -> None:
    """Shrink `group` to the given original indices (used when rebuilding a saved structure)."""
    keep = set(original)
    missing = keep - set(group.kept)
    if missing:
        raise SurgeryError(f"{group.id}: cannot keep units {sorted(missing)} that were removed")
    remove_units(graph, group, [i for i, k in enumerate(group.kept) if k not in keep])
