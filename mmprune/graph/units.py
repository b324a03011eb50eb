"""Prunable units. A group holds the units of one module; a unit is one index inside it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mmprune.models.base import AttentionSite, MLPSite, TokenSiteSpec


@dataclass
class UnitGroup:
    """The units of one module. `kept` are the original indices still present."""

    site: AttentionSite | MLPSite
    total: int
    kept: list[int] = field(default_factory=list)
    kind: ClassVar[str]
    suffix: ClassVar[str]

    @property
    def id(self) -> str:
        return f"{self.site.tower}.{self.site.layer}.{self.suffix}"

    @property
    def tower(self) -> str:
        return self.site.tower

    @property
    def layer(self) -> int:
        return self.site.layer

    @property
    def size(self) -> int:
        return len(self.kept)

    def channels(self, units: list[int]) -> list[int]:
        """Current channel indices of the units at current positions `units`."""
        return list(units)


@dataclass
class HeadGroup(UnitGroup):
    """The attention heads of one module."""

    site: AttentionSite
    kind: ClassVar[str] = "head"
    suffix: ClassVar[str] = "attn"

    def channels(self, heads: list[int]) -> list[int]:
        """Whole heads only: every channel of each head, never part of one."""
        d = self.site.head_dim
        return [h * d + j for h in heads for j in range(d)]


@dataclass
class ChannelGroup(UnitGroup):
    """The hidden channels of one MLP."""

    site: MLPSite
    kind: ClassVar[str] = "channel"
    suffix: ClassVar[str] = "mlp"


@dataclass(frozen=True)
class TokenSite:
    """Where a tower's tokens may be dropped (after attention, before the MLP of `layer`)."""

    spec: TokenSiteSpec

    @property
    def id(self) -> str:
        return f"{self.spec.tower}.{self.spec.layer}.tokens"
