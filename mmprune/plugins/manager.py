"""Plugin discovery and the registry of passes, model adapters and dataset sources.

Plugins are modules (or objects) implementing the hooks in `hookspecs`. They are found through
entry points of group `mmprune`; the built-in plugin is registered the same way. A plugin that
fails to import is reported by name and skipped, unless `strict` asks for it to be fatal.
Registration itself is strict: a malformed class or a duplicate name is always an error.
"""
from __future__ import annotations

import importlib.metadata as md
import traceback
from dataclasses import dataclass, field
from functools import lru_cache

import pluggy

from mmprune.errors import PluginError
from mmprune.plugins import hookspecs
from mmprune.plugins.hookspecs import PROJECT

ENTRY_POINT_GROUP = PROJECT


@dataclass(frozen=True)
class PluginFailure:
    name: str
    target: str
    error: str


@dataclass
class Registry:
    passes: dict[str, type] = field(default_factory=dict)
    models: dict[str, type] = field(default_factory=dict)
    datasets: dict[str, type] = field(default_factory=dict)
    origin: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin
    plugins: list[str] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)


def _checks():
    from mmprune.data.base import check_dataset_class
    from mmprune.models.base import check_adapter_class
    from mmprune.passes.base import check_pass_class
    return {"passes": check_pass_class, "models": check_adapter_class, "datasets": check_dataset_class}


def build_registry(pm: pluggy.PluginManager, failures: list[PluginFailure]) -> Registry:
    reg = Registry(failures=list(failures))
    reg.plugins = [pm.get_name(p) or repr(p) for p in pm.get_plugins()]
    checks = _checks()
    for kind, hook in (("passes", pm.hook.mmprune_passes), ("models", pm.hook.mmprune_models),
                       ("datasets", pm.hook.mmprune_datasets)):
        table = getattr(reg, kind)
        for impl in hook.get_hookimpls():
            plugin = impl.plugin_name
            classes = impl.function() or []
            for cls in classes:
                problems = checks[kind](cls)
                if problems:
                    raise PluginError(f"plugin '{plugin}' registers an invalid entry in {kind}: "
                                      + "; ".join(problems))
                if cls.name in table and table[cls.name] is not cls:
                    raise PluginError(f"plugin '{plugin}' registers {kind[:-1]} '{cls.name}', "
                                      f"already registered by plugin '{reg.origin[(kind, cls.name)]}'. "
                                      "Rename one of them.")
                table[cls.name] = cls
                reg.origin[(kind, cls.name)] = plugin
    return reg


def make_plugin_manager(*, strict: bool = False, extra: tuple = ()) -> tuple[pluggy.PluginManager,
                                                                           list[PluginFailure]]:
    """A plugin manager with the built-in plugin, every `mmprune` entry point, and `extra` objects."""
    from mmprune.plugins import builtin

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="builtin")
    failures: list[PluginFailure] = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value == builtin.__name__ or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the tool
            if strict:
                raise PluginError(f"plugin '{ep.name}' ({ep.value}) failed to import: "
                                  f"{type(exc).__name__}: {exc}") from exc
            failures.append(PluginFailure(ep.name, ep.value,
                                          "".join(traceback.format_exception_only(exc)).strip()))
            continue
        pm.register(plugin, name=ep.name)
    for obj in extra:
        pm.register(obj)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin implements an unknown hook: {exc}") from exc
    return pm, failures


@lru_cache(maxsize=4)
def get_registry(strict: bool = False) -> Registry:
    """The process-wide registry (entry points are scanned once per strictness)."""
    pm, failures = make_plugin_manager(strict=strict)
    return build_registry(pm, failures)
