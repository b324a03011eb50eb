"""The zoo table of BENCHMARKS.md: dense test metrics, parameters, FLOPs and latency per model.

    .venv/bin/python benchmarks/zoo_table.py [NAME ...]     # builds missing models first

FLOPs per example are counted by torch's FlopCounterMode over the adapter's inference forward
(what latency times: both towers for CLIP, vision + ITM for BLIP retrieval (twice for NLVR), greedy
answer generation for BLIP VQA and LLaVA) on a batch of 32 test examples. Writes
benchmarks/results/zoo.json and prints the markdown table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from results_file import replace_rows

from mmprune.data.batching import collate_rows
from mmprune.data.minivl.source import MiniVLParams, load_task
from mmprune.measure import latencies_ms
from mmprune.models.loading import load_model
from mmprune.plugins.manager import get_registry
from mmprune.recipe import EvaluationSpec, ModelSpec
from mmprune.zoo.build import build, evaluate_split, read_manifest
from mmprune.zoo.catalog import CATALOG

HERE = Path(__file__).parent
#: tasks a model is also evaluated on beyond the one it was trained on
ALSO = {"llava-minivl": ["vqa"]}
BATCH = 32


def _data(manifest: dict, task: str):
    params = {k: v for k, v in manifest["data"].items() if k != "task"}
    return load_task(MiniVLParams(task=task, **params))


def measure_row(name: str, task: str, adapter, manifest: dict) -> dict:
    test = _data(manifest, task)["test"]
    metrics = (manifest["metrics"]["test"] if task == manifest["task"]
               else evaluate_split(adapter, test, task))
    batch = collate_rows(adapter, test, list(range(BATCH)))
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        adapter.forward(batch)
    spec = EvaluationSpec(split="test", latency_batch_size=BATCH, latency_repeats=15)
    return {"name": name, "task": task, "trained_on": manifest["task"],
            "params": sum(p.numel() for p in adapter.model.parameters()),
            "flops": fc.get_total_flops() / BATCH,
            "latency_ms_b32": latencies_ms([adapter], batch, spec)[0], "metrics": metrics,
            "train_seconds": manifest["train_seconds"], "steps": manifest["entry"]["steps"]}


def main(names: list[str]) -> None:
    reg = get_registry()
    rows = []
    for name in names or list(CATALOG):
        build(name)
        manifest = read_manifest(name)
        adapter, _ = load_model(ModelSpec(zoo=name), reg, 0)
        for task in [manifest["task"], *ALSO.get(name, [])]:
            rows.append(measure_row(name, task, adapter, manifest))
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / "zoo.json"
    # rows of models not measured this time are kept (a run for one model replaces only its rows)
    if out.exists() and names:
        rows_out = replace_rows(json.loads(out.read_text())["rows"], rows, ("name", "task"))
    else:
        rows_out = rows
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                               "rows": rows_out}, indent=2))
    print("| model | task | test metrics | params | FLOPs / example | latency (batch 32) | train time |")
    print("|---|---|---|---:|---:|---:|---:|")
    for x in rows:
        metrics = ", ".join(f"{k} {v:.1f}" for k, v in x["metrics"].items())
        task = x["task"] if x["task"] == x["trained_on"] else f"{x['task']} (trained on {x['trained_on']})"
        print(f"| {x['name']} | {task} | {metrics} | {x['params'] / 1e6:.2f} M | "
              f"{x['flops'] / 1e6:.1f} M | {x['latency_ms_b32']:.1f} ms | "
              f"{x['train_seconds'] / 60:.1f} min ({x['steps']} steps) |")
    total = sum(read_manifest(n)["train_seconds"] for n in names or CATALOG)
    print(f"\nwhole zoo: {total / 60:.1f} min of training")


if __name__ == "__main__":
    main(sys.argv[1:])
