"""Measurements a report shows: task metrics, FLOPs per example, parameters, size, latency."""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmprune import quant
from mmprune.context import Context
from mmprune.data.batching import collate_rows
from mmprune.models.base import Adapter
from mmprune.recipe import EvaluationSpec
from mmprune.runtime.runtime import runtime_of


def flops_stats(ctx: Context, token_counts: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Analytic FLOPs per example from each example's real token counts: mean, p5, p95, by tower.

    `token_counts` holds, per evaluated batch, tokens per example at every unit group (see
    `group_token_counts`), recorded while the metrics were computed.
    """
    cost = ctx.graph.cost
    per_example = torch.cat([cost.flops_per_example(c) for c in token_counts]).numpy()
    by_tower = {t: float(torch.cat([cost.flops_per_example(c, tower=t) for c in token_counts]).mean())
                for t in cost.towers}
    return {"mean": float(per_example.mean()), "p5": float(np.percentile(per_example, 5)),
            "p95": float(np.percentile(per_example, 95)), "by_tower": by_tower}


def group_token_counts(ctx: Context, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tokens per example [B] at every unit group for `batch`.

    Without token pruning every block of a tower sees the tower's input tokens. A tower the
    adapter runs P times per example has counts [B, P] (see `graph.cost`). With a token
    runtime installed, the inference forward (a generating model's prefill) is run and each
    block's real counts are read.
    """
    per_tower = ctx.adapter.tokens_per_example(batch)
    counts = {gid: per_tower[g.tower].double() for gid, g in ctx.graph.groups.items()
              if g.tower in per_tower}
    for gid, g in ctx.graph.groups.items():   # cross-attention: the other tower's key count
        if f"{g.tower}_kv" in per_tower:
            counts[f"{gid}:kv"] = per_tower[f"{g.tower}_kv"].double()
    runtime = runtime_of(ctx.model)
    if runtime is not None and runtime.active:
        with torch.inference_mode():
            ctx.adapter.prefill(batch)
        b = len(next(iter(per_tower.values())))
        # a tower run P times per example saw its passes one after another ([P·B] rows)
        counts.update({gid: c.reshape(-1, b).T if c.numel() > b else c
                       for gid, c in runtime.counts().items()})
    return counts


def headline(ctx: Context, metrics: dict[str, float]) -> float:
    """The task's headline metric (the first one when the adapter names none)."""
    name = type(ctx.adapter).headline_metric.get(ctx.task) or next(iter(metrics))
    return float(metrics[name])


def size_bytes(adapter: Adapter) -> int:
    """Bytes of the weights as exported (int8 layers counted as int8)."""
    return sum(t.numel() * t.element_size() for t in quant.state_tensors(adapter.model).values())


def param_count(ctx: Context) -> int:
    return int(ctx.graph.cost.params())


def latency_batch(ctx: Context, spec: EvaluationSpec) -> dict[str, torch.Tensor]:
    """A batch of `latency_batch_size` examples from the evaluation split (cycled if short)."""
    ds = ctx.examples(spec.split)
    return collate_rows(ctx.adapter, ds, [i % len(ds) for i in range(spec.latency_batch_size)])


@torch.inference_mode()
def _interleaved_medians_ms(calls: Sequence, spec: EvaluationSpec) -> list[float]:
    """Median wall time of each call, the calls timed interleaved so load drifts hit all."""
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        for call in calls:
            for _ in range(spec.latency_warmup):
                call()
        times: list[list[float]] = [[] for _ in calls]
        for _ in range(spec.latency_repeats):
            for i, call in enumerate(calls):
                t0 = time.perf_counter()
                call()
                times[i].append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return [statistics.median(t) for t in times]


def latencies_ms(adapters: Sequence[Adapter], batch: dict[str, torch.Tensor],
                 spec: EvaluationSpec) -> list[float]:
    """Median forward latency of each adapter's model, timed interleaved so load drifts hit all."""
    for a in adapters:
        a.model.eval()
    return _interleaved_medians_ms([lambda a=a: a.forward(batch) for a in adapters], spec)


#: decode steps timed per generation: per-token decode time = (T(1 + k) − T(1)) / k
DECODE_STEPS = 8


def generation_latencies_ms(adapters: Sequence[Adapter], batch: dict[str, torch.Tensor],
                            spec: EvaluationSpec) -> list[dict[str, float]] | None:
    """Time to first token and per-token decode time of each adapter's model (greedy, KV
    cache), medians of interleaved runs; None when the family does not generate.

    The first token is a whole generate call for one token (vision tower, prefill, LM head).
    Decode time per token is the extra time of generating 1 + k tokens over 1, divided by k.
    """
    if any(type(a).generate_tokens is Adapter.generate_tokens for a in adapters):
        return None
    calls = [lambda a=a, n=n: a.generate_tokens(batch, n)
             for a in adapters for n in (1, 1 + DECODE_STEPS)]
    ms = _interleaved_medians_ms(calls, spec)
    return [{"ttft_ms": first, "decode_ms_per_token": max(longer - first, 0.0) / DECODE_STEPS}
            for first, longer in zip(ms[0::2], ms[1::2])]


def measure(ctx: Context, spec: EvaluationSpec, *, with_latency: bool = True) -> dict:
    """Task metrics on `spec.split` plus FLOPs, params, size and (optionally) latency."""
    ctx.model.eval()
    total = len(ctx.examples(spec.split, spec.max_examples))
    n_batches = -(-total // spec.batch_size)
    token_counts: list[dict[str, torch.Tensor]] = []

    def counted(batches):
        for batch in batches:
            token_counts.append(group_token_counts(ctx, batch))
            yield batch

    batches = ctx.progress(ctx.batches(spec.split, spec.batch_size, max_examples=spec.max_examples),
                           f"evaluate[{spec.split}]", total=n_batches)
    with torch.inference_mode():
        metrics = ctx.adapter.evaluate(counted(batches), ctx.task)
    flops = flops_stats(ctx, token_counts)
    out = {"split": spec.split, "examples": total, "metrics": metrics,
           "flops": flops["mean"], "flops_p5": flops["p5"], "flops_p95": flops["p95"],
           "flops_by_tower": flops["by_tower"], "params": param_count(ctx),
           "size_bytes": size_bytes(ctx.adapter), "latency_ms": None}
    if with_latency:
        out["latency_ms"] = latencies_ms([ctx.adapter], latency_batch(ctx, spec), spec)[0]
    return out
