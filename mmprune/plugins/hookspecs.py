"""The three hooks of mmprune. Each returns classes to register; nothing else is extensible by hook."""
from __future__ import annotations

import pluggy

PROJECT = "mmprune"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mmprune_passes() -> list[type]:
    """Return Pass subclasses to register by their `name`."""


@hookspec
def mmprune_models() -> list[type]:
    """Return model Adapter subclasses to register by their `name`."""


@hookspec
def mmprune_datasets() -> list[type]:
    """Return DatasetSource subclasses to register by their `name`."""
