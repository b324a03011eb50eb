"""The model adapter contract: all per-architecture knowledge lives behind it.

Everything else in mmprune (graph, cost model, passes) is written once against this description:
where the towers, attention and MLP modules are, which tokens are protected, how to compute the
task loss and the task metrics, and how to fix module attributes after structure is removed.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmprune.errors import MMPruneError
from mmprune.runtime.blocks import ManagedTowerSpec


@dataclass(frozen=True)
class AttentionSite:
    """One multi-head attention module: its heads are pruned as whole units."""

    tower: str
    layer: int
    path: str            # module path of the attention module
    q: str               # paths of the projections, relative to `path`
    k: str
    v: str
    o: str
    num_heads: int
    head_dim: int
    #: q, k and v name one Linear whose output stacks [q; k; v] (BLIP's vision `qkv`)
    fused_qkv: bool = False
    #: width of the states keys and values are computed from, when not the tower's (cross-attention)
    kv_hidden_size: int | None = None
    #: grouped-query attention: key / value heads, each shared by num_heads / num_kv_heads
    #: consecutive query heads (None: one per query head). The units are the query heads.
    num_kv_heads: int | None = None

    def kv_head_of(self, head: int) -> int:
        """The original key / value head original query head `head` reads (grouped-query)."""
        return head // (self.num_heads // self.num_kv_heads)

    def kv_heads(self, kept: list[int]) -> list[int]:
        """Original key / value heads still read by the original query heads `kept`."""
        return sorted({self.kv_head_of(h) for h in kept})


@dataclass(frozen=True)
class MLPSite:
    """One feed-forward module: its hidden channels are pruned as units."""

    tower: str
    layer: int
    path: str
    fc_in: tuple[str, ...]   # Linear(s) producing the hidden channels (out-channel pruned)
    fc_out: str              # Linear consuming them (in-channel pruned)
    width: int


@dataclass(frozen=True)
class TowerSpec:
    """Per-tower facts the cost model needs beyond its blocks."""

    name: str
    hidden_size: int
    extra_flops: float       # per-example FLOPs outside the blocks (patch embedding, projections)


@dataclass(frozen=True)
class TokenSiteSpec:
    """A place where a tower's tokens could be pruned (BLOCK_MID of a layer) and what is protected."""

    tower: str
    layer: int
    protected: tuple[str, ...]


class Adapter:
    """Knows one model family. Subclasses set `name`, `model_types`, `model_class`, `tasks`."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[type[nn.Module]]
    tasks: ClassVar[tuple[str, ...]] = ()
    #: The metric the report leads with, per task.
    headline_metric: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module, tokenizer: Any = None, image_processor: Any = None):
        self.model = model
        self.tokenizer = tokenizer            # HF tokenizer for raw text (None: pre-tokenized data)
        self.image_processor = image_processor  # HF image processor for raw images

    # ---- construction
    @classmethod
    def tiny_model(cls, seed: int, overrides: dict | None = None) -> nn.Module:
        """A small randomly initialised model of this family, built from a config (no download)."""
        raise NotImplementedError(f"{cls.__name__} has no tiny model")

    @classmethod
    def default_processors(cls, model: nn.Module) -> tuple[Any, Any]:
        """(tokenizer, image processor) for a model that ships none (tiny models): MiniVL's."""
        return None, None

    # ---- structure
    def _undescribed(self, what: str) -> MMPruneError:
        return MMPruneError(f"the '{self.name}' adapter does not describe its {what} yet, so mmprune "
                            "cannot trace, measure or prune this model; it can train and evaluate it.")

    def attention_sites(self) -> list[AttentionSite]:
        raise self._undescribed("attention modules")

    def mlp_sites(self) -> list[MLPSite]:
        raise self._undescribed("MLP modules")

    def token_sites(self) -> list[TokenSiteSpec]:
        return []

    def towers(self) -> list[TowerSpec]:
        raise self._undescribed("towers")

    def managed_towers(self) -> list[ManagedTowerSpec]:
        """Towers the token-pruning runtime can run block by block (CoMP, token pruning)."""
        raise self._undescribed("blocks for token pruning")

    def decoder_layers(self) -> int:
        """Layers of the decoder LLM that image-token sites sit between (LLaVA-style models)."""
        raise MMPruneError(f"the '{self.name}' adapter has no decoder LLM: token sites between "
                           "decoder layers need a LLaVA-style model")

    def decoder_token_pruner(self, sites: list, position: str, probe: str):
        """A `DecoderTokenPruner` for image-token sites between decoder-LLM layers."""
        self.decoder_layers()
        raise NotImplementedError

    def layerwise_blocks(self) -> list[tuple[str, str]]:
        """(tower, module path) of every transformer block whose Linear weights layer-wise pruning
        may zero, upstream towers first: by default the blocks of `managed_towers`."""
        out = []
        for spec in self.managed_towers():
            layers = getattr(self.model.get_submodule(spec.encoder), spec.layers)
            out += [(spec.tower, f"{spec.encoder}.{spec.layers}.{i}") for i in range(len(layers))]
        return out

    def downstream_towers(self, tower: str) -> set[str]:
        """Towers whose blocks read `tower`'s outputs, directly or not, in the forward that
        block scores probe; suffix recomputation replays every other tower's blocks, so a
        missing tower here makes block scores wrong. Default: every tower listed after it in
        `layerwise_blocks`, which is right when towers are listed in data-flow order (a tower
        never reads one listed after it); adapters whose towers run side by side narrow it."""
        order = list(dict.fromkeys(t for t, _ in self.layerwise_blocks()))
        return set(order[order.index(tower) + 1:]) if tower in order else set()

    def token_mask(self, tower: str, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Which tokens of `tower`'s blocks are real on `batch` [B, N] (None: all), so that
        calibration statistics leave padding out: vision tokens are all real, text towers read
        the batch's attention mask."""
        mask = None if tower == "vision" else batch.get("attention_mask")
        return None if mask is None else mask.bool()

    def calibration_forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """The forward layer-wise calibration runs: it must call every block of
        `layerwise_blocks` on the batch's real inputs (default: the inference forward)."""
        return self.forward(batch)

    def example_inputs(self, batch_size: int = 2) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_num_heads(self, site: AttentionSite, num_heads: int) -> None:
        """Update module attributes after heads were removed physically."""
        raise NotImplementedError

    def set_heads(self, site: AttentionSite, kept: list[int]) -> None:
        """Update module attributes after heads were removed physically; `kept` are the original
        indices of the heads left (grouped-query attention needs which, not only how many)."""
        self.set_num_heads(site, len(kept))

    def set_mlp_width(self, site: MLPSite, width: int) -> None:
        """Update module attributes after MLP channels were removed physically."""

    # ---- data and task
    def input_spec(self) -> dict[str, Any]:
        """Shapes and vocabulary the data must match (image size, vocab size, text length)."""
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tokens_per_example(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tokens each example sends through each tower, [B] per tower (padding not counted)."""
        raise NotImplementedError

    def task_loss(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], task: str) -> dict[str, float]:
        raise NotImplementedError

    def distill_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B, C] a pruned model is distilled on from its dense teacher (softmax over C)."""
        raise self._undescribed("logits for distillation")

    def generate_tokens(self, batch: dict[str, torch.Tensor], n: int) -> Any:
        """Generate exactly `n` tokens for `batch` (greedy, with the KV cache), for adapters
        whose task is answered by a decoder; None means the family does not generate."""
        return None

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """The inference forward whose latency is reported."""
        return self.model(**batch)

    def prefill(self, batch: dict[str, torch.Tensor]) -> Any:
        """The part of `forward` whose token counts the cost model prices (comp.md §6): all of
        it, except for generating models, where it is the prompt's one forward."""
        return self.forward(batch)

    # ---- helpers
    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)


def check_adapter_class(cls: object) -> list[str]:
    if not isinstance(cls, type) or not issubclass(cls, Adapter):
        return [f"{cls!r} is not a subclass of mmprune.models.base.Adapter"]
    problems = []
    if not isinstance(getattr(cls, "name", None), str):
        problems.append(f"{cls.__qualname__}.name must be a string")
    if not cls.model_types:
        problems.append(f"{cls.__qualname__}.model_types must list the HF model_type values it handles")
    if not isinstance(getattr(cls, "model_class", None), type):
        problems.append(f"{cls.__qualname__}.model_class must be the transformers model class")
    return problems
