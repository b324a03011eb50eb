"""Measurements a report shows: task metrics, FLOPs per example, parameters, size, latency."""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from mmprune import quant
from mmprune.context import Context
from mmprune.data.batching import collate_rows
from mmprune.models.base import Adapter
from mmprune.recipe import EvaluationSpec


def flops_stats(ctx: Context, token_counts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Analytic FLOPs per example from each example's real token counts: mean, p5, p95.

    `token_counts` holds `adapter.tokens_per_example` of every evaluated batch, recorded while
    the metrics were computed, so the split is not collated a second time.
    """
    per_example = []
    for counts in token_counts:
        towers = list(counts)
        for i in range(len(counts[towers[0]])):
            per_example.append(ctx.graph.cost.flops({t: float(counts[t][i]) for t in towers}))
    arr = np.asarray(per_example)
    return {"mean": float(arr.mean()), "p5": float(np.percentile(arr, 5)),
            "p95": float(np.percentile(arr, 95))}


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
def latencies_ms(adapters: Sequence[Adapter], batch: dict[str, torch.Tensor],
                 spec: EvaluationSpec) -> list[float]:
    """Median forward latency of each adapter's model, timed interleaved so load drifts hit all."""
    threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        for a in adapters:
            a.model.eval()
            for _ in range(spec.latency_warmup):
                a.forward(batch)
        times: list[list[float]] = [[] for _ in adapters]
        for _ in range(spec.latency_repeats):
            for i, a in enumerate(adapters):
                t0 = time.perf_counter()
                a.forward(batch)
                times[i].append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return [statistics.median(t) for t in times]


def measure(ctx: Context, spec: EvaluationSpec, *, with_latency: bool = True) -> dict:
    """Task metrics on `spec.split` plus FLOPs, params, size and (optionally) latency."""
    ctx.model.eval()
    total = len(ctx.examples(spec.split, spec.max_examples))
    n_batches = -(-total // spec.batch_size)
    token_counts: list[dict[str, torch.Tensor]] = []

    def counted(batches):
        for batch in batches:
            token_counts.append(ctx.adapter.tokens_per_example(batch))
            yield batch

    batches = ctx.progress(ctx.batches(spec.split, spec.batch_size, max_examples=spec.max_examples),
                           f"evaluate[{spec.split}]", total=n_batches)
    with torch.inference_mode():
        metrics = ctx.adapter.evaluate(counted(batches), ctx.task)
    flops = flops_stats(ctx, token_counts)
    out = {"split": spec.split, "examples": total, "metrics": metrics,
           "flops": flops["mean"], "flops_p5": flops["p5"], "flops_p95": flops["p95"],
           "flops_by_tower": ctx.graph.cost.breakdown(), "params": param_count(ctx),
           "size_bytes": size_bytes(ctx.adapter), "latency_ms": None}
    if with_latency:
        out["latency_ms"] = latencies_ms([ctx.adapter], latency_batch(ctx, spec), spec)[0]
    return out
