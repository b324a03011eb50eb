"""The zoo table of BENCHMARKS.md: dense test metrics, parameters, FLOPs and latency per model.

    .venv/bin/python benchmarks/zoo_table.py [NAME ...]     # builds missing models first

Writes benchmarks/results/zoo.json and prints the markdown table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mmprune.context import Context
from mmprune.data.minivl.source import MiniVLParams, load_task
from mmprune.measure import measure
from mmprune.models.loading import load_model
from mmprune.plugins.manager import get_registry
from mmprune.recipe import EvaluationSpec, ModelSpec
from mmprune.zoo.build import build, read_manifest
from mmprune.zoo.catalog import CATALOG

HERE = Path(__file__).parent


def main(names: list[str]) -> None:
    reg = get_registry()
    rows = []
    for name in names or list(CATALOG):
        build(name)
        m = read_manifest(name)
        adapter, _ = load_model(ModelSpec(zoo=name), reg, 0)
        data = load_task(MiniVLParams(task=m["task"], **{k: v for k, v in m["data"].items() if k != "task"}))
        from mmprune.graph import trace
        ctx = Context(adapter, trace(adapter), data, m["task"], show_progress=False)
        r = measure(ctx, EvaluationSpec(split="test", latency_batch_size=32, latency_repeats=15))
        rows.append({"name": name, "task": m["task"], "params": r["params"], "flops": r["flops"],
                     "latency_ms_b32": r["latency_ms"], "metrics": r["metrics"],
                     "train_seconds": m["train_seconds"], "steps": m["entry"]["steps"]})
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "zoo.json").write_text(json.dumps(
        {"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=2))
    print("| model | task | test metrics | params | FLOPs / example | latency (batch 32) | train time |")
    print("|---|---|---|---:|---:|---:|---:|")
    for x in rows:
        metrics = ", ".join(f"{k} {v:.1f}" for k, v in x["metrics"].items())
        print(f"| {x['name']} | {x['task']} | {metrics} | {x['params'] / 1e6:.2f} M | "
              f"{x['flops'] / 1e6:.1f} M | {x['latency_ms_b32']:.1f} ms | "
              f"{x['train_seconds'] / 60:.1f} min ({x['steps']} steps) |")


if __name__ == "__main__":
    main(sys.argv[1:])
