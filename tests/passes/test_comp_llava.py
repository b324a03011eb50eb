"""The comp pass on a tiny LLaVA: decoder heads / channels and in-LLM image and instruction
tokens pruned jointly to a FLOPs target; the ViT untouched; the export reloads the θ sites."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_recipe, small_llava_recipe

FAST = dict(stage_quantum=0.1, k_min=2, search_steps=4, warmup_steps=2, batch_size=8,
            eval_batch_size=16, v_sub=16, probe_set=16, lr=1e-4, cost_metric="val_loss")


def _recipe(out, passes):
    return small_llava_recipe(out, passes, {"text_config": {"num_hidden_layers": 4}},
                              validation_size=16, test_size=16)


def test_comp_prunes_the_decoder_and_its_tokens_and_the_export_reloads(write_recipe, registry,
                                                                       tmp_path):
    out = tmp_path / "run"
    report = run_recipe(write_recipe, registry, _recipe(out, [{"comp": {**FAST, "target": 0.3}},
                                                        {"export": {}}]))
    state = report["state"]["comp"][0]
    assert state["modes"] == ["vision_tokens", "language_tokens", "language_params"]
    traj = state["trajectory"]
    assert [t["mode"] for t in traj[1:4]] == state["modes"]      # warm-up round
    assert state["final_flops"] <= state["target"] + 0.005 + 1e-9
    assert report["ratios"]["flops_reduction"] >= 0.2
    # only the decoder lost units; the ViT and projector are whole
    base, final = report["baseline"], report["final"]
    assert final["params"] < base["params"]
    spec = json.loads((out / "model" / "mmprune.json").read_text())
    structure = spec["structure"]
    assert all(len(g["kept"]) == g["total"] for gid, g in structure.items() if gid.startswith("vision"))
    assert any(len(g["kept"]) < g["total"] for gid, g in structure.items() if gid.startswith("language"))
    decoder = spec["token_policy"]["decoder"]
    assert decoder["theta"] == state["thresholds"]
    assert state["thresholds"]["vision_tokens"] > 0 and state["thresholds"]["language_tokens"] > 0
    assert [layer for layer, _ in decoder["sites"]] == [1, 2, 3]
    again = {**_recipe(tmp_path / "again", [{"evaluate": {}}]), "model": {"path": str(out / "model")}}
    reloaded = run_recipe(write_recipe, registry, again)
    assert reloaded["baseline"]["metrics"] == report["final"]["metrics"]
    assert reloaded["baseline"]["flops"] == pytest.approx(report["final"]["flops"])


def test_the_vit_is_not_a_mode_on_llava(write_recipe, registry, tmp_path):
    from mmprune.errors import MMPruneError
    with pytest.raises(MMPruneError, match="vision_params"):
        run_recipe(write_recipe, registry, _recipe(tmp_path / "run", [
            {"comp": {**FAST, "modes": ["vision_params", "language_params"]}}]))


def test_a_decoder_takes_one_token_floor_for_both_modes(write_recipe, registry, tmp_path):
    from mmprune.errors import MMPruneError
    floors = {"vision_tokens": 0.05, "language_tokens": 0.5}
    with pytest.raises(MMPruneError, match="give min_token_frac one value"):
        run_recipe(write_recipe, registry, _recipe(tmp_path / "run", [
            {"comp": {**FAST, "min_token_frac": floors}}]))


def test_finetune_holds_a_decoder_scoped_target_in_decoder_flops(write_recipe, registry, tmp_path):
    report = run_recipe(write_recipe, registry, _recipe(tmp_path / "run", [
        {"comp": {**FAST, "target": 0.3, "flops_scope": "decoder"}},
        {"finetune": {"steps": 2, "batch_size": 8, "lr": 1e-4, "eval_every": 1}}]))
    comp, ft = report["state"]["comp"][0], report["state"]["finetune"][0]
    assert ft["flops_tower"] == comp["flops_tower"] == "language"
    assert ft["flops_limit"] == pytest.approx((comp["target"] + 0.005) * comp["dense_flops"])
    # decoder FLOPs against a decoder limit: the whole model's (ViT included) would never fit
    assert all(h["within_target"] for h in ft["history"])
    assert all(h["flops"] < report["final"]["flops"] for h in ft["history"])
