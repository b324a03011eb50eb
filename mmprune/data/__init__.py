"""Datasets through the `datasets` library: sources registered by plugins."""
from mmprune.data.base import SPLITS, DataParams, DatasetSource

__all__ = ["SPLITS", "DataParams", "DatasetSource"]
