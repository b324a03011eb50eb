"""Every shipped recipe validates, plans, and runs end to end on small stand-ins of its model/data."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmprune.pipeline import plan, run
from mmprune.recipe import load_recipe
from mmprune.zoo.catalog import CATALOG

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
SMALL = ("data.train_size=96", "data.validation_size=32", "data.test_size=32",
         "evaluation.latency_repeats=3", "evaluation.latency_batch_size=8")


#: training passes shortened to a few steps (the stand-in checks wiring, not quality). A mode
#: retires once its next stage would remove under a quarter of the stand-in's quantum: with the
#: recipes' one image-token site, a tiny ViT's heads and channels cost so little that its
#: stages, each a third of what is left, shrink geometrically for hundreds of stages
SHORT = {"comp": {"k_min": 2, "search_steps": 4, "warmup_steps": 2, "stage_quantum": 0.25,
                  "batch_size": 16, "v_sub": 32, "probe_set": 32, "retire_below": 0.25},
         "finetune": {"steps": 3, "batch_size": 16, "eval_every": 3},
         # the tiny LLaVA's decoder has 2 layers: one site can remove only so much
         "token_prune": {"flops_target": 0.1}}


def _short(path: Path) -> tuple[str, ...]:
    """A tiny model of the recipe's family, and its training passes cut to a few steps."""
    data = yaml.safe_load(path.read_text())
    zoo = data["model"].get("zoo")
    family = CATALOG[zoo].family if zoo else "clip"
    return (f"model={{tiny: {family}}}",) + tuple(
        f"passes.{i}.{name}.{k}={v}" for i, p in enumerate(data["passes"]) for name in p
        for k, v in SHORT.get(name, {}).items())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_plans(path, registry):
    recipe = load_recipe(path, registry)
    assert plan(recipe, registry)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_on_a_small_stand_in(path, registry, tmp_path):
    recipe = load_recipe(path, registry, SMALL + _short(path) + (f"output={tmp_path / 'run'}",))
    report = run(recipe, registry, show_progress=False, log=lambda m: None)
    assert report["final"]["metrics"] and report["ratios"]["speedup"] > 0
    export = tmp_path / "run" / "model"
    if (export / "mmprune.json").exists():
        # the export alone (structure and token policy) reproduces the reported test metrics
        again = load_recipe(path, registry, SMALL + (f"model={{path: {export}}}",
                                                     "passes=[{evaluate: {}}]",
                                                     f"output={tmp_path / 'again'}"))
        reloaded = run(again, registry, show_progress=False, log=lambda m: None)
        assert reloaded["baseline"]["metrics"] == report["final"]["metrics"]
