"""Build (train) zoo models into the cache, with a manifest of config, data, code and metrics."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mmprune.data.batching import iterate_batches
from mmprune.data.minivl.source import MiniVLParams, cache_root, code_hash, load_task
from mmprune.errors import MMPruneError, did_you_mean
from mmprune.zoo.catalog import CATALOG, ZooEntry
from mmprune.zoo.convert import convert
from mmprune.zoo.train import train

MANIFEST = "manifest.json"
_CODE_DIRS = ("zoo", "data/minivl", "models")


def zoo_code_hash() -> str:
    """Hash of the code a zoo model depends on: generator, trainer, adapters."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for d in _CODE_DIRS:
        for f in sorted((root / d).glob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def entry(name: str) -> ZooEntry:
    if name not in CATALOG:
        raise MMPruneError(f"unknown zoo model '{name}'." + did_you_mean(name, CATALOG))
    return CATALOG[name]


def zoo_dir(name: str) -> Path:
    return cache_root() / "zoo" / name


def is_built(name: str) -> bool:
    return (zoo_dir(name) / MANIFEST).exists()


def read_manifest(name: str) -> dict:
    return json.loads((zoo_dir(name) / MANIFEST).read_text())


def entry_record(e: ZooEntry) -> dict:
    """`e` as a build's manifest records it (JSON: tuples become lists)."""
    return json.loads(json.dumps(asdict(e)))


def stale_fields(name: str) -> list[str]:
    """Catalog fields of `name` (its description aside) that differ from those its cached build
    was trained with: the cache keeps a model until it is rebuilt, whatever the catalog says now."""
    built = read_manifest(name).get("entry", {})
    now = entry_record(entry(name))
    return [k for k, v in now.items() if k != "description" and built.get(k) != v]


def stale_warning(name: str) -> str | None:
    """What to tell a user about to use a stale build of `name`, or None when it is current."""
    fields = stale_fields(name)
    if not fields:
        return None
    return (f"zoo model '{name}' was built from an older catalog entry (it differs in "
            f"{', '.join(fields)}); `mmprune zoo build {name} --force` rebuilds it, and results "
            f"measured on it then change")


def evaluate_split(adapter, ds, task: str, batch_size: int = 128) -> dict[str, float]:
    with torch.inference_mode():
        return adapter.evaluate(iterate_batches(adapter, ds, batch_size), task)


def initialise(model, e: ZooEntry, log, sample: dict | None = None) -> dict:
    """Copy weights from the zoo model (or directory) `e.init_from`: `e.init_map` maps each target
    prefix to the source prefix it is copied from, after `e.init_convert` (if any) rewrote the
    parent's weights into this architecture's names.

    The way real VLMs start: LLaVA from a trained CLIP ViT, BLIP's VQA and NLVR models from the
    pre-trained BLIP. Every mapped source tensor must land on a same-shaped target.
    """
    from mmprune.plugins.manager import get_registry

    src = Path(e.init_from) if Path(e.init_from).is_dir() else build(e.init_from, log=log)
    blob = (src / "model.safetensors").read_bytes()
    # through from_pretrained, not the file: transformers may store other key names on disk
    parent = get_registry().models[json.loads((src / MANIFEST).read_text())["family"]]
    weights = parent.model_class.from_pretrained(src).state_dict()
    if e.init_convert:
        weights = convert(e.init_convert, weights, sample)
    target = model.state_dict()
    copied = {}
    for new, old in e.init_map.items():
        for key, value in weights.items():
            if key.startswith(old):
                dst = new + key[len(old):]
                if dst not in target or target[dst].shape != value.shape:
                    raise MMPruneError(f"zoo model '{e.name}': cannot initialise {dst} from "
                                       f"{src.name}:{key} (missing or another shape)")
                copied[dst] = value
    if not copied:
        raise MMPruneError(f"zoo model '{e.name}': nothing in {src} matches {e.init_map}")
    model.load_state_dict(copied, strict=False)
    return {"source": src.name, "sha256": hashlib.sha256(blob).hexdigest()[:16], "tensors": len(copied),
            "params": int(sum(v.numel() for v in copied.values()))}


def build(name: str, *, force: bool = False, progress: bool = True, log=print,
          override: dict | None = None, directory: Path | None = None) -> Path:
    """Train zoo model `name` into its cache directory (or `directory`) and return that directory.

    `override` replaces catalog fields (e.g. steps, data sizes) for reduced smoke builds.
    """
    from mmprune.plugins.manager import get_registry

    e = replace(entry(name), **(override or {}))
    out = directory or zoo_dir(name)
    if (out / MANIFEST).exists() and not force:
        return out
    cls = get_registry().models[e.family]
    data = load_task(MiniVLParams(task=e.task, **e.data))
    model = cls.tiny_model(0, e.config)
    adapter = cls(model, *cls.default_processors(model))
    if adapter.tokenizer is None:
        raise MMPruneError(f"zoo model '{name}': its config does not fit the MiniVL tokenizer.")
    if e.init_from:
        sample = next(iter(iterate_batches(adapter, data["train"], 256))) if e.init_convert else None
        initialised = initialise(model, e, log, sample)
    else:
        initialised = {}
    log(f"building zoo model {name}: {e.steps} steps of {e.batch_size} on MiniVL {e.task}")
    t0 = time.perf_counter()
    losses = train(adapter, data["train"], e.task, steps=e.steps, batch_size=e.batch_size, lr=e.lr,
                   warmup=e.warmup, weight_decay=e.weight_decay, progress=progress, freeze=e.freeze)
    seconds = time.perf_counter() - t0
    metrics = {s: evaluate_split(adapter, data[s], e.task) for s in ("validation", "test")}
    window = max(1, min(50, len(losses) // 4))  # mean loss over the first and last quarter (<= 50 steps)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    adapter.tokenizer.save_pretrained(tmp)
    adapter.image_processor.save_pretrained(tmp)
    manifest = {
        "name": name, "family": e.family, "task": e.task, "entry": entry_record(e),
        "data": MiniVLParams(task=e.task, **e.data).model_dump(),
        "code_hash": zoo_code_hash(), "data_code_hash": code_hash(),
        "params": sum(p.numel() for p in model.parameters()),
        "initialised_from": initialised,
        "train_seconds": round(seconds, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "loss_window": window,
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "loss_curve": [round(sum(losses[i:i + 50]) / len(losses[i:i + 50]), 4)
                       for i in range(0, len(losses), 50)],
        "metrics": metrics,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"built {name} in {seconds:.0f}s: test {json.dumps(metrics['test'])}")
    return out



