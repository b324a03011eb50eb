"""Prunable units. A group holds the units of one module; a unit is one index inside it."""
from __future__ import annotations

from dataclasses import dataclass, field

from mmprune.models.base import AttentionSite, MLPSite, TokenSiteSpec


@dataclass
class HeadGroup:
    """The attention heads of one module. `kept` are original head indices still present."""

    site: AttentionSite
    total: int
    kept: list[int] = field(default_factory=list)
    kind = "head"

    @property
    def id(self) -> str:
        return f"{self.site.tower}.{self.site.layer}.attn"

    @property
    def tower(self) -> str:
        return self.site.tower

    @property
    def layer(self) -> int:
        return self.site.layer

    @property
    def size(self) -> int:
        return len(self.kept)

    def channels(self, heads: list[int]) -> list[int]:
        """Current channel indices of current head positions `heads` (whole heads, never split)."""
        d = self.site.head_dim
        return [h * d + j for h in heads for j in range(d)]


@dataclass
class ChannelGroup:
    """The hidden channels of one MLP. `kept` are original channel indices still present."""

    site: MLPSite
    total: int
    kept: list[int] = field(default_factory=list)
    kind = "channel"

    @property
    def id(self) -> str:
        return f"{self.site.tower}.{self.site.layer}.mlp"

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
        return list(units)


@dataclass(frozen=True)
class TokenSite:
    """Where a tower's tokens may be dropped (after attention, before the MLP of `layer`)."""

    spec: TokenSiteSpec

    @property
    def id(self) -> str:
        return f"{self.spec.tower}.{self.spec.layer}.tokens"


UnitGroup = HeadGroup | ChannelGroup
