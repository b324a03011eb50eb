"""LLaVA adapter: GQA Llama decoder + CLIP tower, instructions answered by generation."""
from __future__ import annotations

import pytest
import torch

from mmprune.data.batching import collate_rows
from mmprune.data.minivl.source import MiniVLParams, load_task
from mmprune.models.llava import IMAGE_TOKEN, LlavaAdapter
from tests.conftest import loss_after_steps

SIZES = dict(train_size=32, validation_size=16, test_size=16)


def make():
    model = LlavaAdapter.tiny_model(0, {"vision_config": {"image_size": 64}})
    return LlavaAdapter(model, *LlavaAdapter.default_processors(model))


def test_config_is_grouped_query_and_the_tokenizer_knows_the_image_token():
    a = make()
    t = a.model.config.text_config
    assert t.num_key_value_heads < t.num_attention_heads
    assert a.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == a.model.config.image_token_id
    assert a.model.config.image_seq_length == 64  # 8x8 patches, CLS dropped


def test_loss_covers_only_the_answer():
    a = make()
    batch = collate_rows(a, load_task(MiniVLParams(task="instruct", **SIZES))["train"], [0, 1, 2])
    labelled = batch["labels"] != -100
    for i in range(3):
        answer = batch["answer_ids"][i][batch["answer_ids"][i] != 0]
        assert torch.equal(batch["labels"][i][labelled[i]], answer)
        n_image = int((batch["input_ids"][i] == a.model.config.image_token_id).sum())
        assert n_image == 64
    assert torch.isfinite(a.task_loss(batch, "instruct"))


def test_left_padded_batch_generates_what_each_example_generates_alone():
    a = make()
    rows = load_task(MiniVLParams(task="vqa", **SIZES))["train"]
    batch = collate_rows(a, rows, list(range(5)))
    short = int(batch["prompt_mask"].sum(1).argmin())
    with torch.no_grad():
        together = a.generate(batch)[short]
        alone = a.generate(collate_rows(a, rows, [short]))[0]
    n = min(len(together), len(alone))
    assert torch.equal(together[:n], alone[:n])


def test_training_steps_lower_the_loss():
    a = make()
    batch = collate_rows(a, load_task(MiniVLParams(task="instruct", **SIZES))["train"], list(range(8)))
    first, last = loss_after_steps(a, batch, "instruct")
    assert last < first * 0.5


def test_prefill_flops_match_the_counter_and_params_the_model():
    """The cost model (GQA: k and v for the KV heads only; SwiGLU: three matrices; the LM head on
    the one position a prefill predicts) against torch's FLOP counter over a real prefill."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmprune.graph import trace

    model = LlavaAdapter.tiny_model(0, {"vision_config": {"image_size": 64}})
    model.set_attn_implementation("eager")   # torch does not count the CPU SDPA kernel
    a = LlavaAdapter(model, *LlavaAdapter.default_processors(model))
    g = trace(a)
    batch = collate_rows(a, load_task(MiniVLParams(task="instruct", **SIZES))["test"], [0, 1, 2, 3])
    assert g.cost.params() == sum(p.numel() for p in model.parameters())
    site = g.groups["language.0.attn"].site
    assert (site.num_heads, site.num_kv_heads) == (4, 2)
    per = a.tokens_per_example(batch)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        for i in range(4):   # one example at a time: each at its own length, no padding
            n = int(batch["prompt_mask"][i].sum())
            ids = batch["prompt_ids"][i:i + 1, -n:]
            model(input_ids=ids, pixel_values=batch["pixel_values"][i:i + 1], logits_to_keep=1)
    counts = {gid: per[grp.tower] for gid, grp in g.groups.items()}
    analytic = float(g.cost.flops_per_example(counts).sum())
    assert abs(analytic - fc.get_total_flops()) / fc.get_total_flops() < 0.01


def test_a_grouped_query_heads_parameter_cost_carries_its_kv_share():
    """Removing both query heads of one KV head removes their q / o rows and the KV head's k / v
    rows: twice the per-unit cost a params budget ranks them by (even groups)."""
    from mmprune.graph import remove_units, trace

    a = make()
    g = trace(a)
    group = g.groups["language.1.attn"]
    unit = g.cost.unit_param_cost(group)
    assert unit > g.cost.unit_params[group.id]          # the k / v share is in it
    before = sum(p.numel() for p in a.model.parameters())
    remove_units(g, group, [2, 3])                       # KV head 1 goes with its last query head
    after = sum(p.numel() for p in a.model.parameters())
    assert before - after == pytest.approx(2 * unit)


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_grouped_query_head_removal_is_exact_against_a_zero_masked_copy(ratio, tmp_path):
    """Query heads go one by one; a KV head goes with its last query head. Uneven groups (2 and 1
    query heads on their KV heads) run through the index forward, even ones through HF's own;
    both equal the dense model with the removed heads' o_proj columns zeroed, teacher-forced and
    in cached generation."""
    import copy

    from mmprune.graph import remove_units, trace

    model = LlavaAdapter.tiny_model(0, {"text_config": {"num_key_value_heads": 4 // ratio}})
    a = LlavaAdapter(model, *LlavaAdapter.default_processors(model))
    masked = copy.deepcopy(model)
    g = trace(a)
    removed = {0: [0], 1: [0, 1]}           # layer -> original query heads removed
    remove_units(g, g.groups["language.0.attn"], [0])
    remove_units(g, g.groups["language.1.attn"], [0])   # one at a time: the second removal
    remove_units(g, g.groups["language.1.attn"], [0])   # works from what the first left
    for layer, heads in removed.items():
        o = masked.model.language_model.layers[layer].self_attn.o_proj
        with torch.no_grad():
            for h in heads:
                o.weight[:, h * 16:(h + 1) * 16] = 0
    assert g._dg is None                    # never the dependency graph (upstream issue #527)
    att = [model.model.language_model.layers[i].self_attn for i in (0, 1)]
    per = ratio
    kv_left = [len({h // per for h in range(4) if h not in removed[i]}) for i in (0, 1)]
    assert [x.k_proj.out_features // 16 for x in att] == kv_left
    assert [x.q_proj.out_features // 16 for x in att] == [3, 2]
    assert g.cost.params() == sum(p.numel() for p in model.parameters())
    # a planned removal never counts a KV head that is already gone
    assert g.cost.flops(sizes={"language.1.attn": 1}) < g.cost.flops()

    batch = collate_rows(a, load_task(MiniVLParams(task="instruct", **SIZES))["test"], list(range(6)))
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        got = model(**{k: batch[k] for k in keys}).logits
        want = masked(**{k: batch[k] for k in keys}).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    b = LlavaAdapter(masked, a.tokenizer, a.image_processor)
    assert torch.equal(a.generate(batch), b.generate(batch))
    if ratio == 2:    # a saved pruned model comes back with its uneven groups
        from mmprune.saved import load_bundle, save
        save(tmp_path / "m", a, g)
        again = load_bundle(tmp_path / "m").adapter.model
        with torch.no_grad():
            torch.testing.assert_close(again(**{k: batch[k] for k in keys}).logits, got)


def test_torch_pruning_never_groups_rotary_q_and_k_so_the_adapter_cuts_them_itself():
    """The trap (torch-pruning issue #527): asking its dependency graph for the group of a Llama
    q_proj does not return. `remove_units` never asks (the test above); this shows why."""
    import subprocess
    import sys

    code = ("import warnings, torch_pruning as tp; warnings.filterwarnings('ignore');"
            "from mmprune.models.llava import LlavaAdapter as A;"
            "m = A.tiny_model(0); a = A(m, *A.default_processors(m)); x = a.example_inputs();"
            "dg = tp.DependencyGraph().build_dependency(m, example_inputs={k: x[k] for k in "
            "('input_ids', 'attention_mask', 'pixel_values')}, output_transform=lambda o: o.logits.sum());"
            "print('built', flush=True);"
            "dg.get_pruning_group(m.model.language_model.layers[0].self_attn.q_proj, "
            "tp.prune_linear_out_channels, idxs=list(range(16))); print('grouped', flush=True)")
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=40)
    out = hung.value.stdout
    out = out.decode() if isinstance(out, bytes) else (out or "")
    assert "built" in out and "grouped" not in out     # the graph was built; grouping never ended


def test_swiglu_channels_and_vit_heads_are_removed_exactly():
    """Gate, up and down together (through torch-pruning's graph, which handles the MLP), and
    ViT heads: equal to the dense model with those channels' down_proj columns and heads'
    out_proj columns zeroed."""
    import copy

    from mmprune.graph import remove_units, trace

    model = LlavaAdapter.tiny_model(0)
    a = LlavaAdapter(model, *LlavaAdapter.default_processors(model))
    masked = copy.deepcopy(model)
    g = trace(a)
    remove_units(g, g.groups["language.0.mlp"], [0, 5, 17])
    remove_units(g, g.groups["vision.1.attn"], [2])
    mlp = model.model.language_model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 253
    with torch.no_grad():
        masked.model.language_model.layers[0].mlp.down_proj.weight[:, [0, 5, 17]] = 0
        masked.model.vision_tower.encoder.layers[1].self_attn.out_proj.weight[:, 32:48] = 0
    assert g.cost.params() == sum(p.numel() for p in model.parameters())
    batch = collate_rows(a, load_task(MiniVLParams(task="instruct", **SIZES))["test"], [0, 1, 2])
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        torch.testing.assert_close(model(**{k: batch[k] for k in keys}).logits,
                                   masked(**{k: batch[k] for k in keys}).logits, rtol=1e-4, atol=1e-5)
