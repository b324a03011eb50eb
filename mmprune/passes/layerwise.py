"""`prune_layerwise`: post-training unstructured / N:M pruning of every Linear inside the
transformer blocks, block by block (magnitude, Wanda or SparseGPT; ecoflap.md §4).

With `allocator: uniform` every block is pruned at `target` (plain Wanda / SparseGPT); with
`ecoflap_zo` / `ecoflap_fo` the blocks' sparsities come from ECoFLaP's global block scores
(§2), water-filled under one exact budget. Weights are zeroed in place: the model keeps its
shapes, and on this hardware it is no faster (the report says so).
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator, model_validator

from mmprune.context import Context
from mmprune.errors import MMPruneError
from mmprune.passes.base import FitSplit, Pass, PassParams, at_least_one
from mmprune.sparsity import allocate
from mmprune.sparsity.masks import attach_masks
from mmprune.sparsity.scores import (
    block_jvp_scores,
    first_order_scores,
    outlier_ratios,
    owl_sparsities,
    record_block_outputs,
    relative_standard_error,
    zeroth_order_scores,
)
from mmprune.sparsity.sequential import Block, block_weight_names, linear_layers, prune_sequential
from mmprune.sparsity.suffix import skipped_blocks


class LayerwiseParams(PassParams):
    target: float = Field(0.5, ge=0.0, lt=1.0, description="Share of the weights of every block's "
                          "Linear layers set to zero.")
    criterion: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "wanda", description="magnitude: |W| per output row; wanda: |W|·‖X_j‖ per output row; "
        "sparsegpt: Hessian-based selection with weight update.")
    pattern: str = Field("unstructured", description="'unstructured', or 'N:M' (N of every M "
                         "consecutive inputs zeroed; the target must equal N/M, e.g. 2:4 at 0.5).")
    towers: Annotated[Literal["all"] | list[str], at_least_one("tower")] = Field("all", description="Towers whose blocks are pruned "
                                               "(adapter tower names, e.g. vision, language).")
    allocator: Literal["uniform", "owl", "ecoflap_zo", "ecoflap_fast", "ecoflap_fo", "from_file"] = Field(
        "uniform", description="How the target is shared out over blocks: uniform (every block at "
        "the target: plain Wanda / SparseGPT), owl (outlier-weighted: blocks with more Wanda "
        "outliers pruned less), ecoflap_zo (ECoFLaP: zeroth-order block scores, "
        "two forwards per matrix, batch and direction), ecoflap_fast (ours: one direction over a "
        "whole block, exact directional derivative by forward-mode AD), ecoflap_fo (first-order: |w|·|∂L/∂w|), "
        "from_file (the ratios of an earlier run's sparsity.json, see sparsity_from).")
    sparsity_from: str | None = Field(None, description="from_file: path of a sparsity.json "
                                      "(block path -> sparsity) written by an earlier run.")
    max_sparsity: float | None = Field(None, gt=0.0, le=1.0, description="No block sparser than "
                                       "this (default target + 0.1).")
    budget_scope: Literal["joint", "per_tower"] = Field("joint", description="joint: one budget "
                                                        "over every pruned tower, so sparsity can "
                                                        "move between modalities; per_tower: each "
                                                        "tower meets the target on its own.")
    allocation_samples: int = Field(32, ge=1, description="Examples the block scores are computed on.")
    allocation_batch_size: int = Field(8, ge=2, description="Batch size of the block scores "
                                       "(contrastive losses need at least 2).")
    owl_m: float = Field(5.0, gt=0.0, description="owl: a score above M times its matrix's mean is an outlier.")
    owl_lambda: float = Field(0.08, ge=0.0, lt=1.0, description="owl: largest deviation of a block's "
                              "sparsity from the target.")
    zo_eps: float = Field(1e-3, gt=0.0, description="ecoflap_zo: perturbation size ε.")
    zo_directions: int = Field(1, ge=1, description="ecoflap_zo / ecoflap_fast: random directions "
                               "per batch and matrix (zo) or block (fast).")
    target_rel_se: float | None = Field(None, gt=0.0, description="ecoflap_fast: add directions "
                                        "to a block, one round over every batch at a time, until "
                                        "its score's standard error is at most this share of it "
                                        "(0.1 is the spec's suggestion; default off).")
    max_directions: int = Field(8, ge=1, description="ecoflap_fast with target_rel_se: most "
                                "directions per batch and block.")
    suffix_recompute: bool = Field(True, description="ecoflap_fast: a probe on a block re-runs "
                                   "only the blocks it can influence; the others replay outputs "
                                   "recorded once per batch (same scores, less work; §3.3).")
    calibration_samples: int = Field(128, ge=1, description="Examples whose activations calibrate "
                                     "Wanda / SparseGPT.")
    batch_size: int = Field(16, ge=1, description="Calibration batch size.")
    split: FitSplit = Field("train", description="Calibration split (never the test split).")
    sparsegpt_block_size: int = Field(128, ge=1, description="SparseGPT: columns per lazy-update block.")
    damp: float = Field(0.01, gt=0.0, description="SparseGPT: Hessian damping, relative to its mean diagonal.")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v != "unstructured":
            nm_ratio(v)   # raises on a malformed pattern
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if (self.allocator == "from_file") != (self.sparsity_from is not None):
            raise ValueError("sparsity_from goes with allocator: from_file, and from_file needs it")
        if self.pattern != "unstructured" and self.allocator != "uniform":
            raise ValueError(f"pattern {self.pattern} fixes every block's sparsity at N/M; use "
                             "allocator: uniform with it (or pattern: unstructured)")
        if self.pattern != "unstructured" and abs(nm_ratio(self.pattern) - self.target) > 1e-9:
            raise ValueError(f"pattern {self.pattern} zeroes {nm_ratio(self.pattern):g} of the "
                             f"weights, but target is {self.target:g}; set target to match")
        if self.max_sparsity is not None:
            if self.allocator not in ("ecoflap_zo", "ecoflap_fast", "ecoflap_fo"):
                raise ValueError(f"max_sparsity caps the ECoFLaP allocators; allocator "
                                 f"'{self.allocator}' does not use it")
            if self.max_sparsity < self.target:
                raise ValueError(f"max_sparsity ({self.max_sparsity:g}) is below the target "
                                 f"({self.target:g}): no allocation can meet the budget")
        if self.target_rel_se is not None and self.allocator != "ecoflap_fast":
            raise ValueError(f"target_rel_se adds directions to ecoflap_fast's block probes; "
                             f"allocator '{self.allocator}' does not use it")
        if self.allocator in ("ecoflap_zo", "ecoflap_fast", "ecoflap_fo") and \
                self.allocation_samples < self.allocation_batch_size:
            raise ValueError(f"allocation_samples ({self.allocation_samples}) is smaller than one "
                             f"batch (allocation_batch_size {self.allocation_batch_size})")
        return self


def nm_ratio(pattern: str) -> float:
    """N/M of an 'N:M' pattern string (0 < N < M)."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n / m


class PruneLayerwise(Pass):
    """Unstructured / N:M pruning of every block Linear, block by block (magnitude, Wanda, SparseGPT)."""

    name = "prune_layerwise"
    Params = LayerwiseParams
    calibrates = True
    requires = frozenset({"model", "data"})
    provides = frozenset({"pruned.sparse"})
    excludes = frozenset({"quantized"})

    def run(self, ctx: Context) -> None:
        p = self.params
        blocks = model_blocks(ctx, p.towers)
        pattern = None if p.pattern == "unstructured" else p.pattern
        batches = list(ctx.batches(p.split, p.batch_size, max_examples=p.calibration_samples,
                                   shuffle=True))
        ratios = self.allocate(ctx, blocks)
        masks = prune_sequential(
            ctx.model, blocks, batches, ctx.adapter.calibration_forward, lambda b: ratios[b.path],
            p.criterion, pattern, valid_of=lambda b, batch: ctx.adapter.token_mask(b.tower, batch),
            sparsegpt_block=p.sparsegpt_block_size, damp=p.damp,
            progress=lambda it, desc, n: ctx.progress(it, desc, total=n))
        attach_masks(ctx.model, masks)
        ctx.state["sparsity"] = {**sparsity_summary(ctx, blocks, masks), "allocator": p.allocator,
                                 "blocks": ratios}
        for key in _SCORE_KEYS:
            if key in ctx.state:
                ctx.state["sparsity"][key.removeprefix("block_")] = ctx.state[key]
        if ctx.run_dir is not None:
            (ctx.run_dir / "sparsity.json").write_text(json.dumps(ratios, indent=1) + "\n")
        s = ctx.state["sparsity"]
        ctx.log(f"prune_layerwise: {p.criterion} {p.pattern}, {s['prunable_sparsity']:.3f} of the "
                f"prunable weights zero ({s['total_sparsity']:.3f} of all parameters)")


    def allocate(self, ctx: Context, blocks: list[Block]) -> dict[str, float]:
        """Block path -> sparsity: the target everywhere, or ECoFLaP's scores water-filled under
        one exact budget (joint, or per tower)."""
        p = self.params
        for key in _SCORE_KEYS:
            ctx.state.pop(key, None)          # an earlier pass's, not this allocation's
        if p.allocator == "from_file":
            return _read_ratios(p.sparsity_from, blocks)
        if p.allocator == "uniform" or p.target == 0:
            return {b.path: p.target for b in blocks}
        groups = {b.path: block_weight_names(ctx.model, b.path) for b in blocks}
        batches = list(ctx.batches(p.split, p.allocation_batch_size, max_examples=p.allocation_samples,
                                   shuffle=True, seed=ctx.seed + 1, drop_last=True))
        if not batches:
            raise MMPruneError(f"prune_layerwise: split '{p.split}' has fewer than "
                               f"{p.allocation_batch_size} examples for the block scores")
        loss = lambda batch: _seeded_loss(ctx, batch)
        params = dict(ctx.model.named_parameters())
        sizes = {g: sum(params[n].numel() for n in names) for g, names in groups.items()}
        if p.allocator == "owl":
            return self._owl(ctx, blocks, sizes, batches)
        probes: dict[str, list[float]] = {}
        if p.allocator == "ecoflap_zo":
            scores = zeroth_order_scores(ctx.model, groups, loss, batches, p.zo_eps, p.zo_directions,
                                         ctx.seed, progress=lambda it, d, n: ctx.progress(it, d, total=n),
                                         probes=probes)
            passes = 2 * sum(len(n) for n in groups.values()) * len(batches) * p.zo_directions
        elif p.allocator == "ecoflap_fast":
            suffix = None
            if p.suffix_recompute:
                listed = ctx.adapter.layerwise_blocks()
                towers = dict.fromkeys(t for t, _ in listed)
                outputs = record_block_outputs(ctx.model, [q for _, q in listed], loss, batches)
                skip = skipped_blocks(listed, {t: ctx.adapter.downstream_towers(t) for t in towers})
                suffix = (outputs, skip)
            scores, estimator = block_jvp_scores(
                ctx.model, groups, loss, batches, p.zo_directions, ctx.seed,
                progress=lambda it, d, n: ctx.progress(it, d, total=n), suffix=suffix, probes=probes,
                target_rel_se=p.target_rel_se, max_directions=max(p.max_directions, p.zo_directions))
            ctx.state["block_score_estimator"] = estimator
            ctx.state["block_score_suffix_recompute"] = p.suffix_recompute
            per_probe = 1 if estimator == "jvp" else 2
            passes = per_probe * sum(map(len, probes.values())) + (len(batches) if suffix else 0)
        else:
            scores = first_order_scores(ctx.model, groups, loss, batches)
            passes = len(batches)     # forward + backward each
        ratios = {}
        for scope in self._scopes(blocks):
            a = allocate([sizes[b.path] for b in scope], [scores[b.path] for b in scope], p.target,
                         p.max_sparsity)
            ratios.update({b.path: s for b, s in zip(scope, a.sparsity)})
        ctx.state["block_scores"] = scores
        ctx.state["block_score_passes"] = passes
        if probes:    # §3.5: each score's standard error over its (batch, direction) terms
            rounds = len(batches) * p.zo_directions      # the score's scale (see block_jvp_scores)
            ctx.state["block_score_se"] = {g: _score_standard_error(t, rounds) for g, t in probes.items()}
        return ratios


    def _owl(self, ctx: Context, blocks: list[Block], sizes: dict[str, int], batches) -> dict[str, float]:
        p = self.params
        layers = {b.path: linear_layers(ctx.model.get_submodule(b.path)) for b in blocks}
        tower = {b.path: b for b in blocks}
        d = outlier_ratios(ctx.model, layers, ctx.adapter.calibration_forward, batches,
                           lambda g, batch: ctx.adapter.token_mask(tower[g].tower, batch), p.owl_m)
        ratios = {}
        for scope in self._scopes(blocks):
            try:
                s = owl_sparsities([d[b.path] for b in scope], [sizes[b.path] for b in scope],
                                   p.target, p.owl_lambda)
            except ValueError as e:
                raise MMPruneError(f"prune_layerwise: {e}") from None
            ratios.update({b.path: v for b, v in zip(scope, s)})
        ctx.state["block_scores"] = d
        return ratios

    def _scopes(self, blocks: list[Block]) -> list[list[Block]]:
        if self.params.budget_scope == "joint":
            return [blocks]
        return [[b for b in blocks if b.tower == t] for t in dict.fromkeys(b.tower for b in blocks)]


#: what an allocation leaves in ctx.state (and the Sparsity report section shows)
_SCORE_KEYS = ("block_scores", "block_score_se", "block_score_passes")


def _seeded_loss(ctx: Context, batch: dict) -> torch.Tensor:
    """The task loss with the global RNG reset to the run seed for each call: losses that sample
    (BLIP's hard ITM negatives) draw the same samples in every probe of a batch (common random
    numbers), so score differences are the perturbation's, not the sampler's."""
    with torch.random.fork_rng():
        torch.manual_seed(ctx.seed)
        return ctx.adapter.task_loss(batch, ctx.task).float()


def _score_standard_error(terms: list[float], scale: int) -> float | None:
    """Standard error of a score that is `scale` times the mean of its probe terms (None for a
    single term)."""
    rel = relative_standard_error(terms)
    return None if rel == float("inf") else rel * sum(terms) / len(terms) * scale


def _read_ratios(path: str, blocks: list[Block]) -> dict[str, float]:
    from pathlib import Path

    try:
        ratios = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MMPruneError(f"prune_layerwise: cannot read sparsity_from {path}: {e}") from None
    wanted = {b.path for b in blocks}
    if not isinstance(ratios, dict) or set(ratios) != wanted or not all(
            isinstance(v, (int, float)) and 0 <= v < 1 for v in ratios.values()):
        missing, extra = sorted(wanted - set(ratios or {})), sorted(set(ratios or {}) - wanted)
        raise MMPruneError(f"prune_layerwise: {path} must map every pruned block to a sparsity in "
                           f"[0, 1); missing {missing[:3]}, unknown {extra[:3]}")
    return {k: float(v) for k, v in ratios.items()}


def model_blocks(ctx: Context, towers: Literal["all"] | list[str]) -> list[Block]:
    """The adapter's transformer blocks, upstream towers first."""
    try:
        listed = ctx.adapter.layerwise_blocks()
    except MMPruneError as e:
        raise MMPruneError(f"prune_layerwise: {e}") from None
    names = list(dict.fromkeys(t for t, _ in listed))
    if towers != "all":
        unknown = sorted(set(towers) - set(names))
        if unknown:
            raise MMPruneError(f"prune_layerwise: unknown tower(s) {unknown}; this model has {names}.")
    counts: dict[str, int] = {}
    blocks = []
    for tower, path in listed:
        if towers == "all" or tower in towers:
            blocks.append(Block(tower, counts.get(tower, 0), path))
        counts[tower] = counts.get(tower, 0) + 1
    return blocks


def sparsity_summary(ctx: Context, blocks: list[Block], masks: dict[str, torch.Tensor]) -> dict:
    """Zero weights per tower and over the prunable set (what the target refers to), and over all
    parameters, counted from the weights themselves."""
    per_tower: dict[str, list[int]] = {}
    for b in blocks:
        for layer in linear_layers(ctx.model.get_submodule(b.path)).values():
            zero, total = per_tower.setdefault(b.tower, [0, 0]), layer.weight.numel()
            zero[0] += int((layer.weight == 0).sum())
            zero[1] += total
    zeros = sum(z for z, _ in per_tower.values())
    prunable = sum(t for _, t in per_tower.values())
    params = sum(p.numel() for p in ctx.model.parameters())
    return {"towers": {t: z / n for t, (z, n) in per_tower.items()},
            "prunable_sparsity": zeros / max(prunable, 1), "prunable_params": prunable,
            "total_sparsity": zeros / max(params, 1), "masked_weights": len(masks)}
