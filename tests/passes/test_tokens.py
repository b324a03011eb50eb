"""token_prune end to end on a tiny LLaVA: FLOPs target, report, export and reload."""
from __future__ import annotations

import json

import pytest

from mmprune.errors import MMPruneError
from tests.conftest import run_recipe, small_llava_recipe, small_recipe


def test_pdrop_hits_a_flops_target_and_the_export_reloads_it(write_recipe, registry, tmp_path):
    out = tmp_path / "run"
    report = run_recipe(write_recipe, registry, small_llava_recipe(out, [
        {"token_prune": {"method": "pdrop", "layers": [1], "flops_target": 0.15}}, {"export": {}}]))
    state = report["state"]["token_prune"]
    assert state["position"] == "renumber" and state["probe"] == "current"
    assert state["sites"][0][0] == 1 and 0 < state["sites"][0][1] < 1
    # sized on validation, measured on test: the prompts differ, the image tokens do not
    assert report["ratios"]["flops_reduction"] == pytest.approx(0.15, abs=0.01)
    assert report["final"]["params"] == report["baseline"]["params"]
    # generation is timed in two phases, dense and pruned interleaved
    for side in ("baseline", "final"):
        g = report[side]["generation"]
        assert g["ttft_ms"] > 0 and g["decode_ms_per_token"] >= 0
    assert report["ratios"]["ttft_speedup"] > 0
    assert "time to first token" in (out / "report.md").read_text()
    spec = json.loads((out / "model" / "mmprune.json").read_text())
    assert spec["token_policy"]["decoder"]["sites"] == state["sites"]
    again = {**small_llava_recipe(tmp_path / "again", [{"evaluate": {}}]),
             "model": {"path": str(out / "model")}}
    reloaded = run_recipe(write_recipe, registry, again)
    assert reloaded["baseline"]["metrics"] == report["final"]["metrics"]
    assert reloaded["baseline"]["flops"] == pytest.approx(report["final"]["flops"])


def test_fastv_keeping_every_token_changes_nothing(write_recipe, registry, tmp_path):
    report = run_recipe(write_recipe, registry, small_llava_recipe(tmp_path / "run", [
        {"token_prune": {"method": "fastv", "layers": [1], "keep": 1.0}}]))
    assert report["state"]["token_prune"]["position"] == "keep_original"
    assert report["final"]["metrics"] == report["baseline"]["metrics"]
    assert report["final"]["flops"] == pytest.approx(report["baseline"]["flops"])


def test_fastv_takes_one_site_and_clip_has_no_decoder(write_recipe, registry, tmp_path):
    with pytest.raises(MMPruneError, match="one site"):
        run_recipe(write_recipe, registry, small_llava_recipe(tmp_path / "a", [
            {"token_prune": {"method": "fastv", "layers": [1, 2]}}]))
    with pytest.raises(MMPruneError, match="no decoder LLM"):
        run_recipe(write_recipe, registry, small_recipe(tmp_path / "b", [{"token_prune": {}}]))
