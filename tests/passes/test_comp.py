"""The comp pass end to end on a tiny CLIP: hits the target, removes units, keeps token pruning."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from mmprune.pipeline import run
from mmprune.recipe import load_recipe
from mmprune.saved import load_bundle
from tests.conftest import export_test_metrics, small_recipe

FAST = dict(stage_quantum=0.1, k_min=2, search_steps=4, warmup_steps=2, batch_size=8,
            eval_batch_size=16, v_sub=32, probe_set=32, lr=1e-4)


def _run(write_recipe, registry, out, comp: dict):
    recipe = small_recipe(out, [{"comp": {**FAST, **comp}}, {"export": {}}])
    return run(load_recipe(write_recipe(recipe), registry), registry, show_progress=False,
               log=lambda m: None)


def test_comp_reaches_the_target_and_exports(write_recipe, registry, tmp_path):
    out = tmp_path / "run"
    report = _run(write_recipe, registry, out, {"target": 0.4})
    state = report["state"]["comp"][0]
    traj = state["trajectory"]
    # warm-up visits each mode once, in the canonical order
    assert [t["mode"] for t in traj[1:5]] == ["vision_tokens", "language_tokens", "vision_params",
                                               "language_params"]
    assert state["final_flops"] <= state["target"] + 0.005 + 1e-9
    # each stage removes at most a quantum (plus one unit's worth) and the flops fall monotonically
    flops = [t["flops"] for t in traj]
    assert all(b <= a + 1e-9 for a, b in zip(flops, flops[1:]))
    # on the probe set a token stage removes its quantum ± 10%, a parameter stage at least it
    for t in traj[1:]:
        if t["last"]:       # a mode's final stage takes what is left, less than a quantum
            assert t["planned"] < t["quantum"]
        elif t["mode"].endswith("tokens"):
            assert 0.9 * t["quantum"] <= t["planned"] <= 1.1 * t["quantum"], t
        else:   # within the cap once the token counts its masks cause are measured
            assert t["planned"] <= 1.05 * t["cap"] + 1e-9 or sum(t["units"].values()) == 1, t
    assert report["ratios"]["flops_reduction"] >= 0.3   # measured on test, sized on validation
    assert report["final"]["params"] < report["baseline"]["params"]
    assert (out / "plots" / "mps_modes.png").stat().st_size > 5000
    spec = json.loads((out / "model" / "mmprune.json").read_text())
    assert spec["token_policy"]["towers"]
    bundle = load_bundle(out / "model")
    assert bundle.spec["token_policy"] == spec["token_policy"]
    # the export reproduces the reported test metrics with its token pruning restored
    assert export_test_metrics(out / "model") == report["final"]["metrics"]


def test_median_memory_stride_exploration_and_max_run_reach_the_scheduler(write_recipe, registry,
                                                                         tmp_path):
    """Median memory prices each mode by its last stage costs; stride exploration explores at
    every 1/ρ-th choice after the warm-up; max_run 1 never runs a mode twice in a row (one run
    for all three: a search this long is slow)."""
    report = _run(write_recipe, registry, tmp_path / "run",
                  {"target": 0.5, "stage_quantum": 0.05, "cost_memory": "median",
                   "cost_window": 3, "exploration": "stride", "rho": 0.5, "max_run": 1})
    traj = report["state"]["comp"][0]["trajectory"][1:]
    seen: dict[str, list[float]] = {}
    for t in traj:
        seen.setdefault(t["mode"], []).append(t["r"])
        assert t["costs"][t["mode"]] == pytest.approx(statistics.median(seen[t["mode"]][-3:]))
    assert max(len(v) for v in seen.values()) > 3      # some mode's median dropped a cost
    whys = [t["why"] for t in traj if t["why"] != "warm-up"]
    assert "explore" in whys and all(a != b for a, b in zip(whys, whys[1:])), whys
    modes = [t["mode"] for t in traj]
    assert all(a != b for a, b in zip(modes, modes[1:])), modes


def test_round_robin_schedule_runs_the_modes_in_turn(write_recipe, registry, tmp_path):
    report = _run(write_recipe, registry, tmp_path / "run", {"target": 0.4, "schedule": "round_robin"})
    traj = [t for t in report["state"]["comp"][0]["trajectory"][1:] if t["mode"] is not None]
    assert {t["why"] for t in traj} == {"turn"}
    order = ["vision_tokens", "language_tokens", "vision_params", "language_params"]
    # each stage's mode is the next in the ring after the one before it, skipping modes done
    # for good (they never come back)
    for i, (a, b) in enumerate(zip(traj, traj[1:])):
        later = {t["mode"] for t in traj[i + 1:]}
        after = order.index(a["mode"]) + 1
        assert b["mode"] == next(m for m in order[after:] + order[:after] if m in later), (a, b)
    assert [t["mode"] for t in traj[:4]] == order


def test_the_search_trains_against_the_dense_teacher(ctx, monkeypatch):
    from mmprune.passes.comp import Comp, CompParams
    from mmprune.training import Trainer
    from tests.conftest import clone

    teacher = clone(ctx.adapter)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    asked = []
    logits = teacher.distill_logits
    teacher.distill_logits = lambda batch: asked.append(len(batch["input_ids"])) or logits(batch)
    ctx.load_dense = lambda: teacher
    built = []
    monkeypatch.setattr("mmprune.passes.comp.Trainer",
                        lambda *a, **k: built.append(k) or Trainer(*a, **k))
    Comp(CompParams(**{**FAST, "target": 0.2, "v_sub": 16, "probe_set": 16}, kd_weight=0.5,
                    kd_temperature=2.0)).run(ctx)
    assert [(k["teacher"], k["kd_weight"], k["kd_temperature"]) for k in built] == [(teacher, 0.5, 2.0)]
    steps = sum(1 for t in ctx.state["comp"][0]["trajectory"] if t["mode"]) * FAST["k_min"]
    assert len(asked) >= FAST["warmup_steps"] + steps     # every training step consulted it
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())


def test_param_only_mode_leaves_tokens_alone(write_recipe, registry, tmp_path):
    report = _run(write_recipe, registry, tmp_path / "run",
                  {"target": 0.3, "modes": ["vision_params", "language_params"],
                   "max_stage_share": 0.15})
    state = report["state"]["comp"][0]
    stages = state["trajectory"][1:]
    assert {t["mode"] for t in stages} <= {"vision_params", "language_params"}
    assert report["final"]["params"] < report["baseline"]["params"]
    # the cap binds: stages take less than the quantum without retiring their mode
    capped = [t for t in stages if t["cap"] < t["quantum"] - 1e-9]
    assert capped and all(not t["last"] and t["planned"] < t["quantum"] for t in capped)
    assert state["final_flops"] <= state["target"] + 0.005 + 1e-9


def test_param_quantum_caps_each_parameter_stage(write_recipe, registry, tmp_path):
    report = _run(write_recipe, registry, tmp_path / "run",
                  {"target": 0.25, "modes": ["vision_params", "language_params"],
                   "param_quantum": 0.01})
    stages = report["state"]["comp"][0]["trajectory"][1:]
    # the FLOPs quantum (10%) alone would take several times more parameters per stage
    assert stages and all(t["param_share"] <= 0.01 or sum(t["units"].values()) == 1 for t in stages)
    assert all(not t["last"] for t in stages if t["planned"] < t["quantum"] - 1e-9
               and t["param_share"] > 0.009)
    assert max(t["param_share"] for t in stages) > 0.005   # the cap is what bounds them


def _flops_removed(f_before: float, f_after: float, stage: dict) -> float:
    """Eq. 3's denominator as the scheduler takes it: at least half the stage's plan, and ε_F."""
    return max(f_before - f_after, 0.5 * max(stage["planned"], stage["nominal"]), 1e-6)


@pytest.mark.parametrize("lr", [1e-12, 1e-2])
def test_plan_pricing_measures_the_plan_before_training(write_recipe, registry, tmp_path, lr):
    report = _run(write_recipe, registry, tmp_path / "run",
                  {"target": 0.3, "cost_at": "plan", "cost_metric": "val_loss", "lr": lr})
    traj = report["state"]["comp"][0]["trajectory"]
    for before, t in zip(traj, traj[1:]):
        removed = _flops_removed(before["flops"], t["priced_flops"], t)
        assert t["r"] == pytest.approx((before["quality"] - t["priced_quality"]) / removed)
    # the plan is priced in full: without training a stage ends exactly where it was priced;
    # with training the stage's own quality moves away from the price
    gaps = [abs(t["quality"] - t["priced_quality"]) for t in traj[1:]]
    if lr < 1e-6:
        assert max(gaps) < 1e-3 and all(t["flops"] == pytest.approx(t["priced_flops"]) for t in traj[1:])
    else:
        assert max(gaps) > 0.1


@pytest.mark.parametrize("lr", [1e-12, 1e-2])
def test_paired_pricing_compares_the_stage_end_with_its_cut_put_back(write_recipe, registry,
                                                                     tmp_path, lr):
    report = _run(write_recipe, registry, tmp_path / "run",
                  {"target": 0.3, "cost_at": "paired", "cost_metric": "val_loss", "lr": lr})
    traj = report["state"]["comp"][0]["trajectory"]
    for before, t in zip(traj, traj[1:]):
        removed = _flops_removed(before["flops"], t["flops"], t)
        assert t["r"] == pytest.approx((t["paired_quality"] - t["quality"]) / removed)
    # without training, putting the cut back is the state the stage started from; with training
    # the reference moves with the weights
    gaps = [abs(t["paired_quality"] - before["quality"]) for before, t in zip(traj, traj[1:])]
    if lr < 1e-6:
        assert max(gaps) < 1e-3
    else:
        assert max(gaps) > 0.1


def test_unknown_mode_is_a_clear_error(write_recipe, registry, tmp_path):
    from mmprune.errors import MMPruneError
    with pytest.raises(MMPruneError, match="cross_params"):
        _run(write_recipe, registry, tmp_path / "run", {"modes": ["cross_params"]})


def test_a_decoder_scope_without_a_decoder_is_a_clear_error(write_recipe, registry, tmp_path):
    from mmprune.errors import MMPruneError
    with pytest.raises(MMPruneError, match="flops_scope 'decoder' needs a decoder LLM"):
        _run(write_recipe, registry, tmp_path / "run", {"flops_scope": "decoder"})


def test_a_token_floor_and_a_token_score_per_mode(write_recipe, registry, tmp_path):
    """One run for both (a search is slow): a floor of 1 keeps the text tokens whole, and the
    image tokens ranked by distinctiveness are exported so."""
    out = tmp_path / "run"
    report = _run(write_recipe, registry, out,
                  {"target": 0.3, "modes": ["vision_tokens", "language_tokens", "vision_params"],
                   "min_token_frac": {"language_tokens": 1.0},
                   "token_score": {"vision_tokens": "distinct"}})
    state = report["state"]["comp"][0]
    # every caption token is kept, so the language-token mode has nothing to remove
    assert "language_tokens" not in {t["mode"] for t in state["trajectory"][1:]}
    assert state["thresholds"]["language_tokens"] == 0 and state["thresholds"]["vision_tokens"] > 0
    towers = json.loads((out / "model" / "mmprune.json").read_text())["token_policy"]["towers"]
    assert towers["vision"]["min_keep_frac"] == 0.05 and towers["vision"]["score"] == "distinct"
    assert towers.get("language", {"score": "attention"})["score"] == "attention"
    assert towers.get("language", {"theta": 0.0})["theta"] == 0.0


def test_a_token_stage_takes_a_share_of_what_its_mode_has_left(write_recipe, registry, tmp_path):
    def stages(share):
        report = _run(write_recipe, registry, tmp_path / f"run{share}",
                      {"target": 0.6, "modes": ["language_tokens"], "token_stage_share": share})
        return report["state"]["comp"][0]["trajectory"][1:]

    # without a share, once under a quantum is left one stage drops every droppable text token
    whole = stages(1.0)
    assert whole[-1]["last"] and whole[-1]["planned"] < whole[-1]["quantum"]
    # with it each stage aims at a share of what is left, so the tower empties over priced stages
    shared = stages(0.3)
    capped = [t for t in shared if t["cap"] < t["quantum"] - 1e-9]
    assert len(capped) >= 3 and not any(t["last"] for t in shared)
    assert all(abs(t["planned"] - t["cap"]) <= 0.1 * t["cap"] for t in capped), capped
    assert all(b["cap"] < a["cap"] for a, b in zip(capped, capped[1:]))
    # ... and ends where the whole jump did, but for what it leaves: under 5% of a quantum on
    # the probe set it plans on, measured here on the validation subset (so a tenth)
    assert shared[-1]["flops"] - whole[-1]["flops"] == pytest.approx(0.0, abs=0.1 * whole[-1]["quantum"])
    assert len(shared) > len(whole)


@pytest.mark.parametrize("floor, message", [({"language_tokens": 1.5}, "lies in \\[0, 1\\]"),
                                            ({"text_tokens": 0.5}, "language_tokens")])
def test_a_bad_token_floor_is_a_clear_error(write_recipe, registry, tmp_path, floor, message):
    from mmprune.errors import MMPruneError
    with pytest.raises(MMPruneError, match=message):
        _run(write_recipe, registry, tmp_path / "run", {"min_token_frac": floor})


def test_a_bad_token_score_is_a_clear_error(write_recipe, registry, tmp_path):
    from mmprune.errors import MMPruneError
    with pytest.raises(MMPruneError, match="token_score"):
        _run(write_recipe, registry, tmp_path / "run", {"token_score": {"vision_tokens": "entropy"}})


def test_calibrated_lookahead_adds_each_modes_recent_gap_to_its_plan_price(write_recipe, registry,
                                                                          tmp_path):
    report = _run(write_recipe, registry, tmp_path / "run",
                  {"target": 0.3, "cost_at": "lookahead", "lookahead_calibration": True,
                   "cost_metric": "val_loss", "rho": 0.0, "lookahead_margin": 1e9})
    state = report["state"]["comp"][0]
    stages = state["trajectory"][1:]
    assert state["final_flops"] <= state["target"] + 0.005 + 1e-9
    gaps: dict[str, list[float]] = {}
    for t in stages:
        for mode, price in t["lookahead"].items():
            recent = gaps.get(mode, [])[-3:]
            assert price == pytest.approx(t["plan_prices"][mode] + (sum(recent) / len(recent) if recent else 0.0))
        if t["mode"] not in gaps:       # a mode's first stage is its warm-up, whatever its price
            assert t["why"] == "warm-up"
        else:                           # then ρ = 0: the cheapest calibrated price
            assert t["mode"] == min(t["lookahead"], key=t["lookahead"].get)
        gaps.setdefault(t["mode"], []).append(t["r"] - t["plan_prices"][t["mode"]])
    assert len(gaps) >= 3 and any(g != pytest.approx(0.0) for v in gaps.values() for g in v)


def test_calibration_without_lookahead_is_a_clear_error(write_recipe, registry, tmp_path):
    from mmprune.errors import MMPruneError
    with pytest.raises(MMPruneError, match="needs cost_at 'lookahead', not 'stage_end'"):
        _run(write_recipe, registry, tmp_path / "run", {"lookahead_calibration": True})


def test_a_mode_is_retired_before_a_stage_under_its_share_of_a_quantum(write_recipe, registry,
                                                                        tmp_path):
    def small(report):
        return [t for t in report["state"]["comp"][0]["trajectory"][1:]
                if max(t["planned"], t["nominal"]) < 0.5 * t["quantum"]]

    params = {"target": 0.4, "max_stage_share": 0.15}
    assert small(_run(write_recipe, registry, tmp_path / "a", params))   # such stages run by default
    report = _run(write_recipe, registry, tmp_path / "b", {**params, "retire_below": 0.5})
    assert not small(report)
    state = report["state"]["comp"][0]
    assert state["final_flops"] <= state["target"] + 0.005 + 1e-9


@pytest.mark.parametrize("cost_at, refuse, margin", [("lookahead", False, 0.0),
                                                     ("lookahead", False, 1e9),
                                                     ("stage_end", True, 0.0)])
def test_lookahead_prices_every_mode_and_refuses_the_dear_ones(write_recipe, registry, tmp_path,
                                                               cost_at, refuse, margin):
    report = _run(write_recipe, registry, tmp_path / "run",
                  {"target": 0.3, "cost_at": cost_at, "refuse_dear_plans": refuse,
                   "cost_metric": "val_loss", "rho": 1.0, "lookahead_margin": margin})
    state = report["state"]["comp"][0]
    stages = state["trajectory"][1:]
    assert state["final_flops"] <= state["target"] + 0.005 + 1e-9
    assert len(stages[0]["lookahead"]) == 4             # every mode priced before the first choice
    for t in stages:
        best = min(t["lookahead"], key=t["lookahead"].get)
        if cost_at == "lookahead":      # recorded at its price
            assert t["r"] == pytest.approx(t["lookahead"][t["mode"]])
        if margin == 0.0:   # only the cheapest plan is allowed, even though every draw explores
            assert t["mode"] == best and set(t["refused"]) == set(t["lookahead"]) - {best}
        else:
            assert not t["refused"]
    if margin > 0:   # exploration by staleness, not the price, picks the mode
        assert any(t["mode"] != min(t["lookahead"], key=t["lookahead"].get) for t in stages)
    if cost_at == "stage_end":      # priced after training, as without the lookahead
        assert not any(t["r"] == pytest.approx(t["lookahead"][t["mode"]]) for t in stages)
