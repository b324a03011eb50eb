"""Can a ViT of this size learn MiniVL's attributes at all? Supervised per-cell training, then probes.

    .venv/bin/python benchmarks/vit_learnability.py [--steps 1500] [--patch-size 8] [--image-size 64]

`vision_probe.py` showed that no zoo tower encodes shape or a digit's value. This asks whether
that is the contrastive objective (feature suppression) or the tower: a CLIP vision tower of the
zoo's size is trained from scratch, with a linear head on its pooled state, to name what is in
each cell of the 3 x 3 grid (shape, colour, size of scene objects; the value of handwritten
digits), with labels, the most direct supervision there is. Train scenes only (the splits'
hashing), digits from the train pool. Prints the per-attribute loss during training, then
`vision_probe`'s probes on the trained tower, shape also per object size. Appends a row to
benchmarks/results/vit_learnability.json. About 9 minutes at the defaults.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import vision_probe as vp

from mmprune.data.minivl.scenes import (
    COLORS,
    INK,
    JITTER,
    RADIUS,
    SHAPES,
    SIZES,
    digit_image,
    render,
    sample_scene,
)
from mmprune.data.minivl.tasks import _digit_pools, signature, split_of
from mmprune.plugins.manager import get_registry
from mmprune.zoo.catalog import CATALOG

RESULTS = Path(__file__).parent / "results" / "vit_learnability.json"
#: classes per cell: shape, colour, size (each with "nothing here"), digit value (likewise)
GROUPS = {"shape": len(SHAPES) + 1, "colour": len(COLORS) + 1, "size": len(SIZES) + 1, "digit": 11}
IGNORE = -100


def labelled_scenes(n: int, size: int, rng: np.random.Generator) -> tuple[list, np.ndarray]:
    images, labels = [], []
    while len(images) < n:
        scene = sample_scene(rng)
        if split_of(signature(scene)) != "train":
            continue
        y = np.full((9, 4), IGNORE)
        y[:, :3] = 0
        for o in scene.objects:
            y[o.cell, :3] = (1 + SHAPES.index(o.shape), 1 + list(COLORS).index(o.color),
                             1 + SIZES.index(o.size))
        images.append(render(scene, size))
        labels.append(y)
    return images, np.stack(labels)


def labelled_digits(n: int, size: int, rng: np.random.Generator) -> tuple[list, np.ndarray]:
    glyphs, targets, pools = _digit_pools()
    images, labels = [], []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        cells, picks = rng.choice(9, k, replace=False), rng.choice(pools["train"], k, replace=False)
        images.append(digit_image([glyphs[p] for p in picks], cells, size, rng))
        y = np.full((9, 4), IGNORE)
        y[:, 3] = 0
        y[cells, 3] = 1 + targets[picks]
        labels.append(y)
    return images, np.stack(labels)


def scratch_clip(**vision: int):
    """The adapter of a freshly initialised model of `clip-minivl`'s architecture, with
    `vision` overriding its vision config (image_size, patch_size)."""
    cls = get_registry().models["clip"]
    config = copy.deepcopy(CATALOG["clip-minivl"].config)
    config["vision_config"].update(vision)
    model = cls.tiny_model(0, config)
    return cls(model, *cls.default_processors(model))


def fit(tower, head, x: torch.Tensor, y: torch.Tensor, loss, steps: int, lr: float = 1e-3,
        warmup: int = 100, every: int = 100, batch: int = 64) -> list[tuple[int, list[float]]]:
    """Train `tower` and the linear `head` on its pooled state: AdamW, linear warm-up then a
    cosine decay, seeded batches. `loss(logits, targets)` returns a 1-D tensor of loss parts,
    summed for the step; returns each window of `every` steps' mean parts."""
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=lr,
                            weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(0)
    tower.train()
    curve, window = [], []
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        parts = loss(head(tower(pixel_values=x[idx]).pooler_output), y[idx])
        opt.zero_grad()
        parts.sum().backward()
        opt.step()
        sched.step()
        window.append(parts.tolist())
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append((step + 1, [round(float(v), 3) for v in np.mean(window, 0)]))
            print(f"step {step + 1}: loss {curve[-1][1]}", flush=True)
            window = []
    tower.eval()
    return curve


def cell_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per attribute group over the 9 cells; cells without the attribute ignored."""
    out = logits.view(len(logits), 9, -1).split(list(GROUPS.values()), -1)
    return torch.stack([F.cross_entropy(o.reshape(-1, k), target[..., j].reshape(-1),
                                        ignore_index=IGNORE)
                        for j, (o, k) in enumerate(zip(out, GROUPS.values()))])


def probes(adapter, size: int) -> dict[str, float]:
    sets = {"objects": vp.object_scenes(size=size), "digits": vp.digit_scenes(size=size)}
    out = {}
    for s, (images, labels) in sets.items():
        feats = vp.tower_features(adapter, images)
        for kind, f in feats.items():
            out.update({f"{kind}.{s}.{a}": vp.probe(f, v) for a, v in labels.items()})
            if s == "objects":   # shape per object size: small objects span one or two patches
                for size_name in SIZES:
                    keep = np.array([z == size_name for z in labels["size"]])
                    out[f"{kind}.objects.shape_{size_name}"] = probe_subset(f, labels["shape"], keep)
    return out


def probe_subset(features: np.ndarray, labels: list, keep: np.ndarray) -> float:
    idx = np.flatnonzero(keep)
    train, test = idx[idx < vp.N_TRAIN], idx[idx >= vp.N_TRAIN]
    order = np.concatenate([train, test])
    return vp.probe(features[order], [labels[i] for i in order], len(train))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--scenes", type=int, default=16000, help="labelled object scenes")
    ap.add_argument("--digit-scenes", type=int, default=8000, help="labelled digit scenes")
    a = ap.parse_args()
    torch.manual_seed(0)
    adapter = scratch_clip(image_size=a.image_size, patch_size=a.patch_size)
    rng = np.random.default_rng(123)
    t0 = time.perf_counter()
    scenes, y_scenes = labelled_scenes(a.scenes, a.image_size, rng)
    digits, y_digits = labelled_digits(a.digit_scenes, a.image_size, rng)
    images = scenes + digits
    x = torch.cat([adapter.image_processor(images[i:i + 1000], return_tensors="pt")["pixel_values"]
                   for i in range(0, len(images), 1000)])
    y = torch.as_tensor(np.concatenate([y_scenes, y_digits]))
    print(f"{len(images)} labelled images in {time.perf_counter() - t0:.0f}s", flush=True)
    t0 = time.perf_counter()
    tower = adapter.model.vision_model
    head = torch.nn.Linear(tower.config.hidden_size, 9 * sum(GROUPS.values()))
    curve = [{"step": n, **dict(zip(GROUPS, parts))}
             for n, parts in fit(tower, head, x, y, cell_loss, a.steps)]
    seconds = time.perf_counter() - t0
    row = {"steps": a.steps, "patch_size": a.patch_size, "image_size": a.image_size,
           "render": {"radius": RADIUS, "jitter": JITTER, "ink": INK},
           "images": len(images), "train_seconds": round(seconds), "loss_curve": curve,
           "probes": probes(adapter, a.image_size)}
    print(json.dumps(row["probes"], indent=1))
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows + [row], indent=1) + "\n")


if __name__ == "__main__":
    main()
