"""Recipe loading: every bad input names file, line, field and the nearest valid name."""
from __future__ import annotations

import pytest

from mmprune.errors import RecipeError
from mmprune.recipe import load_recipe, recipe_json_schema

GOOD = """\
model:
  tiny: clip
data:
  synthetic: retrieval
passes:
  - score_taylor:
      batches: 2
  - prune_structured:
      target: 0.5
  - export: {}
"""


def error_of(path, registry, overrides=()) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry, overrides)
    return info.value


def test_good_recipe_parses_with_defaults(write_recipe, registry):
    r = load_recipe(write_recipe(GOOD), registry)
    assert [p.name for p in r.passes] == ["score_taylor", "prune_structured", "export"]
    assert r.passes[1].params.target == 0.5 and r.passes[1].params.metric == "flops"
    assert r.output.endswith("recipe") and r.seed == 0 and r.evaluation.split == "test"


def test_missing_file(tmp_path, registry):
    err = error_of(tmp_path / "nope.yaml", registry)
    assert "not found" in str(err) and "nope.yaml" in str(err)


def test_malformed_yaml_names_line(write_recipe, registry):
    err = error_of(write_recipe("model:\n  tiny: clip\npasses: [\n  - x: {\n"), registry)
    assert "malformed YAML" in str(err) and err.line is not None and err.file.endswith("recipe.yaml")


def test_unknown_pass_suggests_nearest(write_recipe, registry):
    err = error_of(write_recipe(GOOD.replace("prune_structured", "prune_structurd")), registry)
    assert err.line == 8 and err.field == "passes.1.prune_structurd"
    assert "unknown pass 'prune_structurd'" in str(err) and "Did you mean 'prune_structured'" in str(err)


def test_unknown_parameter_suggests_nearest(write_recipe, registry):
    err = error_of(write_recipe(GOOD.replace("target: 0.5", "targte: 0.5")), registry)
    assert err.line == 9 and err.field == "passes.1.prune_structured.targte"
    assert "Did you mean 'target'" in str(err)


def test_wrong_parameter_type(write_recipe, registry):
    err = error_of(write_recipe(GOOD.replace("batches: 2", "batches: many")), registry)
    assert err.line == 7 and err.field == "passes.0.score_taylor.batches"
    assert "integer" in str(err) and "'many'" in str(err)


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_target_outside_unit_interval(write_recipe, registry, value):
    err = error_of(write_recipe(GOOD.replace("target: 0.5", f"target: {value}")), registry)
    assert err.field == "passes.1.prune_structured.target" and err.line == 9
    assert "'target'" in str(err)


def test_unknown_top_level_field(write_recipe, registry):
    err = error_of(write_recipe(GOOD + "sead: 3\n"), registry)
    assert err.line == 11 and "Did you mean 'seed'" in str(err)


def test_unknown_dataset_source(write_recipe, registry):
    err = error_of(write_recipe(GOOD.replace("synthetic: retrieval", "synthetik: retrieval")), registry)
    assert err.line == 4 and "Did you mean 'synthetic'" in str(err)


def test_model_needs_exactly_one_source(write_recipe, registry):
    err = error_of(write_recipe(GOOD.replace("tiny: clip", "tiny: clip\n  hf: openai/clip")), registry)
    assert err.field == "model" and "exactly one" in str(err)


def test_override_sets_nested_field(write_recipe, registry):
    r = load_recipe(write_recipe(GOOD), registry, ("passes.1.prune_structured.target=0.7", "seed=5"))
    assert r.passes[1].params.target == 0.7 and r.seed == 5
    assert r.raw["passes"][1]["prune_structured"]["target"] == 0.7


def test_override_into_empty_params(write_recipe, registry):
    r = load_recipe(write_recipe(GOOD), registry, ("passes.2.export.path=/tmp/x",))
    assert r.passes[2].params.path == "/tmp/x"


def test_bad_override_value_says_it_came_from_set(write_recipe, registry):
    err = error_of(write_recipe(GOOD), registry, ("passes.1.prune_structured.target=2",))
    assert "--set passes.1.prune_structured.target=2" in str(err)


def test_override_index_out_of_range(write_recipe, registry):
    err = error_of(write_recipe(GOOD), registry, ("passes.9.export.path=x",))
    assert "passes.9" in str(err)


def test_schema_lists_every_pass(registry):
    schema = recipe_json_schema(registry)
    names = {next(iter(item["properties"])) for item in schema["properties"]["passes"]["items"]["anyOf"]}
    assert {"score_taylor", "score_magnitude", "prune_structured", "quantize", "evaluate", "export"} <= names
    target = next(i for i in schema["properties"]["passes"]["items"]["anyOf"]
                  if "prune_structured" in i["properties"])["properties"]["prune_structured"]["anyOf"][0]
    assert target["properties"]["target"]["exclusiveMaximum"] == 1.0


def test_every_pass_parameter_is_documented_and_defaulted(registry):
    for name, cls in registry.passes.items():
        for field, info in cls.Params.model_fields.items():
            assert info.description, f"{name}.{field} has no description"
            assert not info.is_required(), f"{name}.{field} has no default"


def test_config_overrides_only_for_tiny_models(write_recipe, registry):
    err = error_of(write_recipe(GOOD.replace("tiny: clip", "path: /m\n  config: {projection_dim: 8}")), registry)
    assert err.field == "model" and "tiny" in str(err)
    r = load_recipe(write_recipe(GOOD.replace("tiny: clip", "tiny: clip\n  config: {projection_dim: 8}")),
                    registry)
    assert r.model.config == {"projection_dim": 8}
