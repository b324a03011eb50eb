"""LLaVA adapter: GQA Llama decoder + CLIP tower, instructions answered by generation."""
from __future__ import annotations

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


def test_grouped_query_heads_are_not_removed_silently():
    import pytest

    from mmprune.graph import remove_units, trace
    from mmprune.graph.surgery import SurgeryError

    g = trace(make())
    with pytest.raises(SurgeryError, match="grouped-query"):
        remove_units(g, g.groups["language.0.attn"], [0])
    remove_units(g, g.groups["language.0.mlp"], [0, 5])    # SwiGLU channels: gate, up and down
    mlp = g.adapter.model.model.language_model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 254
