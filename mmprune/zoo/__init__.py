"""The MiniVL model zoo: `mmprune zoo list`, `mmprune zoo build [NAME]`, recipes' `{zoo: NAME}`."""
from mmprune.zoo.catalog import CATALOG, ZooEntry

__all__ = ["CATALOG", "ZooEntry"]
