"""What the zoo's vision towers see: linear probes on frozen features of single-object scenes.

    .venv/bin/python benchmarks/vision_probe.py [NAME ...]     # default: every zoo model with a ViT

A task metric says how well a model does; a probe says what its vision tower encodes. For 2,000
MiniVL scenes with one object (and 2,000 with one handwritten digit) a logistic regression is
fitted on 1,500 and scored on 500, per attribute (the object's cell of the 3 x 3 grid, shape,
colour, size; the digit's value and cell), from three features: the tower's pooled output (the
CLS state a contrastive or ITM head reads), every patch state flattened, and, as the reference
for what the pixels hold, the image's per-channel means over 8 x 8 pixel blocks. Writes
benchmarks/results/vision_probe.json and prints the markdown table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mmprune.data.minivl.scenes import digit_image, render, sample_scene
from mmprune.data.minivl.tasks import _digit_pools
from mmprune.models.loading import load_model
from mmprune.plugins.manager import get_registry
from mmprune.recipe import ModelSpec
from mmprune.zoo.build import build

HERE = Path(__file__).parent
#: zoo models whose vision tower is their own (llava-minivl's is clip-minivl's, frozen)
MODELS = ("clip-minivl", "clip-minivl-digits", "blip-minivl", "blip-minivl-nlvr", "blip-minivl-vqa")
N, N_TRAIN, SIZE = 2000, 1500, 64


def object_scenes(seed: int = 5, size: int = SIZE) -> tuple[list[np.ndarray], dict[str, list]]:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, 1, 1) for _ in range(N)]
    objs = [s.objects[0] for s in scenes]
    return [render(s, size) for s in scenes], {
        "cell": [o.cell for o in objs], "shape": [o.shape for o in objs],
        "colour": [o.color for o in objs], "size": [o.size for o in objs]}


def digit_scenes(seed: int = 6, size: int = SIZE) -> tuple[list[np.ndarray], dict[str, list]]:
    images, targets, _ = _digit_pools()
    rng = np.random.default_rng(seed)
    out, labels = [], {"digit": [], "cell": []}
    for _ in range(N):
        cell, k = int(rng.integers(9)), int(rng.integers(len(targets)))
        out.append(digit_image([images[k]], [cell], size, rng))     # as the digits task draws them
        labels["digit"].append(int(targets[k]))
        labels["cell"].append(cell)
    return out, labels


def probe(features: np.ndarray, labels: list, n_train: int = N_TRAIN) -> float:
    """Held-out accuracy (%) of a logistic regression on standardised features: fitted on the
    first `n_train` rows, scored on the rest."""
    x = StandardScaler().fit(features[:n_train]).transform(features)
    clf = LogisticRegression(max_iter=500).fit(x[:n_train], labels[:n_train])
    return round(100 * clf.score(x[n_train:], labels[n_train:]), 1)


def pixel_features(images: list[np.ndarray]) -> np.ndarray:
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(x, 8).flatten(1).numpy()


@torch.inference_mode()
def tower_features(adapter, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    pixels = adapter.image_processor(images, return_tensors="pt")["pixel_values"]
    out = adapter.model.vision_model(pixel_values=pixels)
    return {"pooled": out.pooler_output.numpy(), "patches": out.last_hidden_state[:, 1:].flatten(1).numpy()}


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    sets = {"objects": object_scenes(), "digits": digit_scenes()}
    chance = {f"{s}.{a}": round(100 * max(np.unique(v, return_counts=True)[1]) / N, 1)
              for s, (_, labels) in sets.items() for a, v in labels.items()}
    pixels = {s: pixel_features(imgs) for s, (imgs, _) in sets.items()}
    rows = [{"model": "pixels (8x8 block means)", "features": "-",
             **{f"{s}.{a}": probe(pixels[s], v) for s, (_, labels) in sets.items()
                for a, v in labels.items()}}]
    reg = get_registry()
    for name in names or MODELS:
        build(name)
        adapter, _ = load_model(ModelSpec(zoo=name), reg, 0)
        feats = {s: tower_features(adapter, imgs) for s, (imgs, _) in sets.items()}
        for kind in ("pooled", "patches"):
            rows.append({"model": name, "features": kind,
                         **{f"{s}.{a}": probe(feats[s][kind], v) for s, (_, labels) in sets.items()
                            for a, v in labels.items()}})
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "vision_probe.json").write_text(json.dumps(
        {"n": N, "n_train": N_TRAIN, "majority_class": chance, "rows": rows}, indent=1) + "\n")
    cols = list(chance)
    print("| model | features | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    print("| majority class | - | " + " | ".join(f"{chance[c]:.1f}" for c in cols) + " |")
    for r in rows:
        print(f"| {r['model']} | {r['features']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
