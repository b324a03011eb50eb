"""How fast does the zoo's ViT learn the shape of one object, or the value of one digit? Render variants.

    .venv/bin/python benchmarks/lone_object.py shape [--radius 0.24 0.42] [--jitter 1] [--init mimetic]
    .venv/bin/python benchmarks/lone_object.py digit [--ink colour|white] [--background textured|plain]

`vit_learnability.py` found that a tower of `clip-minivl`'s size, trained from scratch, learns
where objects are, their colour and their size, but not their shape or a digit's value. This
asks which part of the picture is in the way, before any change to the generator (which would
invalidate every cached dataset and zoo model). One object (or digit) per image in a random cell
of the 3 x 3 grid, 6,000 training images, 1,000 held out; the tower is trained from scratch with
a linear head on its pooled state for `--steps` steps of 64 and scored on the held-out images.
Variants: the objects' radii and position jitter; the digits' ink (a random MiniVL colour, as the
`digits` task draws them, or white) and background (MiniVL's textured one, or plain grey); and
mimetic attention initialisation (Trockman & Kolter, 2023). About 1.5 minutes a run at the
defaults. Appends a row to benchmarks/results/lone_object.json.
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

from mmprune.data.minivl.scenes import COLORS, SHAPES, _background, _mask, paste_digit, sample_scene
from mmprune.data.minivl.tasks import _digit_pools
from mmprune.plugins.manager import get_registry
from mmprune.zoo.catalog import CATALOG

RESULTS = Path(__file__).parent / "results" / "lone_object.json"
SIZE, N_TRAIN, N_TEST = 64, 6000, 1000


def render_object(scene, radius: tuple[float, float], jitter: float) -> np.ndarray:
    """`scenes.render` with the radii (fractions of a grid cell, small and large) and the position
    jitter (a multiple of render's) as parameters; the defaults draw what render draws."""
    rng = np.random.default_rng(scene.background)
    img = _background(SIZE, rng)
    cell = SIZE / 3
    for obj in scene.objects:
        r = cell * (radius[1] if obj.size == "large" else radius[0])
        room = max(0.0, cell * 0.5 - r) * 0.6 * jitter
        cy = (obj.row + 0.5) * cell + rng.uniform(-room, room)
        cx = (obj.col + 0.5) * cell + rng.uniform(-room, room)
        colour = np.asarray(COLORS[obj.color], dtype=float) + rng.normal(0, 12, 3)
        m = _mask(obj.shape, r, cy, cx, SIZE)
        img[m] = colour + rng.normal(0, 8, (int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def shapes(a, rng) -> tuple[list[np.ndarray], list[int]]:
    scenes = [sample_scene(rng, 1, 1) for _ in range(N_TRAIN + N_TEST)]
    return ([render_object(s, tuple(a.radius), a.jitter) for s in scenes],
            [SHAPES.index(s.objects[0].shape) for s in scenes])


def digits(a, rng) -> tuple[list[np.ndarray], list[int]]:
    """One handwritten digit in a random cell, drawn as the `digits` task draws it (8x8 glyph
    scaled 2x, jitter of 2 px), from the train pool for training and the test pool held out."""
    glyphs, targets, pools = _digit_pools()
    images, labels = [], []
    for i in range(N_TRAIN + N_TEST):
        if a.background == "plain":
            img = np.full((SIZE, SIZE, 3), 100, np.uint8)
        else:
            img = np.clip(_background(SIZE, rng), 0, 255).astype(np.uint8)
        k = int(rng.choice(pools["train"] if i < N_TRAIN else pools["test"]))
        cell = int(rng.integers(9))
        if a.ink == "colour":
            paste_digit(img, glyphs[k], cell, SIZE // 24, rng)
        else:
            paste_white(img, glyphs[k], cell, rng)
        images.append(img)
        labels.append(int(targets[k]))
    return images, labels


def paste_white(img: np.ndarray, digit: np.ndarray, cell: int, rng: np.random.Generator) -> None:
    """`scenes.paste_digit`'s placement, with white ink instead of a random colour."""
    glyph = np.kron(digit / 16.0, np.ones((SIZE // 24, SIZE // 24)))
    h, c = glyph.shape[0], SIZE / 3
    y0 = int(np.clip((cell // 3 + 0.5) * c - h / 2 + rng.integers(-2, 3), 0, SIZE - h))
    x0 = int(np.clip((cell % 3 + 0.5) * c - h / 2 + rng.integers(-2, 3), 0, SIZE - h))
    region = img[y0:y0 + h, x0:x0 + h].astype(float)
    alpha = glyph[..., None]
    img[y0:y0 + h, x0:x0 + h] = np.clip(region * (1 - alpha) + 240.0 * alpha, 0, 255).astype(np.uint8)


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
    cls = get_registry().models["clip"]
    model = cls.tiny_model(0, copy.deepcopy(CATALOG["clip-minivl"].config))
    adapter = cls(model, *cls.default_processors(model))
    tower = model.vision_model
    if a.init == "mimetic":
        mimetic_init(tower, torch.Generator().manual_seed(1))
    x = adapter.image_processor(images, return_tensors="pt")["pixel_values"]
    y = torch.tensor(labels)
    head = torch.nn.Linear(tower.config.hidden_size, int(y.max()) + 1)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=a.lr,
                            weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / a.steps)))
    gen = torch.Generator().manual_seed(0)
    tower.train()
    window, curve = [], []
    for step in range(a.steps):
        idx = torch.randint(N_TRAIN, (64,), generator=gen)
        loss = F.cross_entropy(head(tower(pixel_values=x[idx]).pooler_output), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        window.append(loss.item())
        if (step + 1) % 50 == 0:
            curve.append(round(float(np.mean(window)), 3))
            print(f"step {step + 1}: loss {curve[-1]}", flush=True)
            window = []
    tower.eval()
    with torch.inference_mode():
        hit = head(tower(pixel_values=x[N_TRAIN:]).pooler_output).argmax(-1) == y[N_TRAIN:]
    return {"loss_curve": curve, "held_out_accuracy": round(100 * hit.float().mean().item(), 1),
            "majority": round(100 * np.bincount(labels[N_TRAIN:]).max() / N_TEST, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["shape", "digit"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", choices=["default", "mimetic"], default="default")
    ap.add_argument("--radius", type=float, nargs=2, default=[0.24, 0.42],
                    help="small and large objects' radius, in grid cells (render's: 0.24 0.42)")
    ap.add_argument("--jitter", type=float, default=1.0, help="position jitter, a multiple of render's")
    ap.add_argument("--ink", choices=["colour", "white"], default="colour")
    ap.add_argument("--background", choices=["textured", "plain"], default="textured")
    a = ap.parse_args()
    rng = np.random.default_rng(1)
    images, labels = (shapes if a.what == "shape" else digits)(a, rng)
    t0 = time.perf_counter()
    result = train(a, images, labels)
    variant = {"what": a.what, "steps": a.steps, "lr": a.lr, "init": a.init}
    variant.update({"radius": a.radius, "jitter": a.jitter} if a.what == "shape"
                   else {"ink": a.ink, "background": a.background})
    row = {**variant, **result, "train_seconds": round(time.perf_counter() - t0)}
    print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}))
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows + [row], indent=1) + "\n")


if __name__ == "__main__":
    main()
