"""Measured speedup of structured pruning (and int8 after it) against the dense model, same run.

    .venv/bin/python benchmarks/speedup.py [--targets 0.3 0.5 0.7]

Writes benchmarks/results/speedup.json and prints a markdown table for BENCHMARKS.md. Each row
is one `mmprune run` of benchmarks/speedup_clip.yaml with the target overridden; the final model
is pruned + int8, the 'pruned fp32' latency comes from the intermediate evaluate pass, which is
timed in the same process but not interleaved with the dense model.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from results_file import write_timings

from mmprune.pipeline import run
from mmprune.plugins.manager import get_registry
from mmprune.recipe import load_recipe

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    args = ap.parse_args()
    reg = get_registry()
    rows = []
    for target in args.targets:
        recipe = load_recipe(HERE / "speedup_clip.yaml", reg,
                             (f"passes.1.prune_structured.target={target}",))
        r = run(recipe, reg, out=f"runs/bench-speedup-{target}", overwrite=True, show_progress=False)
        pruned = r["evaluations"][0]
        rows.append({
            "target": target,
            "flops_reduction": r["ratios"]["flops_reduction"],
            "params_reduction": r["ratios"]["params_reduction"],
            "dense_ms": r["baseline"]["latency_ms"],
            "pruned_fp32_ms": pruned["latency_ms"],
            "pruned_fp32_speedup": r["baseline"]["latency_ms"] / pruned["latency_ms"],
            "pruned_int8_ms": r["final"]["latency_ms"],
            "pruned_int8_speedup": r["ratios"]["speedup"],
            "dense_mb": r["baseline"]["size_bytes"] / 2**20,
            "final_mb": r["final"]["size_bytes"] / 2**20,
        })
    write_timings(HERE / "results" / "speedup.json", rows, batch=32)
    print("| FLOPs target | FLOPs cut | params cut | dense ms | pruned fp32 ms (speedup) | "
          "pruned int8 ms (speedup) | size MB dense → final |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        print(f"| {x['target']:.1f} | {x['flops_reduction']:.1%} | {x['params_reduction']:.1%} | "
              f"{x['dense_ms']:.1f} | {x['pruned_fp32_ms']:.1f} ({x['pruned_fp32_speedup']:.2f}×) | "
              f"{x['pruned_int8_ms']:.1f} ({x['pruned_int8_speedup']:.2f}×) | "
              f"{x['dense_mb']:.1f} → {x['final_mb']:.1f} |")


if __name__ == "__main__":
    main()
