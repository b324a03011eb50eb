"""Zoo: every model trains for a few real steps and its loss goes down; saved models reload exactly."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer

from mmprune.data.batching import collate_rows
from mmprune.models.clip import CLIPAdapter
from mmprune.zoo.build import MANIFEST, build, is_built, zoo_dir
from mmprune.zoo.catalog import CATALOG

# each entry's own learning rate; 120 steps of 32 over 256 examples is enough to learn at it
SMOKE = {"steps": 120, "batch_size": 32, "warmup": 10,
         "data": {"train_size": 256, "validation_size": 64, "test_size": 64}}


@pytest.fixture(scope="module")
def smoke_builds(tmp_path_factory):
    """A reduced build of every zoo model: real architecture, real data, 40 real steps."""
    root = tmp_path_factory.mktemp("zoo")
    return {name: build(name, override=SMOKE, directory=root / name, progress=False, log=lambda m: None)
            for name in CATALOG}


@pytest.mark.parametrize("name", list(CATALOG))
def test_loss_goes_down(smoke_builds, name):
    m = json.loads((smoke_builds[name] / MANIFEST).read_text())
    # contrastive loss at chance is ln(batch): learning means ending clearly below it
    assert m["loss_last"] < math.log(SMOKE["batch_size"]) - 0.3, m["loss_curve"]
    assert m["loss_last"] < m["loss_first"] * 0.9, m["loss_curve"]
    assert m["entry"]["steps"] == 120 and m["params"] > 1_000_000
    assert set(m["metrics"]["test"]) >= {"r1_mean"}


@pytest.mark.parametrize("name", list(CATALOG))
def test_saved_model_reloads_with_from_pretrained_identically(smoke_builds, name):
    from datasets import Dataset
    d = smoke_builds[name]
    model = CLIPAdapter.model_class.from_pretrained(d).eval()
    adapter = CLIPAdapter(model, AutoTokenizer.from_pretrained(d), AutoImageProcessor.from_pretrained(d))
    from mmprune.data.minivl.source import MiniVLParams, load_task
    data = load_task(MiniVLParams(task=CATALOG[name].task, **SMOKE["data"]))
    batch = collate_rows(adapter, data["test"], list(range(4)))
    again = CLIPAdapter.model_class.from_pretrained(d).eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits_per_image, again(**batch).logits_per_image)
    assert isinstance(data["test"], Dataset)


def test_build_is_cached_and_not_repeated(smoke_builds, tmp_path):
    name = next(iter(CATALOG))
    before = (smoke_builds[name] / MANIFEST).stat().st_mtime_ns
    build(name, override=SMOKE, directory=smoke_builds[name], progress=False, log=lambda m: None)
    assert (smoke_builds[name] / MANIFEST).stat().st_mtime_ns == before
    assert not is_built(name) and str(zoo_dir(name)).startswith(str(tmp_path.parents[2]))
