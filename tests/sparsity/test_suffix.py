"""Suffix recomputation (ecoflap.md §3.3): block probes that replay what they cannot change give
the scores full forwards give, on a dual encoder, a chain of towers and a decoder LLM."""
from __future__ import annotations

import pytest
import torch

from mmprune.data.batching import iterate_batches
from mmprune.data.minivl.source import MiniVLParams, load_task
from mmprune.sparsity.scores import block_jvp_scores, record_block_outputs
from mmprune.sparsity.sequential import block_weight_names
from mmprune.sparsity.suffix import skipped_blocks
from tests.conftest import make_adapter


def _tiny(family: str):
    from mmprune.models.blip import BlipVQAAdapter
    from mmprune.models.llava import LlavaAdapter

    if family == "clip":
        a = make_adapter()
        return a, [a.example_inputs(4), a.example_inputs(4)], "retrieval"
    cls, task = {"blip-vqa": (BlipVQAAdapter, "vqa"), "llava": (LlavaAdapter, "instruct")}[family]
    model = cls.tiny_model(0).float()
    a = cls(model, *cls.default_processors(model))
    data = load_task(MiniVLParams(task=task, train_size=16, validation_size=8, test_size=8))
    return a, list(iterate_batches(a, data["train"], 4))[:2], task


@pytest.mark.parametrize("family", ["clip", "blip-vqa", "llava"])
def test_replayed_probes_give_the_full_forward_scores(family):
    a, batches, task = _tiny(family)
    listed = a.layerwise_blocks()
    groups = {p: block_weight_names(a.model, p) for _, p in listed}
    loss = lambda b: a.task_loss(b, task).float()
    full, _ = block_jvp_scores(a.model, groups, loss, batches)
    outputs = record_block_outputs(a.model, [p for _, p in listed], loss, batches)
    towers = dict.fromkeys(t for t, _ in listed)
    skip = skipped_blocks(listed, {t: a.downstream_towers(t) for t in towers})
    fast, _ = block_jvp_scores(a.model, groups, loss, batches, suffix=(outputs, skip))
    assert fast == pytest.approx(full, rel=1e-5)
    # the replay is what the probes used: corrupt one recorded output and their scores move
    last = listed[-1][1]
    with torch.no_grad():
        for _, p in listed[:-1]:
            out = outputs.calls[0][p][0]
            (out if torch.is_tensor(out) else out[0]).mul_(1.5)
    moved, _ = block_jvp_scores(a.model, groups, loss, batches, suffix=(outputs, skip))
    assert moved[last] != pytest.approx(full[last], rel=1e-3)
    # and the replay really skipped work: the last block of the first tower skips all before it
    first = [p for t, p in listed if t == listed[0][0]]
    assert set(first[:-1]) <= set(skip[first[-1]])
    if family == "clip":      # a dual encoder: a vision probe never runs the text tower
        assert all(p in skip[first[0]] for t, p in listed if t == "language")


def test_finite_difference_fallback_replays_per_loss_evaluation(monkeypatch):
    """Where forward-mode AD is missing, each probe takes two loss evaluations; each replays the
    batch's record from its start, and the scores equal the fallback's without replay."""
    import mmprune.sparsity.scores as scores

    def no_forward_ad(*args, **kwargs):
        raise RuntimeError("this op has no forward AD formula")

    monkeypatch.setattr(scores, "directional_derivative", no_forward_ad)
    a, batches, task = _tiny("clip")
    listed = a.layerwise_blocks()
    groups = {p: block_weight_names(a.model, p) for _, p in listed}
    loss = lambda b: a.task_loss(b, task).float()
    full, method = block_jvp_scores(a.model, groups, loss, batches)
    assert method == "finite_difference"
    outputs = record_block_outputs(a.model, [p for _, p in listed], loss, batches)
    skip = skipped_blocks(listed, {t: a.downstream_towers(t) for t in ("vision", "language")})
    fast, _ = block_jvp_scores(a.model, groups, loss, batches, suffix=(outputs, skip))
    assert fast == pytest.approx(full, rel=1e-4)


def test_skipped_blocks_follow_tower_order():
    blocks = [("vision", "v0"), ("vision", "v1"), ("language", "l0"), ("language", "l1")]
    chain = skipped_blocks(blocks, {"vision": {"language"}, "language": set()})
    assert chain == {"v0": [], "v1": ["v0"], "l0": ["v0", "v1"], "l1": ["v0", "v1", "l0"]}
    dual = skipped_blocks(blocks, {"vision": set(), "language": set()})
    assert dual["v0"] == ["l0", "l1"] and dual["l1"] == ["v0", "v1", "l0"]


def test_a_changed_control_flow_is_an_error():
    from mmprune.sparsity.suffix import BlockOutputs

    block = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(block)
    outputs = BlockOutputs(model, ["0"])
    x = torch.randn(2, 3)
    outputs.record(0, lambda: model(x))
    with pytest.raises(RuntimeError, match="more often"):
        with outputs.replaying(0, ["0"]):
            model(x)
            model(x)
    expected = block(x)
    with outputs.replaying(0, ["0"]):
        assert torch.equal(model(torch.zeros(2, 3)), expected)   # replayed, not recomputed
    assert "forward" not in vars(block)                           # restored


def test_target_relative_standard_error_adds_directions_until_met():
    """§3.5: directions are added per block, a round over every batch at a time, until the
    score's standard error is at most the target share of it (or the cap is reached)."""
    from mmprune.sparsity.scores import relative_standard_error

    a, batches, task = _tiny("clip")
    listed = a.layerwise_blocks()[:2]
    groups = {p: block_weight_names(a.model, p) for _, p in listed}
    loss = lambda b: a.task_loss(b, task).float()
    one: dict = {}
    block_jvp_scores(a.model, groups, loss, batches, probes=one)
    tight: dict = {}
    block_jvp_scores(a.model, groups, loss, batches, probes=tight, target_rel_se=0.15,
                     max_directions=6)
    scores, _ = block_jvp_scores(a.model, groups, loss, batches, target_rel_se=0.15,
                                 max_directions=6)
    for g in groups:
        # a block that needed more directions is not scored higher for it: one round's scale
        assert scores[g] == pytest.approx(sum(tight[g]) / len(tight[g]) * len(batches))
        assert len(one[g]) == len(batches)
        assert tight[g][:len(batches)] == one[g]      # the same first round: seeded per (b, k)
        assert len(tight[g]) % len(batches) == 0
        met = relative_standard_error(tight[g]) <= 0.15
        assert met or len(tight[g]) == 6 * len(batches)
        if len(tight[g]) > len(batches):              # it stopped at the first round that met it
            assert relative_standard_error(tight[g][:-len(batches)]) > 0.15
