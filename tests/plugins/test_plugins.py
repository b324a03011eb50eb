"""Plugins: third-party packages found by entry point, broken ones skipped, registration strict."""
from __future__ import annotations

import importlib

import pytest
import torch

from mmprune.errors import PluginError
from mmprune.passes.base import Pass
from mmprune.pipeline import run
from mmprune.plugins import hookimpl
from mmprune.plugins.manager import build_registry, get_registry, make_plugin_manager
from mmprune.recipe import load_recipe
from tests.conftest import small_recipe


@pytest.fixture
def fresh_registry(monkeypatch):
    """Registry rebuilt after sys.path changes; the cached one is restored afterwards."""
    get_registry.cache_clear()
    yield lambda strict=False: (importlib.invalidate_caches(), get_registry(strict))[1]
    get_registry.cache_clear()


def broken_distribution(root, name="mmprune-broken", module="mmprune_broken"):
    """An installed-looking distribution whose `mmprune` entry point fails to import."""
    dist = root / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[mmprune]\nbroken = {module}\n")
    (root / f"{module}.py").write_text("raise ImportError('needs a library that is not installed')\n")


def test_installed_plugin_pass_runs_from_a_recipe(monkeypatch, fresh_registry, toy_plugin_path,
                                                  write_recipe, tmp_path):
    monkeypatch.syspath_prepend(str(toy_plugin_path))
    reg = fresh_registry()
    assert "toy_scale" in reg.passes and reg.origin[("passes", "toy_scale")] == "toy"
    recipe = load_recipe(write_recipe(small_recipe(tmp_path / "run", [{"toy_scale": {"factor": 2.0}}])), reg)
    report = run(recipe, reg, show_progress=False, log=lambda m: None)
    assert report["state"]["toy_scale"] == 2.0
    assert report["passes"][0]["name"] == "toy_scale"
    # the pass really changed the model: the exported LayerNorm weights are doubled
    from safetensors.torch import load_file
    ckpt = tmp_path / "run" / "checkpoints" / "000-toy_scale" / "model" / "model.safetensors"
    w = load_file(str(ckpt))["vision_model.post_layernorm.weight"]
    assert torch.allclose(w, torch.full_like(w, 2.0))


def test_broken_plugin_is_reported_and_skipped(monkeypatch, fresh_registry, tmp_path):
    broken_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = fresh_registry()
    assert [f.name for f in reg.failures] == ["broken"]
    assert "needs a library" in reg.failures[0].error
    assert "prune_structured" in reg.passes


def test_broken_plugin_is_fatal_when_strict(monkeypatch, fresh_registry, tmp_path):
    broken_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="'broken'.*failed to import"):
        fresh_registry(strict=True)


def test_cli_warns_about_broken_plugin(monkeypatch, fresh_registry, tmp_path):
    from click.testing import CliRunner

    from mmprune.cli import main
    broken_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh_registry()
    get_registry.cache_clear()
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0 and "broken" in result.output and "FAILED" in result.output
    get_registry.cache_clear()
    strict = CliRunner().invoke(main, ["plugins", "--strict-plugins"])
    assert strict.exit_code == 2 and "failed to import" in strict.output


class Duplicate(Pass):
    """Claims a built-in name."""

    name = "export"

    def run(self, ctx):
        pass


class NoRun(Pass):
    name = "no_run"


class DuplicatePlugin:
    @hookimpl
    def mmprune_passes(self):
        return [Duplicate]


class BadPlugin:
    @hookimpl
    def mmprune_passes(self):
        return [NoRun, int]


def test_duplicate_pass_name_is_an_error():
    pm, failures = make_plugin_manager(extra=(DuplicatePlugin(),))
    with pytest.raises(PluginError, match="'export', already registered by plugin 'builtin'"):
        build_registry(pm, failures)


def test_malformed_pass_class_is_an_error():
    pm, failures = make_plugin_manager(extra=(BadPlugin(),))
    with pytest.raises(PluginError, match="does not implement run"):
        build_registry(pm, failures)


def test_unknown_hook_is_rejected():
    class Typo:
        @hookimpl
        def mmprune_pases(self):
            return []
    with pytest.raises(PluginError, match="unknown hook"):
        make_plugin_manager(extra=(Typo(),))
