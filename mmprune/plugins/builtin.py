"""The built-in plugin: mmprune's own passes, adapters and datasets, registered like any plugin's."""
from __future__ import annotations

from mmprune.plugins.hookspecs import hookimpl


@hookimpl
def mmprune_passes() -> list[type]:
    from mmprune.passes.comp import Comp
    from mmprune.passes.evaluate import Evaluate
    from mmprune.passes.finetune import Finetune
    from mmprune.passes.layerwise import PruneLayerwise
    from mmprune.passes.export import Export
    from mmprune.passes.quantize import Quantize
    from mmprune.passes.scoring import ScoreMagnitude, ScoreTaylor
    from mmprune.passes.structured import PruneStructured
    from mmprune.passes.tokens import TokenPrune

    return [ScoreMagnitude, ScoreTaylor, PruneStructured, PruneLayerwise, Comp, TokenPrune, Finetune,
            Quantize, Evaluate, Export]


@hookimpl
def mmprune_models() -> list[type]:
    from mmprune.models.clip import CLIPAdapter
    from mmprune.models.blip import BlipRetrievalAdapter, BlipVQAAdapter
    from mmprune.models.llava import LlavaAdapter
    from mmprune.models.siglip import SiglipAdapter

    return [CLIPAdapter, SiglipAdapter, BlipRetrievalAdapter, BlipVQAAdapter,
            LlavaAdapter]


@hookimpl
def mmprune_datasets() -> list[type]:
    from mmprune.data.minivl.source import MiniVLSource
    from mmprune.data.synthetic import SyntheticSource

    return [MiniVLSource, SyntheticSource]
