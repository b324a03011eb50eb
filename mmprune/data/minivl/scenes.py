"""Scenes: objects with shape, colour, size and position on textured, noisy backgrounds.

Like real photos, most patches of a scene are background that carries little information, and a
few carry the objects a caption or question is about, so token pruning has real redundancy to
find while the salient patches matter. Everything is drawn with numpy from a seeded Generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "ring")
COLORS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 135, 30), "white": (240, 240, 240),
}
SIZES = ("small", "large")
# 3 x 3 grid of positions, named as captions name them
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int          # index into POSITIONS

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int    # background style seed


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 4) -> Scene:
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    objs = tuple(SceneObject(SHAPES[rng.integers(len(SHAPES))],
                             list(COLORS)[rng.integers(len(COLORS))],
                             SIZES[rng.integers(len(SIZES))], int(c)) for c in cells)
    return Scene(objs, int(rng.integers(2**31)))


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Muted colour gradient + low-frequency blobs + stripes + pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(60, 150, 3)
    tilt = rng.uniform(-40, 40, (2, 3))
    img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
    coarse = rng.normal(0, 18, (4, 4, 3))
    img += np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
    freq, phase, amp = rng.uniform(4, 12), rng.uniform(0, 2 * np.pi), rng.uniform(0, 12)
    angle = rng.uniform(0, np.pi)
    img += amp * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)[..., None]
    img += rng.normal(0, 10, img.shape)
    return img


def _mask(shape: str, radius: float, cy: float, cx: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= radius ** 2
    if shape == "ring":
        d2 = dy ** 2 + dx ** 2
        return (d2 <= radius ** 2) & (d2 >= (0.55 * radius) ** 2)
    if shape == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= radius * 1.1
    if shape == "triangle":
        top, bottom = cy - radius, cy + radius * 0.8
        half = (dy + radius) / (1.8 * radius) * radius
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= half)
    raise ValueError(shape)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an RGB uint8 array [size, size, 3]."""
    rng = np.random.default_rng(scene.background)
    img = _background(size, rng)
    cell = size / 3
    for obj in scene.objects:
        radius = cell * (0.42 if obj.size == "large" else 0.24)
        jitter = cell * 0.5 - radius
        cy = (obj.row + 0.5) * cell + rng.uniform(-jitter, jitter) * 0.6
        cx = (obj.col + 0.5) * cell + rng.uniform(-jitter, jitter) * 0.6
        colour = np.asarray(COLORS[obj.color], dtype=float) + rng.normal(0, 12, 3)
        m = _mask(obj.shape, radius, cy, cx, size)
        img[m] = colour + rng.normal(0, 8, (int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def paste_digit(img: np.ndarray, digit: np.ndarray, cell: int, scale: int,
                rng: np.random.Generator) -> None:
    """Composite a bundled 8x8 handwritten digit (0..16 ink) into grid cell `cell`, in place."""
    size = img.shape[0]
    glyph = np.kron(digit / 16.0, np.ones((scale, scale)))
    h = glyph.shape[0]
    c = size / 3
    y0 = int(np.clip((cell // 3 + 0.5) * c - h / 2 + rng.integers(-2, 3), 0, size - h))
    x0 = int(np.clip((cell % 3 + 0.5) * c - h / 2 + rng.integers(-2, 3), 0, size - h))
    ink = np.asarray(COLORS[list(COLORS)[rng.integers(len(COLORS))]], dtype=float)
    region = img[y0:y0 + h, x0:x0 + h].astype(float)
    alpha = glyph[..., None]
    img[y0:y0 + h, x0:x0 + h] = np.clip(region * (1 - alpha) + ink * alpha, 0, 255).astype(np.uint8)
