"""Bugs found in review, each pinned by the input that triggered it."""
from __future__ import annotations

import json

import pytest

from mmprune.errors import MMPruneError, RecipeError
from mmprune.pipeline import RunDirError
from mmprune.recipe import load_recipe
from tests.conftest import small_recipe
from tests.test_pipeline import PRUNE, run_recipe


def test_overwrite_refuses_when_the_source_model_is_inside_the_run_dir(write_recipe, registry, tmp_path):
    out = tmp_path / "a"
    run_recipe(write_recipe, registry, small_recipe(out, PRUNE))
    recipe = small_recipe(out, [{"score_magnitude": {}}])
    recipe["model"] = {"path": str(out / "model")}
    with pytest.raises(RunDirError, match="inside"):
        run_recipe(write_recipe, registry, recipe, overwrite=True)
    assert (out / "model" / "mmprune.json").exists()


def test_scoring_after_quantize_is_refused_at_plan_time(write_recipe, registry, tmp_path):
    recipe = small_recipe(tmp_path / "r", [{"quantize": {}}, {"score_magnitude": {}}])
    with pytest.raises(RecipeError, match="quantized"):
        run_recipe(write_recipe, registry, recipe)


@pytest.mark.parametrize("where", ["pass", "evaluation"])
def test_misspelt_split_is_a_recipe_error(write_recipe, registry, tmp_path, where):
    passes = [{"score_taylor": {"split": "val"}}] if where == "pass" else [{"score_magnitude": {}}]
    recipe = small_recipe(tmp_path / "r", passes)
    if where == "evaluation":
        recipe["evaluation"]["split"] = "tset"
    with pytest.raises(RecipeError, match="unknown split.*Did you mean"):
        run_recipe(write_recipe, registry, recipe)
    assert not (tmp_path / "r").exists()


def test_calibrating_on_the_report_split_is_refused(write_recipe, registry, tmp_path):
    recipe = small_recipe(tmp_path / "r", [{"score_taylor": {"split": "validation"}}])
    recipe["evaluation"]["split"] = "validation"
    with pytest.raises(RecipeError, match="calibrate on 'validation'"):
        run_recipe(write_recipe, registry, recipe)


def test_hf_reference_to_an_export_loads_the_export(write_recipe, registry, tmp_path):
    out = tmp_path / "a"
    first = run_recipe(write_recipe, registry, small_recipe(out, PRUNE))
    recipe = small_recipe(tmp_path / "b", [{"score_magnitude": {}}])
    recipe["model"] = {"hf": str(out / "model")}
    report = run_recipe(write_recipe, registry, recipe)
    assert report["baseline"]["params"] == first["final"]["params"]


def test_config_only_directory_is_a_load_error(write_recipe, registry, tmp_path):
    from tests.conftest import make_adapter
    make_adapter().model.config.save_pretrained(tmp_path / "m")
    recipe = small_recipe(tmp_path / "r", [{"score_magnitude": {}}])
    recipe["model"] = {"path": str(tmp_path / "m")}
    with pytest.raises(MMPruneError, match="could not be loaded"):
        run_recipe(write_recipe, registry, recipe)


def test_out_that_is_a_file(write_recipe, registry, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        run_recipe(write_recipe, registry, small_recipe(tmp_path / "f", [{"score_magnitude": {}}]))


def test_set_is_not_blamed_for_unrelated_errors(write_recipe, registry):
    err = pytest.raises(RecipeError, load_recipe, write_recipe("data: {synthetic: retrieval}\npasses: [export]\n"),
                        registry, ("seed=3",)).value
    assert "--set" not in str(err) and "missing required field 'model'" in str(err)


def test_non_utf8_recipe(tmp_path, registry):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model: {tiny: clip}\n\xff\xfe")
    with pytest.raises(RecipeError, match="UTF-8"):
        load_recipe(path, registry)


@pytest.mark.parametrize("seed", [-1, 2**64, "1"])
def test_seed_bounds(write_recipe, registry, tmp_path, seed):
    with pytest.raises(RecipeError, match="seed"):
        load_recipe(write_recipe(small_recipe(tmp_path / "r", [{"export": {}}], seed=seed)), registry)


def test_prune_params_checked_at_validation(write_recipe, registry, tmp_path):
    for bad, msg in (({"scope": "per_tower", "metric": "params"}, "per_tower"),
                     ({"score": "metrics"}, "score fact")):
        with pytest.raises(RecipeError, match=msg):
            load_recipe(write_recipe(small_recipe(tmp_path / "r", [{"prune_structured": bad}])), registry)


def test_evaluate_pass_times_like_the_report(write_recipe, registry, tmp_path):
    recipe = small_recipe(tmp_path / "r", [{"evaluate": {}}])
    recipe["evaluation"].update(latency_batch_size=5, latency_repeats=4)
    run_recipe(write_recipe, registry, recipe)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["latency"]["batch_size"] == 5
    assert report["evaluations"][0]["latency_ms"] > 0


def test_corrupt_run_json_on_resume(write_recipe, registry, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="unreadable"):
        run_recipe(write_recipe, registry, small_recipe(out, [{"export": {}}]), resume=True)
