"""What the token-pruning runtime costs by itself: latency of the same zoo model run four ways.

    .venv/bin/python benchmarks/token_overhead.py [--models clip blip_nlvr] [--batch 64]

1. the transformers forward (fused attention), the dense baseline of every report;
2. the runtime installed, sites at θ = 0: CoMP's block-by-block forward with explicit
   attention maps (what masks and scores need), nothing scored or dropped;
3. sites in every block of both towers at θ = 1e-6: tokens scored, sorted and gathered at every
   site, but (almost) none dropped, so the time over (2) is the sites' own cost;
4. the same sites at θ = 1: tokens scoring under their site's mean are dropped, about half at
   each site, to compare the latency gained with the analytic FLOPs removed.

All four are timed interleaved in one process (medians, 2 threads); outputs of (1)-(3) are
checked equal. Writes benchmarks/results/token_overhead.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from results_file import write_timings

from mmprune.data.batching import collate_rows
from mmprune.graph import trace
from mmprune.measure import group_token_counts, latencies_ms
from mmprune.pipeline import _load_context
from mmprune.plugins.manager import get_registry
from mmprune.recipe import EvaluationSpec, load_recipe
from mmprune.runtime.runtime import TokenRuntime

HERE = Path(__file__).parent
RECIPES = {"clip": "comp_clip_retrieval.yaml", "blip_nlvr": "comp_blip_nlvr.yaml"}
#: θ of every site (None: the runtime is not installed; 0: sites that neither score nor drop)
VARIANTS = {"hf": None, "runtime": 0.0, "sites_keep": 1e-6, "sites_half": 1.0}


def variant(adapter, theta: float | None):
    """A copy of `adapter` run as the variant says, and its graph."""
    a = copy.deepcopy(adapter)
    graph = trace(a)
    if theta is None:
        return a, graph
    rt = TokenRuntime.attach(graph)
    for mode in rt.token_modes():
        rt.enable_token_mode(mode, 0.05)
        rt.set_mode_theta(mode, theta)
    return a, graph


def flops(a, graph, batch) -> float:
    ctx = SimpleNamespace(adapter=a, graph=graph, model=a.model)
    return float(graph.cost.flops_per_example(group_token_counts(ctx, batch)).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=25)
    args = ap.parse_args()
    reg = get_registry()
    spec = EvaluationSpec(latency_batch_size=args.batch, latency_repeats=args.repeats, threads=2)
    rows = []
    for name in args.models:
        ctx = _load_context(load_recipe(HERE.parent / "recipes" / RECIPES[name], reg), reg, False, None)
        ds = ctx.examples("test")
        batch = collate_rows(ctx.adapter, ds, list(range(args.batch)))
        made = {v: variant(ctx.adapter, t) for v, t in VARIANTS.items()}
        with torch.inference_mode():
            outs = {v: a.distill_logits(batch) for v, (a, _) in made.items()}
        exact = {v: float((outs[v] - outs["hf"]).abs().max()) for v in ("runtime", "sites_keep")}
        if max(exact.values()) > 1e-4:     # timing variants that compute something else are no baseline
            raise SystemExit(f"{name}: the runtime's outputs differ from the transformers forward: {exact}")
        ms = latencies_ms([a for a, _ in made.values()], batch, spec)
        f = {v: flops(a, g, batch) for v, (a, g) in made.items()}
        row = {"model": name, "batch": args.batch, "max_abs_diff": exact,
               **{f"{v}_ms": t for v, t in zip(made, ms)},
               **{f"{v}_flops": f[v] / f["hf"] for v in made}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_timings(HERE / "results" / "token_overhead.json", rows, threads=spec.threads,
                  repeats=args.repeats)
    print("| model | transformers forward | runtime, no sites | sites, θ = 1e-6 (keep) | "
          "sites, θ = 1 (FLOPs left) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        base = r["hf_ms"]
        cells = [f"{r[f'{v}_ms']:.1f} ms ({base / r[f'{v}_ms']:.2f}×)" for v in VARIANTS]
        cells[-1] += f", {r['sites_half_flops']:.0%}"
        print(f"| {r['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
