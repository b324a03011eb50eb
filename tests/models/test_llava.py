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
