"""`minivl`: the embedded MiniVL tasks as a dataset source, generated once and cached on disk."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Literal

import datasets
from pydantic import Field

from mmprune.data.base import DataParams, DatasetSource
from mmprune.data.minivl import tasks

FORMAT = "v1"


def cache_root() -> Path:
    """`$MMPRUNE_CACHE`, else the user's cache directory."""
    env = os.environ.get("MMPRUNE_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmprune"
    return base.expanduser()


def code_hash() -> str:
    """Hash of the generator's source: a change to it invalidates cached datasets."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


class MiniVLParams(DataParams):
    task: Literal["retrieval", "vqa", "nlvr", "instruct", "digits"] = Field(
        "retrieval", description="retrieval (image-caption), vqa (question -> answer word), nlvr "
        "(two images + statement -> true/false), instruct (instruction -> short answer), digits "
        "(scenes of real handwritten digits with captions and questions).")
    train_size: int = Field(tasks.SIZES["train"], ge=2, description="Examples in the train split.")
    validation_size: int = Field(tasks.SIZES["validation"], ge=2, description="Examples in the "
                                 "validation split (pruning decisions may use it).")
    test_size: int = Field(tasks.SIZES["test"], ge=2, description="Examples in the test split "
                           "(reports only; nothing selects on it).")
    image_size: int = Field(64, ge=24, le=256, description="Image side in pixels.")
    seed: int = Field(0, description="Generation seed (independent of the recipe's seed, so runs "
                      "with different seeds see the same data).")


def load_task(p: MiniVLParams) -> datasets.DatasetDict:
    sizes = {"train": p.train_size, "validation": p.validation_size, "test": p.test_size}
    key = (f"{p.task}-seed{p.seed}-px{p.image_size}-{p.train_size}-{p.validation_size}-"
           f"{p.test_size}-{code_hash()}")
    path = cache_root() / "minivl" / FORMAT / key
    if (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    ds = tasks.build(p.task, p.seed, sizes, p.image_size)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path))


class MiniVLSource(DatasetSource):
    """The embedded MiniVL vision-language tasks (generated offline, deterministic, cached)."""

    name = "minivl"
    Params = MiniVLParams

    def load(self, adapter) -> datasets.DatasetDict:
        return load_task(self.params)
