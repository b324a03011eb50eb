"""Every shipped recipe validates, plans, and runs end to end on small stand-ins of its model/data."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmprune.pipeline import plan, run
from mmprune.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
SMALL = ("model={tiny: clip}", "data.train_size=96", "data.validation_size=32", "data.test_size=32",
         "evaluation.latency_repeats=3", "evaluation.latency_batch_size=8")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_plans(path, registry):
    recipe = load_recipe(path, registry)
    assert plan(recipe, registry)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_on_a_small_stand_in(path, registry, tmp_path):
    recipe = load_recipe(path, registry, SMALL + (f"output={tmp_path / 'run'}",))
    report = run(recipe, registry, show_progress=False, log=lambda m: None)
    assert report["final"]["metrics"] and report["ratios"]["speedup"] > 0
