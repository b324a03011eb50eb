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
#: an object's radius as a fraction of its grid cell, per size. At 0.24 / 0.42 small objects
#: spanned one or two 8 px patches and a ViT of the zoo's size could not learn their shape
#: (benchmarks/lone_object.py: 27% against a majority of 23%; 41% at these radii)
RADIUS = {"small": 0.32, "large": 0.46}
#: how far an object's centre strays from its cell's centre, as a fraction of the room left
JITTER = 0.18
#: background pixel noise (std) and the largest stripe amplitude
NOISE, STRIPES = 10.0, 12.0
#: how digits are inked: see `ink_colour`
INKS = ("colour", "white", "contrast", "card")
INK = "card"
#: the least luminance gap between "contrast" ink and the background under it
MIN_CONTRAST = 80.0


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


def background(size: int, rng: np.random.Generator, noise: float = NOISE,
               stripes: float = STRIPES) -> np.ndarray:
    """A float RGB texture: muted colour gradient + low-frequency blobs + stripes of random
    period, angle and amplitude (up to `stripes`) + pixel noise of std `noise`."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(60, 150, 3)
    tilt = rng.uniform(-40, 40, (2, 3))
    img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
    coarse = rng.normal(0, 18, (4, 4, 3))
    img += np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
    freq, phase, amp = rng.uniform(4, 12), rng.uniform(0, 2 * np.pi), rng.uniform(0, stripes)
    angle = rng.uniform(0, np.pi)
    img += amp * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)[..., None]
    img += rng.normal(0, noise, img.shape)
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


def render(scene: Scene, size: int = 64, radius: dict[str, float] = RADIUS,
           jitter: float = JITTER) -> np.ndarray:
    """The scene as an RGB uint8 array [size, size, 3]."""
    rng = np.random.default_rng(scene.background)
    img = background(size, rng)
    cell = size / 3
    for obj in scene.objects:
        r = cell * radius[obj.size]
        room = max(0.0, cell * 0.5 - r) * jitter
        cy = (obj.row + 0.5) * cell + rng.uniform(-room, room)
        cx = (obj.col + 0.5) * cell + rng.uniform(-room, room)
        colour = np.asarray(COLORS[obj.color], dtype=float) + rng.normal(0, 12, 3)
        m = _mask(obj.shape, r, cy, cx, size)
        img[m] = colour + rng.normal(0, 8, (int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def ink_colour(region: np.ndarray, rng: np.random.Generator, ink: str = INK) -> np.ndarray:
    """The colour a digit is written in over `region`: a random MiniVL colour ("colour"), white
    ("white"), a random one of those at least `MIN_CONTRAST` luminance away from the region's
    mean ("contrast"; the farthest colour where none is), or dark ink on the light card of paper
    `paste_digit` lays under it ("card", like a photo of a handwritten note)."""
    if ink == "white":
        return np.asarray(COLORS["white"], dtype=float)
    if ink == "card":
        return rng.uniform(10, 60) + rng.normal(0, 6, 3)
    palette = np.asarray(list(COLORS.values()), dtype=float)
    if ink == "colour":
        return palette[rng.integers(len(palette))]
    if ink != "contrast":
        raise ValueError(f"ink must be one of {INKS}, not {ink!r}")
    gap = np.abs(_luminance(palette) - _luminance(region.reshape(-1, 3).mean(0)))
    legible = np.flatnonzero(gap >= MIN_CONTRAST)
    return palette[rng.choice(legible) if len(legible) else int(gap.argmax())]


def paste_digit(img: np.ndarray, digit: np.ndarray, cell: int, scale: int,
                rng: np.random.Generator, ink: str = INK) -> None:
    """Composite a bundled 8x8 handwritten digit (0..16 ink) into grid cell `cell`, in place,
    `scale` pixels per glyph pixel, inked as `ink` (one of `INKS`, see `ink_colour`)."""
    size = img.shape[0]
    glyph = np.kron(digit / 16.0, np.ones((scale, scale)))
    h = glyph.shape[0]
    c = size / 3
    y0 = int(np.clip((cell // 3 + 0.5) * c - h / 2 + rng.integers(-2, 3), 0, size - h))
    x0 = int(np.clip((cell % 3 + 0.5) * c - h / 2 + rng.integers(-2, 3), 0, size - h))
    if ink == "card":     # a light card of paper under the digit, dark ink on it
        pad = max(1, scale)
        ys, xs = slice(max(0, y0 - pad), y0 + h + pad), slice(max(0, x0 - pad), x0 + h + pad)
        paper = rng.uniform(200, 245) + rng.normal(0, 6, 3)
        img[ys, xs] = np.clip(paper + rng.normal(0, 4, img[ys, xs].shape), 0, 255)
    region = img[y0:y0 + h, x0:x0 + h].astype(float)
    colour = ink_colour(region, rng, ink)
    alpha = glyph[..., None]
    img[y0:y0 + h, x0:x0 + h] = np.clip(region * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8)


def digit_image(glyphs: list[np.ndarray], cells: list[int], size: int, rng: np.random.Generator,
                ink: str = INK, backdrop: np.ndarray | None = None) -> np.ndarray:
    """Handwritten 8x8 `glyphs` composited into grid `cells` of a textured background (or of
    `backdrop`, a float or uint8 RGB array), as the `digits` task draws its scenes."""
    base = background(size, rng) if backdrop is None else backdrop
    img = np.clip(base, 0, 255).astype(np.uint8)
    for glyph, cell in zip(glyphs, cells):
        paste_digit(img, glyph, int(cell), max(1, size // 24), rng, ink)
    return img
