"""Captions, questions, statements and instructions about scenes, with paraphrases and fillers.

Text varies like real captions: several templates per meaning, optional attributes, articles,
filler words and different lengths, so language-token pruning has redundancy to find. The closed
vocabulary (`vocabulary()`) is every word the grammar can produce.
"""
from __future__ import annotations

import re

import numpy as np

from mmprune.data.minivl.scenes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
)

NUMBERS = ("zero", "one", "two", "three", "four")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CAPTION_TEMPLATES = (
    "{objs}.",
    "a picture of {objs}.",
    "there is {objs} on a noisy background.",
    "an image with {objs}.",
    "we can see {objs}, on a textured background.",
    "in this photo there is {objs}.",
    "a simple scene showing {objs}.",
)
JOINERS = (" and ", ", ", " as well as ", " and also ")
FILLERS = ("", "", "", "clearly ", "just ")


def _pos(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("top", "bottom", "left", "right"):
        return f"on the {position}"
    return f"in the {position}"


def object_phrase(o: SceneObject, rng: np.random.Generator, *, size_p: float = 0.7,
                  pos_p: float = 0.8) -> str:
    words = ["a"]
    if rng.random() < size_p:
        words.append(o.size)
    words += [o.color, o.shape]
    phrase = " ".join(words)
    if rng.random() < pos_p:
        phrase += " " + _pos(o.position)
    return phrase


def caption(scene: Scene, rng: np.random.Generator) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    parts = [object_phrase(o, rng) for o in objs]
    text = parts[0]
    for p in parts[1:]:
        text += JOINERS[rng.integers(len(JOINERS))] + p
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return FILLERS[rng.integers(len(FILLERS))] + template.format(objs=text)


def question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A question about the scene and its one-word answer from the closed answer vocabulary."""
    kind = rng.choice(["color", "shape", "count", "exists", "where", "size"])
    objs = scene.objects
    if kind == "count":
        shape = SHAPES[rng.integers(len(SHAPES))] if rng.random() < 0.5 else None
        n = sum(1 for o in objs if shape in (None, o.shape))
        what = f"{shape}s" if shape else "objects"
        q = rng.choice([f"how many {what} are there?", f"how many {what} can you see?",
                        f"count the {what} in the image."])
        return str(q), NUMBERS[n]
    if kind == "exists":
        o = objs[rng.integers(len(objs))]
        color = o.color if rng.random() < 0.5 else list(COLORS)[rng.integers(len(COLORS))]
        shape = o.shape if rng.random() < 0.5 else SHAPES[rng.integers(len(SHAPES))]
        yes = any(x.color == color and x.shape == shape for x in objs)
        q = rng.choice([f"is there a {color} {shape}?", f"is there a {color} {shape} in the picture?",
                        f"does the image contain a {color} {shape}?"])
        return str(q), "yes" if yes else "no"
    o = objs[rng.integers(len(objs))]
    unique_shape = sum(x.shape == o.shape for x in objs) == 1
    if kind == "color" and unique_shape:
        q = rng.choice([f"what color is the {o.shape}?", f"which color does the {o.shape} have?",
                        f"what is the color of the {o.shape}?"])
        return str(q), o.color
    if kind == "size" and unique_shape:
        return f"is the {o.shape} small or large?", o.size
    if kind == "where" and unique_shape:
        return f"where is the {o.shape}?", o.position.replace(" ", "_")
    q = rng.choice([f"what shape is {_pos(o.position)}?", f"which shape is {_pos(o.position)}?",
                    f"what kind of shape can you see {_pos(o.position)}?"])
    return str(q), o.shape


def statement(left: Scene, right: Scene, rng: np.random.Generator) -> tuple[str, bool]:
    """An NLVR-style statement about an image pair and whether it is true.

    Three of the four kinds name a side, so a model has to read each image as the left or the
    right one. Statements are about colours and object counts, not shapes: the zoo's ViT tells
    colours apart but recognises a lone object's shape only 41% of the time (5 shapes), and with
    shape statements ("the left image shows a red circle") the NLVR model stayed at chance on
    every one of them (benchmarks/nlvr_layouts.py).
    """
    kind = rng.choice(["both", "side_has", "more_color", "more"])
    colors = list(COLORS)
    side = "left" if rng.random() < 0.5 else "right"
    scene, other = (left, right) if side == "left" else (right, left)
    other_side = "right" if side == "left" else "left"
    if kind == "more":
        return f"the {side} image has more objects than the {other_side} image.", \
            len(scene.objects) > len(other.objects)
    # half the time a colour the image does show, so true and false come up about equally
    seen = [o.color for o in scene.objects]
    color = seen[rng.integers(len(seen))] if rng.random() < 0.5 else colors[rng.integers(len(colors))]
    n = sum(o.color == color for o in scene.objects)
    m = sum(o.color == color for o in other.objects)
    if kind == "both":
        return f"both images contain a {color} object.", n > 0 and m > 0
    if kind == "side_has":
        return f"the {side} image shows a {color} object.", n > 0
    return f"the {side} image has more {color} objects than the {other_side} image.", n > m


def instruction(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """An instruction and its short answer (one or two words), LLaVA-style."""
    q, a = question(scene, rng)
    prefix = rng.choice(["answer briefly: ", "look at the image and answer: ", "",
                         "please reply with one word. "])
    return f"{prefix}{q}", a.replace("_", " ")


def answer_vocabulary() -> list[str]:
    return sorted(set(COLORS) | set(SHAPES) | set(SIZES) | set(NUMBERS) | {"yes", "no"}
                  | {p.replace(" ", "_") for p in POSITIONS})


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+|[.,?:!]", text.lower())


def vocabulary() -> list[str]:
    """Every word the grammar produces (templates, attributes, numbers, digits), sorted."""
    texts = list(CAPTION_TEMPLATES) + list(JOINERS) + list(FILLERS) + [
        "how many objects are there can you see count the in image",
        "is there a picture does contain what color which does have is of shape",
        "small or large where kind on the",
        "left image has more than right both images object exactly objects total shows",
        "answer briefly look at and please reply with one word",
        "the digits digit number written handwritten", "in on at the",
    ]
    vocab = set()
    for t in texts:
        vocab.update(words(t))
    vocab.update(COLORS, SHAPES, (f"{s}s" for s in SHAPES), SIZES, NUMBERS, DIGIT_WORDS)
    vocab.update(w for p in POSITIONS for w in p.split())
    vocab.update(str(i) for i in range(10))
    vocab.update(".,?:!")
    vocab.update(w for a in answer_vocabulary() for w in a.split("_"))
    return sorted(vocab)
