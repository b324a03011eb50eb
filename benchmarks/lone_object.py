"""How fast does the zoo's ViT learn the shape of one object, or the value of one digit? Render variants.

    .venv/bin/python benchmarks/lone_object.py shape [--radius 0.32 0.46] [--jitter 0.18] [--init mimetic]
    .venv/bin/python benchmarks/lone_object.py digit [--ink colour|white|contrast]
        [--background textured|plain] [--noise 10] [--stripes 12]

`vit_learnability.py` found that a tower of `clip-minivl`'s size, trained from scratch, learned
where objects are, their colour and their size, but not their shape or a digit's value. This
asks which part of the picture is in the way, cheaply, before a change to the generator (which
invalidates every cached dataset and zoo model). One object (or digit) per image in a random cell
of the 3 x 3 grid, 6,000 training images, 1,000 held out; the tower is trained from scratch with
a linear head on its pooled state for `--steps` steps of 64 and scored on the held-out images.
Variants, each a parameter of `mmprune.data.minivl.scenes` (defaults: the generator's):
the objects' radii and position jitter; the digits' ink (`scenes.ink_colour`) and background
(MiniVL's texture, with its pixel noise and stripe amplitude, or plain grey); and mimetic
attention initialisation (Trockman & Kolter, 2023). About 1.5 minutes a run. Appends a row to
benchmarks/results/lone_object.json. Rows before the generator change (radius 0.24 / 0.42,
jitter 0.6, ink "colour") were measured on the code as it then was.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vit_learnability import fit, scratch_clip

from mmprune.data.minivl.scenes import (
    INK,
    INKS,
    JITTER,
    NOISE,
    RADIUS,
    SHAPES,
    SIZES,
    STRIPES,
    background,
    digit_image,
    render,
    sample_scene,
)
from mmprune.data.minivl.tasks import _digit_pools

RESULTS = Path(__file__).parent / "results" / "lone_object.json"
SIZE, N_TRAIN, N_TEST = 64, 6000, 1000


def shapes(a, rng) -> tuple[list[np.ndarray], list[int]]:
    scenes = [sample_scene(rng, 1, 1) for _ in range(N_TRAIN + N_TEST)]
    radius = dict(zip(SIZES, a.radius))
    return ([render(s, SIZE, radius, a.jitter) for s in scenes],
            [SHAPES.index(s.objects[0].shape) for s in scenes])


def digits(a, rng) -> tuple[list[np.ndarray], list[int]]:
    """One handwritten digit in a random cell, drawn as the `digits` task draws it (8x8 glyph
    scaled 2x, jitter of 2 px), from the train pool for training and the test pool held out."""
    glyphs, targets, pools = _digit_pools()
    images, labels = [], []
    for i in range(N_TRAIN + N_TEST):
        backdrop = (np.full((SIZE, SIZE, 3), 100.0) if a.background == "plain"
                    else background(SIZE, rng, a.noise, a.stripes))
        k = int(rng.choice(pools["train"] if i < N_TRAIN else pools["test"]))
        images.append(digit_image([glyphs[k]], [int(rng.integers(9))], SIZE, rng, a.ink, backdrop))
        labels.append(int(targets[k]))
    return images, labels


def mimetic_init(tower: torch.nn.Module, gen: torch.Generator) -> None:
    """W_q^T W_k ~ 0.7 Z + 0.7 I per head and W_v^T W_o^T ~ 0.4 Z - 0.4 I (the paper's values)."""
    def factor(alpha, beta, d, rank):
        u, s, vh = torch.linalg.svd(alpha * torch.randn(d, d, generator=gen) / d ** 0.5
                                    + beta * torch.eye(d))
        root = s[:rank].sqrt()[:, None]
        return root * u[:, :rank].T, root * vh[:rank]

    with torch.no_grad():
        for layer in tower.encoder.layers:
            at = layer.self_attn
            d, dh = at.q_proj.in_features, at.head_dim
            for h in range(d // dh):
                rows = slice(h * dh, (h + 1) * dh)
                at.q_proj.weight[rows], at.k_proj.weight[rows] = factor(0.7, 0.7, d, dh)
            v, o = factor(0.4, -0.4, d, d)
            at.v_proj.weight.copy_(v)
            at.out_proj.weight.copy_(o.T)


def train(a, images: list[np.ndarray], labels: list[int]) -> dict:
    torch.manual_seed(0)
    adapter = scratch_clip()
    tower = adapter.model.vision_model
    if a.init == "mimetic":
        mimetic_init(tower, torch.Generator().manual_seed(1))
    x = adapter.image_processor(images, return_tensors="pt")["pixel_values"]
    y = torch.tensor(labels)
    head = torch.nn.Linear(tower.config.hidden_size, int(y.max()) + 1)
    curve = fit(tower, head, x[:N_TRAIN], y[:N_TRAIN], lambda o, t: F.cross_entropy(o, t)[None],
                a.steps, a.lr, warmup=50, every=50)
    with torch.inference_mode():
        hit = head(tower(pixel_values=x[N_TRAIN:]).pooler_output).argmax(-1) == y[N_TRAIN:]
    return {"loss_curve": [parts[0] for _, parts in curve],
            "held_out_accuracy": round(100 * hit.float().mean().item(), 1),
            "majority": round(100 * np.bincount(labels[N_TRAIN:]).max() / N_TEST, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["shape", "digit"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", choices=["default", "mimetic"], default="default")
    ap.add_argument("--radius", type=float, nargs=2, default=[RADIUS[z] for z in SIZES],
                    help="small and large objects' radius, in grid cells")
    ap.add_argument("--jitter", type=float, default=JITTER,
                    help="how far an object's centre strays, as a fraction of the room in its cell")
    ap.add_argument("--ink", choices=INKS, default=INK)
    ap.add_argument("--background", choices=["textured", "plain"], default="textured")
    ap.add_argument("--noise", type=float, default=NOISE, help="textured background's pixel noise std")
    ap.add_argument("--stripes", type=float, default=STRIPES,
                    help="textured background's largest stripe amplitude")
    a = ap.parse_args()
    rng = np.random.default_rng(1)
    images, labels = (shapes if a.what == "shape" else digits)(a, rng)
    t0 = time.perf_counter()
    result = train(a, images, labels)
    variant = {"what": a.what, "steps": a.steps, "lr": a.lr, "init": a.init}
    variant.update({"radius": a.radius, "jitter": a.jitter} if a.what == "shape"
                   else {"ink": a.ink, "background": a.background}
                   | ({"noise": a.noise, "stripes": a.stripes} if a.background == "textured" else {}))
    row = {**variant, **result, "train_seconds": round(time.perf_counter() - t0)}
    print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}))
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows + [row], indent=1) + "\n")


if __name__ == "__main__":
    main()
