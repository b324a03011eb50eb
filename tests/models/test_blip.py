"""BLIP adapters: retrieval (ITC + ITM re-rank), NLVR through the ITM head, VQA by generation."""
from __future__ import annotations

import pytest
import torch

from mmprune.data.batching import collate_rows, iterate_batches
from mmprune.data.minivl.source import MiniVLParams, load_task
from mmprune.errors import MMPruneError
from mmprune.models import blip
from mmprune.models.blip import BlipRetrievalAdapter, BlipVQAAdapter
from mmprune.models.loading import adapter_for
from mmprune.plugins.manager import get_registry
from tests.conftest import loss_after_steps

SIZES = dict(train_size=32, validation_size=16, test_size=16)
CONFIG = {"vision_config": {"image_size": 64}}


def make(cls):
    model = cls.tiny_model(0, CONFIG)
    return cls(model, *cls.default_processors(model))


def data(task):
    return load_task(MiniVLParams(task=task, **SIZES))


def test_nlvr_reads_each_image_in_a_pass_that_names_its_side():
    a = make(BlipRetrievalAdapter)
    rows = data("nlvr")["train"]
    batch = collate_rows(a, rows, list(range(4)))
    assert batch["pixel_values"].shape == (4, 2, 3, 64, 64)
    assert batch["input_ids"].shape[:2] == (4, 2)
    left, right = a.tokenizer.convert_tokens_to_ids(["left", "right"])
    assert batch["input_ids"][:, 0, 1].tolist() == [left] * 4     # after [SOS], the side word
    assert batch["input_ids"][:, 1, 1].tolist() == [right] * 4
    assert (batch["input_ids"][:, 0, 2:] == batch["input_ids"][:, 1, 2:]).all()  # one statement
    assert a.tokens_per_example(batch)["vision"].tolist() == [[65.0, 65.0]] * 4  # 8x8 patches + CLS
    with torch.no_grad():
        logits = a.forward(batch)
        # by hand: each side alone through the ViT and a fused pass, the ITM head on the mean
        cls = [a._text_cls({"input_ids": batch["input_ids"][:, s], "attention_mask": batch["attention_mask"][:, s]},
                           a._vision(batch["pixel_values"][:, s])) for s in (0, 1)]
        assert torch.allclose(logits, a.model.itm_head((cls[0] + cls[1]) / 2), atol=1e-5)
    loss = a.task_loss(batch, "nlvr")
    loss.backward()
    assert torch.isfinite(loss) and a.model.itm_head.weight.grad.abs().sum() > 0


def test_retrieval_loss_trains_itc_and_itm():
    a = make(BlipRetrievalAdapter)
    batch = collate_rows(a, data("retrieval")["train"], list(range(6)))
    a.task_loss(batch, "retrieval").backward()
    for name in ("vision_proj", "text_proj", "itm_head"):  # both heads get a gradient
        assert getattr(a.model, name).weight.grad.abs().sum() > 0, name
    cross = a.model.text_encoder.encoder.layer[0].crossattention.self.key.weight.grad
    assert cross.abs().sum() > 0


def test_rerank_only_reorders_the_top_k(monkeypatch):
    a = make(BlipRetrievalAdapter)
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.9, 0.3]])
    # ITM prefers the second candidate of each row's top 2; the rest stay below, in ITC order
    monkeypatch.setattr(blip, "RERANK_K", 2)
    monkeypatch.setattr(a, "_itm", lambda e, i, m: torch.stack([-i[:, 0].float(), i[:, 0].float()], 1))
    ids = torch.tensor([[5], [4], [0], [7]])
    out = a._rerank(sim, lambda rows, cols: (torch.zeros(len(rows), 1, 1), ids[cols],
                                             torch.ones(len(cols), 1, dtype=torch.long)))
    assert out[0].argsort(descending=True).tolist() == [0, 1, 2, 3]
    # row 1: top 2 by ITC are columns 2, 3; ITM flips them; columns 1, 0 follow in ITC order
    assert out[1].argsort(descending=True).tolist() == [3, 2, 1, 0]


def test_retrieval_metrics_are_bounded_and_named():
    a = make(BlipRetrievalAdapter)
    m = a.evaluate(iterate_batches(a, data("retrieval")["test"], 8), "retrieval")
    assert set(m) >= {"r1_mean", "i2t_r5", "t2i_r5", "itc_i2t_r1"}
    assert all(0 <= v <= 100 for v in m.values())


def test_vqa_answer_does_not_depend_on_question_padding():
    """transformers drops BLIP's cross-attention mask (and its VQA generate passes all ones), so
    the decoder attends to question padding; ours masks it, so an example's answer scores are
    the same alone or padded in a batch."""
    a = make(BlipVQAAdapter)
    rows = data("vqa")["train"]
    batch = collate_rows(a, rows, list(range(6)))
    short = int(batch["attention_mask"].sum(1).argmin())
    alone = collate_rows(a, rows, [short])
    assert alone["input_ids"].shape[1] < batch["input_ids"].shape[1]  # padded in the batch

    def first_step(b, mask):
        q = a._question(b)
        start = torch.full((q.shape[0], 1), a.model.config.text_config.bos_token_id)
        return a.model.text_decoder(input_ids=start, encoder_hidden_states=q,
                                    encoder_attention_mask=mask).logits[:, -1]

    with torch.no_grad():
        ref = first_step(alone, alone["attention_mask"])[0]
        ours = first_step(batch, batch["attention_mask"])[short]
        hf = first_step(batch, torch.ones_like(batch["attention_mask"]))[short]
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        assert (hf - ref).abs().max() > 1e-3  # attending to the padding changes the answer
        for m in a.model.modules():  # without our fix, the mask passed is ignored as well
            m._forward_pre_hooks.clear()
        unfixed = first_step(batch, batch["attention_mask"])[short]
        assert (unfixed - ref).abs().max() > 1e-3
        assert torch.equal(a.generate(batch)[short][:2], a.generate(alone)[0][:2])


def test_vqa_loss_ignores_answer_padding_and_learns():
    a = make(BlipVQAAdapter)
    batch = collate_rows(a, data("vqa")["train"], list(range(8)))
    assert (batch["labels"][batch["decoder_attention_mask"] == 0] == -100).all()
    first, last = loss_after_steps(a, batch, "vqa")
    assert last < first * 0.5


def test_rows_of_the_wrong_task_are_a_clear_error():
    with pytest.raises(MMPruneError, match="neither"):
        make(BlipRetrievalAdapter).collate([{"image": None, "question": "q", "answer": "a"}])
    with pytest.raises(MMPruneError, match="question"):
        make(BlipVQAAdapter).collate([{"image": None, "caption": "c"}])


def test_the_config_architecture_picks_the_adapter():
    reg = get_registry()
    assert adapter_for("blip", reg, ["BlipForQuestionAnswering"]) is BlipVQAAdapter
    assert adapter_for("blip", reg, ["BlipForImageTextRetrieval"]) is BlipRetrievalAdapter


def test_nlvr_hits_are_per_example_and_average_to_the_accuracy():
    a = make(BlipRetrievalAdapter)
    a.model.eval()
    test = data("nlvr")["test"]
    labels = torch.tensor([int(r["label"]) for r in test])
    with torch.no_grad():
        logits = a.forward(collate_rows(a, test, list(range(len(test)))))
        # an untrained head answers one class for all; centre its margin so both answers occur
        # (between two examples: the quantile interpolates, so no margin is left at a tie)
        margin = logits[:, 1] - logits[:, 0]
        a.model.itm_head.bias[1] -= margin.quantile(0.5)
        predicted = a.forward(collate_rows(a, test, list(range(len(test))))).argmax(-1)
        hits = a.example_hits(iterate_batches(a, test, 5), "nlvr")  # 16 examples: a short last batch
        acc = a.evaluate(iterate_batches(a, test, 8), "nlvr")["accuracy"]
    assert 0 < int(predicted.sum()) < len(test)
    assert hits == (predicted == labels).tolist()
    assert acc == pytest.approx(100 * sum(hits) / len(hits))


def test_vqa_hits_are_per_example_and_average_to_the_accuracy(monkeypatch):
    """A model that knows half the answers (the generator is replaced: an untrained decoder
    answers nothing right) is right on exactly those examples, in split order."""
    a = make(BlipVQAAdapter)
    test = data("vqa")["test"]
    answers = sorted({str(r["answer"]) for r in test})
    known = set(answers[::2])
    wrong = a.tokenizer(["zzz"], return_tensors="pt")["input_ids"]

    def generate(batch, fixed_length=False):
        gold = a.tokenizer.batch_decode(batch["decoder_input_ids"], skip_special_tokens=True)
        out = batch["decoder_input_ids"].clone()
        for i, g in enumerate(gold):
            if g.strip() not in known:
                out[i] = a.tokenizer.pad_token_id
                out[i, :wrong.shape[1]] = wrong[0]
        return out

    monkeypatch.setattr(a, "generate", generate)
    hits = a.example_hits(iterate_batches(a, test, 5), "vqa")     # a short last batch
    expected = [str(r["answer"]) in known for r in test]
    assert 0 < sum(expected) < len(test)
    assert hits == expected
    acc = a.evaluate(iterate_batches(a, test, 8), "vqa")["accuracy"]
    assert acc == pytest.approx(100 * sum(expected) / len(expected))


def test_per_example_hits_are_for_the_adapters_own_scored_tasks():
    a = make(BlipRetrievalAdapter)
    with pytest.raises(MMPruneError, match="not 'retrieval'"):
        a.example_hits(iter([]), "retrieval")
    with pytest.raises(MMPruneError, match="not 'nlvr'"):
        make(BlipVQAAdapter).example_hits(iter([]), "nlvr")
