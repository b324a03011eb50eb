"""The MiniVL tasks as `datasets.DatasetDict`s with disjoint train / validation / test splits.

Splits are disjoint by content: each scene's signature (its objects, or for digits the bundled
handwritten samples it uses) is hashed to a split, so no scene of the test split appears in
training, and the digits splits draw from disjoint pools of scikit-learn's handwritten digits.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

import datasets
import numpy as np

from mmprune.data.minivl import language
from mmprune.data.minivl.scenes import (
    POSITIONS,
    Scene,
    digit_image,
    render,
    sample_scene,
)

TASKS = ("retrieval", "vqa", "nlvr", "instruct", "digits")
SPLITS = ("train", "validation", "test")
#: default examples per split; `scale` in the source multiplies them
SIZES = {"train": 6000, "validation": 500, "test": 500}


def split_of(signature: str) -> str:
    """80 / 10 / 10 split by a stable hash of the content signature."""
    bucket = int(hashlib.sha256(signature.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def signature(scene: Scene) -> str:
    return "|".join(sorted(f"{o.shape},{o.color},{o.size},{o.cell}" for o in scene.objects))


def _fill(sizes: dict[str, int], rng: np.random.Generator,
          make: Callable[[np.random.Generator], tuple[str, dict] | None]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {s: [] for s in sizes}
    seen: set[str] = set()
    attempts = 0
    while any(len(rows[s]) < n for s, n in sizes.items()):
        attempts += 1
        if attempts > 50 * sum(sizes.values()):
            raise RuntimeError(f"MiniVL generation could not fill the splits {sizes}")
        made = make(rng)
        if made is None:
            continue
        sig, row = made
        if sig in seen:
            continue
        split = split_of(sig)
        if len(rows[split]) < sizes[split]:
            seen.add(sig)
            rows[split].append(row)
    return rows


def _image_feature() -> datasets.Image:
    return datasets.Image()


def build(task: str, seed: int, sizes: dict[str, int], image_size: int) -> datasets.DatasetDict:
    """Generate one task deterministically from `seed`."""
    rng = np.random.default_rng([seed, TASKS.index(task)])
    maker, features = _MAKERS[task](image_size)
    rows = (_digits_fill if task == "digits" else _fill)(sizes, rng, maker)
    return datasets.DatasetDict({s: datasets.Dataset.from_list(rows[s], features=features)
                                 for s in SPLITS if s in rows})


def _retrieval(size: int):
    def make(rng):
        scene = sample_scene(rng)
        return signature(scene), {"image": render(scene, size), "caption": language.caption(scene, rng)}
    return make, datasets.Features({"image": _image_feature(), "caption": datasets.Value("string")})


def _vqa(size: int):
    def make(rng):
        scene = sample_scene(rng)
        q, a = language.question(scene, rng)
        # answers are closed-vocabulary words, written as text ("top left") for generative models
        return signature(scene) + "#" + q, {"image": render(scene, size), "question": q,
                                            "answer": a.replace("_", " ")}
    return make, datasets.Features({"image": _image_feature(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")})


def _nlvr(size: int):
    # Labels are balanced per statement text: "the left image has more red objects than the right
    # image" is mostly false and "the left image shows a red object" mostly true, so with global
    # balancing alone a model that never looked at the images would score well above chance.
    seen: dict[str, list[int]] = {}

    def make(rng):
        left, right = sample_scene(rng), sample_scene(rng)
        text, truth = language.statement(left, right, rng)
        counts = seen.setdefault(text, [0, 0])
        if counts[int(truth)] > counts[1 - int(truth)]:
            return None
        counts[int(truth)] += 1
        return (signature(left) + "/" + signature(right) + "#" + text,
                {"image_left": render(left, size), "image_right": render(right, size),
                 "statement": text, "label": int(truth)})
    return make, datasets.Features({"image_left": _image_feature(), "image_right": _image_feature(),
                                    "statement": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["false", "true"])})


def _instruct(size: int):
    def make(rng):
        scene = sample_scene(rng)
        ins, a = language.instruction(scene, rng)
        return signature(scene) + "#" + ins, {"image": render(scene, size), "instruction": ins,
                                              "answer": a}
    return make, datasets.Features({"image": _image_feature(), "instruction": datasets.Value("string"),
                                    "answer": datasets.Value("string")})


def _digit_pools() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(len(d.target))
    pools = {s: idx[[split_of(f"digit{i}") == s for i in idx]] for s in SPLITS}
    return d.images, d.target, pools


def _digits(size: int):
    images, targets, pools = _digit_pools()

    def make(rng):
        split = SPLITS[int(rng.choice(3, p=[0.8, 0.1, 0.1]))]
        n = int(rng.integers(1, 4))
        cells = rng.choice(9, size=n, replace=False)
        picks = rng.choice(pools[split], size=n, replace=False)
        img = digit_image([images[k] for k in picks], cells, size, rng)
        digits = [int(targets[k]) for k in picks]
        phrases = [f"a {language.DIGIT_WORDS[d]} {language._pos(POSITIONS[c])}" for d, c in zip(digits, cells)]
        text = rng.choice(["the digits ", "handwritten ", "a picture of ", ""]) + " and ".join(phrases) + "."
        k = int(rng.integers(n))
        q, a = (f"what digit is {language._pos(POSITIONS[cells[k]])}?", language.DIGIT_WORDS[digits[k]]) \
            if rng.random() < 0.7 else ("how many digits are there?", language.NUMBERS[n])
        sig = "digits:" + ",".join(f"{c}:{p}" for c, p in sorted(zip(cells.tolist(), picks.tolist())))
        # a digits scene belongs to the split its handwritten samples came from
        return sig, {"image": img, "caption": str(text), "question": q, "answer": a, "_split": split}

    features = datasets.Features({"image": _image_feature(), "caption": datasets.Value("string"),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string")})
    return make, features


def _digits_fill(sizes, rng, make):
    rows: dict[str, list[dict]] = {s: [] for s in sizes}
    seen = set()
    while any(len(rows[s]) < n for s, n in sizes.items()):
        sig, row = make(rng)
        split = row.pop("_split")
        if sig not in seen and len(rows[split]) < sizes[split]:
            seen.add(sig)
            rows[split].append(row)
    return rows


_MAKERS = {"retrieval": _retrieval, "vqa": _vqa, "nlvr": _nlvr, "instruct": _instruct, "digits": _digits}
