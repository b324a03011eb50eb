"""Resolve a recipe's `model:` reference to a loaded model and its adapter."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from mmprune.errors import ModelLoadError, did_you_mean
from mmprune.models.base import Adapter
from mmprune.models.processors import load_processors
from mmprune.plugins.manager import Registry
from mmprune.saved import Bundle, is_saved_model, load_bundle


def adapter_for(model_type: str, registry: Registry, architectures=None) -> type[Adapter]:
    """The adapter for a config; where several handle its model_type (BLIP's retrieval and VQA
    heads share one), the one whose model class the config's `architectures` names."""
    matches = [c for c in registry.models.values() if model_type in c.model_types]
    for cls in matches:
        if cls.model_class.__name__ in (architectures or ()):
            return cls
    if matches:
        return matches[0]
    known = sorted(t for c in registry.models.values() for t in c.model_types)
    raise ModelLoadError(f"no adapter handles model_type '{model_type}'. Supported: {', '.join(known)}.")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so an offline machine fails in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_error(what: str, location: str, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"{what} '{location}' is neither a local directory nor reachable on the model hub "
        f"({detail}). Download it where the hub is reachable (e.g. `huggingface-cli download "
        f"{location} --local-dir DIR`), then use `model: {{path: DIR}}`.")


def _from_pretrained(location: str, registry: Registry, attn: str, what: str):
    from transformers import AutoConfig

    if not Path(location).exists() and not _cached(location) and not hub_reachable():
        raise _offline_error(what, location, "this machine cannot reach the hub and has no cached copy")
    try:
        config = AutoConfig.from_pretrained(location)
    except OSError as exc:
        if not Path(location).exists():
            raise _offline_error(what, location, str(exc).splitlines()[0]) from None
        raise ModelLoadError(f"{what} '{location}' has no readable config.json: "
                             f"{str(exc).splitlines()[0]}") from None
    cls = adapter_for(config.model_type, registry, getattr(config, "architectures", None))
    if attn == "sdpa" and not getattr(cls.model_class, "_supports_sdpa", True):
        attn = "eager"   # BLIP has no SDPA path in transformers; asking for it is an error there
    try:  # safetensors only: a checkpoint that has nothing but pickled weights is refused
        model = cls.model_class.from_pretrained(location, attn_implementation=attn,
                                                use_safetensors=True).eval()
        processors = load_processors(location)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{what} '{location}' could not be loaded: "
                             f"{str(exc).strip().splitlines()[0]}") from None
    return cls(model, *processors)


def _cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # malformed ids and old hub versions: treat as not cached
        return False


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_model(spec, registry: Registry, seed: int, log=_stderr) -> tuple[Adapter, Bundle | None]:
    """The adapter around the model a ModelSpec names; a Bundle too when it is an mmprune export."""
    kind, value = spec.source
    if kind == "tiny":
        if value not in registry.models:
            raise ModelLoadError(f"no tiny model for family '{value}'." + did_you_mean(value, registry.models))
        cls = registry.models[value]
        try:
            model = cls.tiny_model(seed, spec.config)
        except Exception as exc:  # config validators raise several types across HF versions
            detail = str(exc).strip().splitlines()[-1].strip()
            raise ModelLoadError(f"tiny '{value}' model: the config overrides are invalid: {detail}") from None
        model.set_attn_implementation(spec.attn_implementation)
        return cls(model, *cls.default_processors(model)), None
    if kind == "zoo":
        from mmprune.zoo.build import build, is_built, stale_warning, zoo_dir
        if not is_built(value):
            log(f"zoo model '{value}' is not built yet: training it now (once; cached in {zoo_dir(value)})")
            build(value, log=log)
        elif stale := stale_warning(value):
            log(f"warning: {stale}")
        return _from_pretrained(str(zoo_dir(value)), registry, spec.attn_implementation, "zoo model"), None
    if kind == "path" and not os.path.isdir(value):
        raise ModelLoadError(f"model path '{value}' does not exist or is not a directory.")
    if kind in ("path", "hf") and os.path.isdir(value):
        if is_saved_model(value):
            bundle = load_bundle(value, registry)
            return bundle.adapter, bundle
        return _from_pretrained(value, registry, spec.attn_implementation, "model path"), None
    if kind == "hf":
        return _from_pretrained(value, registry, spec.attn_implementation, "model"), None
    raise ModelLoadError(f"unknown model source {kind!r}.")
