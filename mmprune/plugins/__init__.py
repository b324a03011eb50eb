"""pluggy plugins: hook specifications, discovery by entry point, and the built-in plugin."""
from mmprune.plugins.hookspecs import hookimpl
from mmprune.plugins.manager import Registry, get_registry

__all__ = ["hookimpl", "Registry", "get_registry"]
