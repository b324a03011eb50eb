"""The saved-model format: safetensors weights + HF config + `mmprune.json` structure spec.

HF configs cannot express per-layer widths, so `mmprune.json` records, per unit group, which
original heads / channels are kept, the token-pruning policy (thresholds per tower and the
blocks they act at, reinstalled as a TokenRuntime on load) and the quantization. `load(dir)`
rebuilds the model from the config, re-applies that structure, quantizes the same layers and loads
the weights. Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmprune import quant
from mmprune.errors import ModelLoadError
from mmprune.graph import ModelGraph, keep_units, trace
from mmprune.models.base import Adapter
from mmprune.models.processors import load_processors, save_processors
from mmprune.runtime.runtime import TokenRuntime, runtime_of
from mmprune.sparsity import masks as sparse

SPEC_FILE = "mmprune.json"
WEIGHTS_FILE = "model.safetensors"
MASKS_FILE = "sparsity_masks.safetensors"
FORMAT_VERSION = 3
#: versions this mmprune reads: 2 added decoder token sites (token_policy.decoder), 3 what a
#: tower's sites rank tokens by (token_policy.towers.*.score; before it, attention)
READABLE_VERSIONS = (1, 2, 3)


@dataclass
class Bundle:
    """A loaded model with its adapter, traced graph and the spec it was saved with."""

    adapter: Adapter
    graph: ModelGraph
    spec: dict[str, Any]

    @property
    def model(self) -> nn.Module:
        return self.adapter.model


def save(directory: str | Path, adapter: Adapter, graph: ModelGraph,
         token_policy: dict | None = None) -> Path:
    """Write `adapter.model` with its structure to `directory`, atomically.

    Everything is written to a sibling temporary directory first and swapped in at the end, so an
    interrupted export never leaves an old mmprune.json beside new or partial weights.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    directory = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    model = adapter.model
    qnames = quant.quantized_names(model)
    runtime = runtime_of(model)
    if token_policy is None and runtime is not None and runtime.active:
        token_policy = runtime.policy()
    spec = {
        "format": "mmprune", "version": FORMAT_VERSION,
        "adapter": adapter.name, "model_class": type(model).__name__,
        "attn_implementation": model.config._attn_implementation,
        "structure": graph.structure(),
        "tokens_per_example": graph.cost.tokens,
        "token_policy": token_policy,
        "quantization": {"scheme": quant.SCHEME, "modules": qnames} if qnames else None,
    }
    # sparsity masks of weights still stored as float (a quantized module packs its own)
    floats = dict(model.named_parameters())
    masks = {k: m for k, m in sparse.masks_of(model).items() if k in floats}
    if masks:
        save_file(sparse.pack(masks), str(directory / MASKS_FILE), metadata={"format": "pt"})
        spec["sparsity"] = {"masks_file": MASKS_FILE, **sparse.summary(masks),
                            "shapes": {k: list(m.shape) for k, m in masks.items()}}
    model.config.save_pretrained(directory)
    save_processors(adapter, directory)
    save_file(quant.state_tensors(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(directory, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_saved_model(directory: str | Path) -> bool:
    return (Path(directory) / SPEC_FILE).is_file()


# Out of inference mode even when called in it (`with torch.inference_mode(): mmprune.load(...)`):
# the pruned structure is rebuilt by tracing the dense model with autograd, which inference mode
# turns off, and parameters made in it could never be fine-tuned.
@torch.inference_mode(False)
def load_bundle(directory: str | Path, registry=None) -> Bundle:
    from mmprune.plugins.manager import get_registry

    directory = Path(directory)
    if not is_saved_model(directory):
        raise ModelLoadError(f"{directory} is not an mmprune export: {SPEC_FILE} is missing.")
    try:
        spec = json.loads((directory / SPEC_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{directory / SPEC_FILE} is not valid JSON ({exc}).") from None
    if spec.get("format") != "mmprune" or spec.get("version") not in READABLE_VERSIONS:
        raise ModelLoadError(f"{directory / SPEC_FILE}: unsupported format {spec.get('format')!r} "
                             f"version {spec.get('version')!r} (this mmprune reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}).")
    registry = registry or get_registry()
    if spec["adapter"] not in registry.models:
        raise ModelLoadError(f"{directory}: saved with adapter '{spec['adapter']}', which no installed "
                             f"plugin provides (installed: {', '.join(sorted(registry.models))}).")
    cls = registry.models[spec["adapter"]]
    config = cls.model_class.config_class.from_pretrained(directory)
    config._attn_implementation = spec.get("attn_implementation", "sdpa")
    model = cls.model_class(config).eval()
    adapter = cls(model, *load_processors(directory))
    graph = trace(adapter, tokens=spec.get("tokens_per_example"))
    for gid, entry in spec["structure"].items():
        if gid not in graph.groups:
            raise ModelLoadError(f"{directory / SPEC_FILE}: unit group '{gid}' does not exist in the model.")
        group = graph.groups[gid]
        if entry["total"] != group.total:
            raise ModelLoadError(f"{directory / SPEC_FILE}: '{gid}' has {group.total} units in the "
                                 f"config but the spec says {entry['total']}.")
        keep_units(graph, group, entry["kept"])
    if spec.get("token_policy"):
        runtime = TokenRuntime.attach(graph)
        runtime.apply_policy(spec["token_policy"])
        runtime.release_idle()
    qnames = spec["quantization"]["modules"] if spec.get("quantization") else []
    try:
        quant.load_state_tensors(model, load_file(str(directory / WEIGHTS_FILE)), qnames)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{directory / WEIGHTS_FILE} does not match {SPEC_FILE}: {exc}") from None
    if spec.get("sparsity"):
        _restore_masks(directory, model, spec["sparsity"])
    model.eval()
    return Bundle(adapter, graph, spec)


def _restore_masks(directory: Path, model: nn.Module, info: dict) -> None:
    """Reattach the saved sparsity masks, after checking the weights are zero where they say."""
    try:
        masks = sparse.unpack(load_file(str(directory / info["masks_file"])), info["shapes"])
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{directory / MASKS_FILE}: cannot read the sparsity masks ({exc}).") from None
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in params or params[name].shape != m.shape:
            raise ModelLoadError(f"{directory / MASKS_FILE}: mask '{name}' does not fit the model.")
        if bool((params[name].detach()[~m] != 0).any()):
            raise ModelLoadError(f"{directory / MASKS_FILE}: weight '{name}' is non-zero where its "
                                 "mask says it was pruned; the weights and masks do not belong together.")
    sparse.attach_masks(model, masks)


def load(directory: str | Path) -> nn.Module:
    """Rebuild a runnable model from an mmprune export directory (no pickles are loaded)."""
    return load_bundle(directory).model
