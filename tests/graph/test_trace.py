"""Golden-graph test: the traced structure of the tiny CLIP, node for node and edge for edge."""
from __future__ import annotations

import json
from pathlib import Path

import networkx as nx

from mmprune.graph import trace

GOLDEN = Path(__file__).parent / "golden" / "clip_tiny.json"


def describe(graph) -> dict:
    return {"nodes": {n: graph.nx.nodes[n] for n in sorted(graph.nx.nodes)},
            "edges": sorted([list(e) for e in graph.nx.edges])}


def test_traced_clip_matches_golden_graph(adapter):
    g = trace(adapter)
    assert describe(g) == json.loads(GOLDEN.read_text())


def test_graph_is_one_chain_per_tower(adapter):
    g = trace(adapter)
    for tower in g.towers:
        sub = g.nx.subgraph([n for n, d in g.nx.nodes(data=True) if d["tower"] == tower])
        assert nx.is_directed_acyclic_graph(sub)
        order = list(nx.topological_sort(sub))
        assert order[0] == f"{tower}.0.attn" and order[-1] == f"{tower}.1.mlp"
        assert order[1] == f"{tower}.0.tokens"  # tokens are dropped after attention, before the MLP


def test_units_are_tagged_by_tower_and_kind(adapter):
    g = trace(adapter)
    assert {(x.tower, x.kind) for x in g.groups.values()} == {
        ("vision", "head"), ("vision", "channel"), ("language", "head"), ("language", "channel")}
    assert [len(g.select(tower="vision", kind="head")), len(g.select(kind="channel"))] == [2, 4]
