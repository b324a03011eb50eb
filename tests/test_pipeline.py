"""The executor: report contract, checkpoints, resume, failure marking, run-dir and source safety."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mmprune
from mmprune.errors import MMPruneError, RecipeError
from mmprune.pipeline import RunDirError, run
from mmprune.recipe import load_recipe
from tests.conftest import ROOT, cli_env, export_test_metrics, make_adapter, small_recipe

PRUNE = [{"score_taylor": {"batches": 2, "batch_size": 8}},
         {"prune_structured": {"target": 0.5}},
         {"export": {}}]


def run_recipe(write_recipe, registry, recipe: dict, **kw):
    return run(load_recipe(write_recipe(recipe), registry), registry, show_progress=False,
               log=lambda m: None, **kw)


def test_report_follows_the_contract(write_recipe, registry, tmp_path):
    out = tmp_path / "run"
    report = run_recipe(write_recipe, registry, small_recipe(out, PRUNE))
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["ratios"] == report["ratios"]
    for side in ("baseline", "final"):
        assert set(on_disk[side]) >= {"metrics", "flops", "params", "latency_ms", "size_bytes"}
        assert on_disk[side]["metrics"]["r1_mean"] >= 0 and on_disk[side]["latency_ms"] > 0
    r = on_disk["ratios"]
    assert set(r) >= {"flops_reduction", "params_reduction", "speedup"}
    assert r["flops_reduction"] >= 0.45 and r["params_reduction"] > 0 and r["speedup"] > 0
    assert r["speedup"] == pytest.approx(on_disk["baseline"]["latency_ms"] / on_disk["final"]["latency_ms"])
    assert [p["name"] for p in on_disk["passes"]] == ["score_taylor", "prune_structured", "export"]
    assert all(p["seconds"] >= 0 and p["peak_rss_mb"] > 0 for p in on_disk["passes"])
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert (out / "report.md").exists() and (out / "plots" / "structure.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "{" not in md.replace("{\"tiny\": \"clip\"}", "")  # no unformatted placeholders
    assert "interleaved" in md and f"{on_disk['final']['metrics']['r1_mean']:.2f}" in md


def test_exported_model_reproduces_final_metrics(write_recipe, registry, tmp_path):
    out = tmp_path / "run"
    report = run_recipe(write_recipe, registry, small_recipe(out, PRUNE))
    assert export_test_metrics(out / "model") == report["final"]["metrics"]


def test_requires_checked_before_any_model_loads(write_recipe, registry, tmp_path):
    recipe = small_recipe(tmp_path / "run", [{"prune_structured": {"target": 0.5}}])
    (tmp_path / "empty").mkdir()  # loading it would fail: the plan must fail first
    recipe["model"] = {"path": str(tmp_path / "empty")}
    with pytest.raises(RecipeError, match="requires 'scores.params'.*score_taylor") as info:
        run_recipe(write_recipe, registry, recipe)
    assert info.value.line is not None
    assert not (tmp_path / "run").exists()


def test_quantized_model_cannot_be_pruned_afterwards(write_recipe, registry, tmp_path):
    recipe = small_recipe(tmp_path / "run", [{"score_magnitude": {}}, {"quantize": {}},
                                             {"prune_structured": {}}])
    with pytest.raises(RecipeError, match="quantized"):
        run_recipe(write_recipe, registry, recipe)


def test_failed_run_is_marked_and_has_no_report(write_recipe, registry, tmp_path):
    out = tmp_path / "run"
    recipe = small_recipe(out, [{"score_magnitude": {}}, {"prune_structured": {"target": 0.99}}])
    with pytest.raises(MMPruneError, match="cannot be reached"):
        run_recipe(write_recipe, registry, recipe)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "cannot be reached" in info["error"]
    assert not (out / "report.json").exists() and not (out / "report.md").exists()


def test_existing_output_needs_resume_or_overwrite(write_recipe, registry, tmp_path):
    out = tmp_path / "run"
    run_recipe(write_recipe, registry, small_recipe(out, [{"score_magnitude": {}}]))
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        run_recipe(write_recipe, registry, small_recipe(out, [{"score_magnitude": {}}]))
    run_recipe(write_recipe, registry, small_recipe(out, [{"score_magnitude": {}}]), overwrite=True)


def test_overwrite_never_deletes_a_foreign_directory(write_recipe, registry, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(RunDirError, match="refusing"):
        run_recipe(write_recipe, registry, small_recipe(out, [{"score_magnitude": {}}]), overwrite=True)
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_resume_with_changed_recipe_is_refused(write_recipe, registry, tmp_path):
    out = tmp_path / "run"
    run_recipe(write_recipe, registry, small_recipe(out, [{"score_magnitude": {}}]))
    with pytest.raises(RunDirError, match="differs"):
        run_recipe(write_recipe, registry, small_recipe(out, [{"score_taylor": {}}]), resume=True)


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_source_model_on_disk_is_never_modified(write_recipe, registry, tmp_path):
    src = tmp_path / "source"
    make_adapter(seed=3).model.save_pretrained(src)
    before = _digest(src)
    recipe = small_recipe(tmp_path / "run", PRUNE + [{"quantize": {}}, {"export": {"path": str(tmp_path / "q")}}])
    recipe["model"] = {"path": str(src)}
    report = run_recipe(write_recipe, registry, recipe)
    assert report["ratios"]["flops_reduction"] >= 0.45
    assert _digest(src) == before
    bad = small_recipe(tmp_path / "run2", [{"export": {"path": str(src)}}])
    bad["model"] = {"path": str(src)}
    with pytest.raises(MMPruneError, match="source model"):
        run_recipe(write_recipe, registry, bad)
    assert _digest(src) == before


def test_resume_after_killed_run_gives_same_final_metrics(write_recipe, tmp_path, toy_plugin_path):
    """A run killed with SIGKILL mid-pass resumes after its last checkpoint to the same result."""
    gate = tmp_path / "gate"
    passes = PRUNE[:2] + [{"toy_wait_for_file": {"path": str(gate), "timeout": 120}},
                          {"evaluate": {"latency": False}}, {"export": {}}]
    env = cli_env(toy_plugin_path, ROOT)
    cmd = [sys.executable, "-m", "mmprune.cli", "run", "--quiet"]

    killed = write_recipe(small_recipe(tmp_path / "killed", passes), "killed.yaml")
    proc = subprocess.Popen(cmd + [str(killed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not Path(str(gate) + ".waiting").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = tmp_path / "killed"
    assert not (run_dir / "report.json").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert (run_dir / "checkpoints" / "001-prune_structured" / "DONE").exists()

    gate.write_text("open")
    resumed = subprocess.run(cmd + [str(killed), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after 001-prune_structured" in resumed.stderr

    straight = write_recipe(small_recipe(tmp_path / "straight", passes), "straight.yaml")
    done = subprocess.run(cmd + [str(straight)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    a = json.loads((tmp_path / "killed" / "report.json").read_text())
    b = json.loads((tmp_path / "straight" / "report.json").read_text())
    for side in ("baseline", "final"):
        assert a[side]["metrics"] == b[side]["metrics"]
        assert a[side]["flops"] == b[side]["flops"] and a[side]["params"] == b[side]["params"]
    assert a["structure"] == b["structure"]
    assert a["evaluations"][0]["metrics"] == b["evaluations"][0]["metrics"]
    x = make_adapter().example_inputs(2)
    with torch.no_grad():
        ya = mmprune.load(tmp_path / "killed" / "model")(**x).logits_per_image
        yb = mmprune.load(tmp_path / "straight" / "model")(**x).logits_per_image
    assert torch.equal(ya, yb)


def test_calibrating_passes_cannot_read_the_report_split(write_recipe, registry, tmp_path):
    from mmprune.passes.base import Pass

    class Peek(Pass):
        """Reads the test split while fitting (must be refused)."""
        name = "peek"
        calibrates = True

        def run(self, ctx):
            ctx.examples("test")

    registry.passes["peek"] = Peek
    try:
        with pytest.raises(MMPruneError, match="sealed"):
            run_recipe(write_recipe, registry, small_recipe(tmp_path / "run", [{"peek": {}}]))
    finally:
        del registry.passes["peek"]
