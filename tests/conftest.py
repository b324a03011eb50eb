"""Shared fixtures: tiny CLIP models built from configs, their data, and recipe writing."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmprune.context import Context
from mmprune.data.synthetic import SyntheticParams, SyntheticSource
from mmprune.graph import trace
from mmprune.models.clip import CLIPAdapter
from mmprune.plugins.manager import get_registry

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """MiniVL data and zoo models go to a per-session cache, never the user's."""
    path = tmp_path_factory.mktemp("mmprune-cache")
    old = os.environ.get("MMPRUNE_CACHE")
    os.environ["MMPRUNE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MMPRUNE_CACHE", None)
    else:
        os.environ["MMPRUNE_CACHE"] = old


@pytest.fixture(scope="session")
def registry():
    return get_registry()


def make_adapter(seed: int = 0, attn: str = "sdpa", **overrides) -> CLIPAdapter:
    model = CLIPAdapter.tiny_model(seed, overrides or None)
    model.set_attn_implementation(attn)
    return CLIPAdapter(model, *CLIPAdapter.default_processors(model))


@pytest.fixture
def adapter() -> CLIPAdapter:
    return make_adapter()


@pytest.fixture
def ctx(adapter) -> Context:
    data = SyntheticSource(SyntheticParams(task="retrieval", train_size=64, validation_size=32,
                                           test_size=32), seed=0).load(adapter)
    return Context(adapter, trace(adapter), data, "retrieval", seed=0, show_progress=False)


def clone(adapter: CLIPAdapter) -> CLIPAdapter:
    return CLIPAdapter(copy.deepcopy(adapter.model), adapter.tokenizer, adapter.image_processor)


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe (dict or text) to tmp_path and return its path."""
    def write(content, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path
    return write


def small_recipe(out: Path, passes: list, **extra) -> dict:
    recipe = {"model": {"tiny": "clip"},
              "data": {"synthetic": "retrieval", "train_size": 64, "validation_size": 32, "test_size": 32},
              "passes": passes,
              "evaluation": {"latency_batch_size": 8, "latency_repeats": 3, "latency_warmup": 1},
              "output": str(out), "seed": 0}
    recipe.update(extra)
    return recipe


def small_llava_recipe(out: Path, passes: list, config: dict | None = None, **sizes) -> dict:
    """A tiny LLaVA on MiniVL instruct (32 examples per split unless `sizes` says otherwise)."""
    model = {"tiny": "llava", **({"config": config} if config else {})}
    return {"model": model,
            "data": {"minivl": "instruct", "train_size": 32, "validation_size": 32, "test_size": 32,
                     **sizes},
            "passes": passes,
            "evaluation": {"latency_batch_size": 4, "latency_repeats": 3, "latency_warmup": 1},
            "output": str(out), "seed": 0}


def run_recipe(write_recipe, registry, recipe: dict) -> dict:
    """Write `recipe` and run it quietly; the report."""
    from mmprune.pipeline import run
    from mmprune.recipe import load_recipe

    return run(load_recipe(write_recipe(recipe), registry), registry, show_progress=False,
               log=lambda m: None)


@pytest.fixture(scope="session")
def toy_plugin_path(tmp_path_factory) -> Path:
    """The third-party plugin package in tests/fixtures, pip-installed into a private target dir."""
    import shutil

    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "toy_plugin"  # build outside the repo: no litter, no races
    shutil.copytree(FIXTURES / "toy_plugin", source)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True)
    return target


def cli_env(*paths: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    return env


def loss_after_steps(adapter, batch: dict, task: str, steps: int = 15, lr: float = 2e-3) -> tuple[float, float]:
    """(loss before, loss after) `steps` AdamW steps on one batch: a real short training run."""
    opt = torch.optim.AdamW(adapter.model.parameters(), lr=lr)
    adapter.model.train()
    first = float(adapter.task_loss(batch, task))
    for _ in range(steps):
        opt.zero_grad()
        adapter.task_loss(batch, task).backward()
        opt.step()
    return first, float(adapter.task_loss(batch, task))


def export_test_metrics(model_dir: Path) -> dict[str, float]:
    """Test metrics of an exported tiny-CLIP run, recomputed from the export alone."""
    from mmprune.saved import load_bundle

    b = load_bundle(model_dir)
    data = SyntheticSource(SyntheticParams(task="retrieval", train_size=64, validation_size=32,
                                           test_size=32), seed=0).load(b.adapter)
    ctx = Context(b.adapter, b.graph, data, "retrieval", show_progress=False)
    with torch.inference_mode():
        return b.adapter.evaluate(ctx.batches("test", 32), "retrieval")
