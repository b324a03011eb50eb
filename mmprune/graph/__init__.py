"""Tracing models into prunable structure: unit groups, token sites, dependency graph, costs."""
from mmprune.graph.cost import CostModel
from mmprune.graph.model_graph import ModelGraph, trace
from mmprune.graph.surgery import keep_units, remove_units
from mmprune.graph.units import ChannelGroup, HeadGroup, TokenSite

__all__ = ["CostModel", "ModelGraph", "trace", "keep_units", "remove_units",
           "ChannelGroup", "HeadGroup", "TokenSite"]
