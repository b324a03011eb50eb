"""`export`: write the model as safetensors + HF config + mmprune.json, loadable by mmprune.load."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from mmprune.context import Context
from mmprune.errors import MMPruneError
from mmprune.passes.base import Pass, PassParams
from mmprune.saved import is_saved_model, save


class ExportParams(PassParams):
    path: str | None = Field(None, description="Directory to write (default: <run dir>/model). "
                             "Must not be the source model's directory.")


class Export(Pass):
    """Save the compressed model (safetensors, HF config, mmprune.json) for mmprune.load."""

    name = "export"
    Params = ExportParams
    requires = frozenset({"model"})
    provides = frozenset({"exported"})

    def run(self, ctx: Context) -> None:
        target = Path(self.params.path) if self.params.path else None
        if target is None:
            if ctx.run_dir is None:
                raise MMPruneError("export: give `path` when running outside a run directory.")
            target = ctx.run_dir / "model"
        source = ctx.state.get("source_path")
        if source and target.resolve() == Path(source).resolve():
            raise MMPruneError(f"export: refusing to overwrite the source model at {source}.")
        if target.exists() and any(target.iterdir()) and not is_saved_model(target):
            raise MMPruneError(f"export: {target} exists and is not an mmprune export; refusing to "
                               "write into it. Choose an empty or new directory.")
        save(target, ctx.adapter, ctx.graph)
        ctx.state["export_path"] = str(target)
