"""The Pass contract: a typed parameter model, the context facts it needs and gives, and run(ctx)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict

if TYPE_CHECKING:
    from mmprune.context import Context

#: Facts every run starts with: the loaded model (with its adapter and traced graph) and the data.
INITIAL_FACTS = frozenset({"model", "graph", "data"})

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _not_the_test_split(split: str) -> str:
    if split == "test":
        raise ValueError("the test split is for the final report only")
    return split


#: a split a pass fits the model to (trains, calibrates or selects on): anything but test
FitSplit = Annotated[str, AfterValidator(_not_the_test_split)]


def at_least_one(what: str) -> AfterValidator:
    """For a list field that also takes 'all': an empty list is an error, not 'nothing'."""
    def check(v):
        if isinstance(v, list) and not v:
            raise ValueError(f"name at least one {what}, or 'all'")
        return v
    return AfterValidator(check)


class PassParams(BaseModel):
    """Base of every pass's parameter model: unknown fields are errors, every field has a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


class Pass:
    """A compression pass. Subclasses set `name`, `Params`, `requires`, `provides` and implement `run`.

    Passes never import each other: they meet in the Context through named facts such as
    `scores.params`. `excludes` lists facts that make the pass impossible (for example a
    quantized model can no longer be structurally pruned); the planner rejects such orders.
    """

    name: ClassVar[str]
    Params: ClassVar[type[PassParams]] = PassParams
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    excludes: ClassVar[frozenset[str]] = frozenset()
    #: True when the pass fits something to the data of its `split` (it must not be the report split)
    calibrates: ClassVar[bool] = False

    def __init__(self, params: PassParams | None = None):
        self.params = params if params is not None else self.Params()

    def needs(self) -> frozenset[str]:
        """Facts this configured instance needs; override when they depend on parameters."""
        return self.requires

    def gives(self) -> frozenset[str]:
        """Facts this configured instance provides; override when they depend on parameters."""
        return self.provides

    def run(self, ctx: Context) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def check_pass_class(cls: object) -> list[str]:
    """Problems that make `cls` unusable as a pass; empty when it is fine."""
    if not isinstance(cls, type) or not issubclass(cls, Pass):
        return [f"{cls!r} is not a subclass of mmprune.passes.base.Pass"]
    problems = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"{cls.__qualname__}.name must be a lower_snake_case string, got {name!r}")
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, PassParams)):
        problems.append(f"{cls.__qualname__}.Params must subclass PassParams")
    if cls.run is Pass.run:
        problems.append(f"{cls.__qualname__} does not implement run(ctx)")
    for attr in ("requires", "provides", "excludes"):
        if not isinstance(getattr(cls, attr), frozenset):
            problems.append(f"{cls.__qualname__}.{attr} must be a frozenset of fact names")
    return problems
