"""Zoo: every model trains for a few real steps and its loss goes down; saved models reload exactly."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from datasets import Dataset
from transformers import AutoImageProcessor, AutoTokenizer

from mmprune.data.minivl.source import MiniVLParams, load_task
from mmprune.plugins.manager import get_registry
from mmprune.zoo.build import (MANIFEST, build, entry_record, evaluate_split, is_built, stale_fields,
                               zoo_dir)
from mmprune.zoo.catalog import CATALOG

# each entry's own learning rate; 120 steps of 32 over 256 examples is enough to learn at it
SMOKE = {"steps": 120, "batch_size": 32, "warmup": 10,
         "data": {"train_size": 256, "validation_size": 64, "test_size": 64}}


@pytest.fixture(scope="module")
def smoke_builds(tmp_path_factory):
    """A reduced build of every zoo model: real architecture, real data, 120 real steps."""
    root = tmp_path_factory.mktemp("zoo")
    built = {}
    for name, e in CATALOG.items():  # parents come first in the catalog
        override = dict(SMOKE, init_from=str(built[e.init_from])) if e.init_from else SMOKE
        built[name] = build(name, override=override, directory=root / name, progress=False,
                            log=lambda m: None)
    return built


@pytest.mark.parametrize("name", list(CATALOG))
def test_loss_goes_down(smoke_builds, name):
    m = json.loads((smoke_builds[name] / MANIFEST).read_text())
    assert m["loss_last"] < m["loss_first"] * 0.95, m["loss_curve"]
    if CATALOG[name].family == "clip":
        # contrastive loss at chance is ln(batch): learning means ending clearly below it
        assert m["loss_last"] < math.log(SMOKE["batch_size"]) - 0.3, m["loss_curve"]
    assert m["entry"]["steps"] == 120 and m["params"] > 1_000_000
    headline = get_registry().models[CATALOG[name].family].headline_metric[CATALOG[name].task]
    assert headline in m["metrics"]["test"]


@pytest.mark.parametrize("name", list(CATALOG))
def test_saved_model_reloads_with_from_pretrained_identically(smoke_builds, name):
    """The directory loads with plain transformers `from_pretrained` and reproduces, exactly, the
    test metrics the build measured on the model in memory."""
    d = smoke_builds[name]
    e = CATALOG[name]
    cls = get_registry().models[e.family]
    assert cls.model_class.__name__ in json.loads((d / "config.json").read_text())["architectures"]
    model = cls.model_class.from_pretrained(d).eval()
    adapter = cls(model, AutoTokenizer.from_pretrained(d), AutoImageProcessor.from_pretrained(d))
    data = load_task(MiniVLParams(task=e.task, **SMOKE["data"]))
    assert isinstance(data["test"], Dataset)
    manifest = json.loads((d / MANIFEST).read_text())
    assert evaluate_split(adapter, data["test"], e.task) == manifest["metrics"]["test"]


def test_llava_starts_from_the_clip_vit_and_keeps_it_frozen(smoke_builds):
    from transformers import CLIPModel, LlavaForConditionalGeneration

    clip = CLIPModel.from_pretrained(smoke_builds["clip-minivl"]).state_dict()
    llava = LlavaForConditionalGeneration.from_pretrained(smoke_builds["llava-minivl"]).state_dict()
    vit = {k: v for k, v in clip.items() if k.startswith("vision_model.")}
    assert vit
    for k, v in vit.items():
        assert torch.equal(llava["model.vision_tower." + k[len("vision_model."):]], v), k
    m = json.loads((smoke_builds["llava-minivl"] / MANIFEST).read_text())
    assert m["initialised_from"]["tensors"] == len(vit)


def test_blip_fine_tunes_start_from_the_pretrained_blip(smoke_builds):
    for name in ("blip-minivl-nlvr", "blip-minivl-vqa"):
        m = json.loads((smoke_builds[name] / MANIFEST).read_text())
        assert m["initialised_from"]["source"] == "blip-minivl"
        assert m["initialised_from"]["params"] > 500_000


def test_blip_starts_from_the_clip_vit(smoke_builds):
    """blip-minivl's ViT is clip-minivl's, converted: every block and the projection (the
    embeddings too, with CLIP's first norm folded in)."""
    m = json.loads((smoke_builds["blip-minivl"] / MANIFEST).read_text())
    assert m["initialised_from"]["source"] == "clip-minivl"
    vit_blocks = 4 * 12   # qkv, projection, 2 norms, 2 MLP Linears; weight and bias each
    assert m["initialised_from"]["tensors"] == vit_blocks + 4 + 2 + 2   # embeddings, post norm, proj


def test_build_is_cached_and_not_repeated(smoke_builds, tmp_path):
    name = next(iter(CATALOG))
    before = (smoke_builds[name] / MANIFEST).stat().st_mtime_ns
    build(name, override=SMOKE, directory=smoke_builds[name], progress=False, log=lambda m: None)
    assert (smoke_builds[name] / MANIFEST).stat().st_mtime_ns == before
    assert not is_built(name) and str(zoo_dir(name)).startswith(str(tmp_path.parents[2]))


def test_a_build_from_an_older_catalog_entry_is_flagged(smoke_builds, tmp_path, monkeypatch):
    """The cache keeps a model whatever the catalog says now: `zoo list` and loading say so."""
    from click.testing import CliRunner

    from mmprune.cli import main
    from mmprune.models.loading import load_model
    from mmprune.recipe import ModelSpec

    monkeypatch.setenv("MMPRUNE_CACHE", str(tmp_path))     # not the session's cache
    name = "blip-minivl-nlvr"
    shutil.copytree(smoke_builds[name], zoo_dir(name))
    assert set(stale_fields(name)) == set(SMOKE) | {"init_from"}     # a smoke build, reduced
    manifest = zoo_dir(name) / MANIFEST
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "entry": entry_record(CATALOG[name])}))
    assert stale_fields(name) == []
    monkeypatch.setitem(CATALOG, name, replace(CATALOG[name], steps=CATALOG[name].steps + 1,
                                               description="reworded, not retrained"))
    assert stale_fields(name) == ["steps"]

    listed = CliRunner().invoke(main, ["zoo", "list"]).output
    assert f"stale: zoo model '{name}' was built from an older catalog entry (it differs in steps)" in listed
    assert f"mmprune zoo build {name} --force" in listed
    kept = CliRunner().invoke(main, ["zoo", "build", name, "--quiet"])     # not rebuilt, but said
    assert kept.exit_code == 0 and "warning: zoo model" in kept.output and str(zoo_dir(name)) in kept.output
    logs = []
    adapter, _ = load_model(ModelSpec(zoo=name), get_registry(), 0, log=logs.append)
    assert adapter is not None and any(line.startswith("warning: zoo model") for line in logs), logs
