"""Trainer: the task loss, plus distillation from a dense teacher when asked."""
from __future__ import annotations

import pytest
import torch

from mmprune.errors import MMPruneError
from mmprune.training import Trainer, batch_stream, dense_teacher, distillation_loss
from tests.conftest import clone


def test_distillation_adds_its_weighted_divergence_to_the_task_loss(ctx):
    teacher = clone(ctx.adapter)
    with torch.no_grad():                      # a teacher that disagrees with the student
        for param in teacher.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    batch = next(batch_stream(ctx, "train", 8, 0))
    plain = Trainer(ctx.adapter, ctx.task, 1, 1e-3)
    taught = Trainer(ctx.adapter, ctx.task, 1, 1e-3, teacher=teacher, kd_weight=0.5,
                     kd_temperature=2.0)
    with torch.no_grad():
        torch.manual_seed(0)
        task = float(plain.loss(batch))
        torch.manual_seed(0)
        total = float(taught.loss(batch))
        kl = float(distillation_loss(ctx.adapter.distill_logits(batch),
                                     teacher.distill_logits(batch), 2.0))
    assert kl > 1e-4
    assert total == pytest.approx(task + 0.5 * kl, rel=1e-4)


def test_the_dense_teacher_is_loaded_fresh_frozen_once_and_only_when_asked(ctx):
    loaded = []
    ctx.load_dense = lambda: loaded.append(1) or clone(ctx.adapter)
    assert dense_teacher(ctx, 0.0, "comp") is None and not loaded
    teacher = dense_teacher(ctx, 1.0, "comp")
    assert loaded == [1] and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    # the fine-tuning after a distilled search gets the same teacher, not a second copy
    assert dense_teacher(ctx, 0.5, "finetune") is teacher and loaded == [1]
    ctx.load_dense, ctx.dense_teacher = None, None
    with pytest.raises(MMPruneError, match="comp: distillation .* needs the dense model"):
        dense_teacher(ctx, 1.0, "comp")
