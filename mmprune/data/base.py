"""Dataset sources: registered by plugins, named in recipes as `data: {<source>: <task>, ...}`."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import datasets
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from mmprune.models.base import Adapter

SPLITS = ("train", "validation", "test")


class DataParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    task: str = Field(description="The task to load (the value of the source key in the recipe).")


class DatasetSource:
    """Produces a `datasets.DatasetDict` with train / validation / test splits for one task."""

    name: ClassVar[str]
    task_field: ClassVar[str] = "task"
    splits: ClassVar[tuple[str, ...]] = SPLITS
    Params: ClassVar[type[DataParams]] = DataParams

    def __init__(self, params: DataParams, seed: int):
        self.params, self.seed = params, seed

    def load(self, adapter: Adapter) -> datasets.DatasetDict:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def check_dataset_class(cls: object) -> list[str]:
    if not isinstance(cls, type) or not issubclass(cls, DatasetSource):
        return [f"{cls!r} is not a subclass of mmprune.data.base.DatasetSource"]
    problems = []
    if not isinstance(getattr(cls, "name", None), str):
        problems.append(f"{cls.__qualname__}.name must be a string")
    if cls.task_field not in cls.Params.model_fields:
        problems.append(f"{cls.__qualname__}.Params must have the field '{cls.task_field}'")
    return problems
