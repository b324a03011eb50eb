"""ECoFLaP and the layer-wise family at several sparsities (BENCHMARKS.md, ECoFLaP table).

    .venv/bin/python benchmarks/ecoflap_table.py [--tasks clip:retrieval blip:retrieval llava:instruct]
                                                 [--sparsities 0.4 0.5 0.6 0.7] [--methods ...]

Every row is `recipes/ecoflap_<family>.yaml` with the allocator, criterion and target changed,
run in a fresh process (`mmprune run`), so the peak RSS of its pruning pass is its own. Memory
and time ratios are against plain Wanda (uniform) at the same sparsity, measured in the same
invocation. Rows go to benchmarks/results/ecoflap.json (a rerun replaces its rows).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from results_file import merge_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ecoflap.json"
#: family:task -> (recipe, zoo model)
TASKS = {"clip:retrieval": ("ecoflap_clip.yaml", "clip-minivl"),
         "blip:retrieval": ("ecoflap_blip.yaml", "blip-minivl"),
         "llava:instruct": ("ecoflap_llava.yaml", "llava-minivl")}
#: method -> (allocator, criterion)
METHODS = {"magnitude": ("uniform", "magnitude"), "wanda": ("uniform", "wanda"),
           "sparsegpt": ("uniform", "sparsegpt"), "owl_wanda": ("owl", "wanda"),
           "ecoflap_zo_wanda": ("ecoflap_zo", "wanda"), "ecoflap_fo_wanda": ("ecoflap_fo", "wanda"),
           "ecoflap_fast_wanda": ("ecoflap_fast", "wanda"),
           "ecoflap_zo_sparsegpt": ("ecoflap_zo", "sparsegpt")}


def run_one(pair: str, method: str, sparsity: float) -> dict:
    recipe, _ = TASKS[pair]
    allocator, criterion = METHODS[method]
    family, task = pair.split(":")
    out = ROOT / "runs" / "bench" / "ecoflap" / f"{family}_{task}_{method}_{sparsity}"
    sets = [f"passes.0.prune_layerwise.target={sparsity}",
            f"passes.0.prune_layerwise.allocator={allocator}",
            f"passes.0.prune_layerwise.criterion={criterion}"]
    cmd = [sys.executable, "-m", "mmprune.cli", "run", str(ROOT / "recipes" / recipe), "--out",
           str(out), "--overwrite", "--quiet"] + [a for s in sets for a in ("--set", s)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    head = report["headline_metric"]
    prune = next(p for p in report["passes"] if p["name"] == "prune_layerwise")
    return {"family": family, "task": task, "method": method, "sparsity": sparsity,
            "achieved_sparsity": round(report["state"]["sparsity"]["prunable_sparsity"], 4),
            "metric": head, "value": round(report["final"]["metrics"][head], 2),
            "dense_value": round(report["baseline"]["metrics"][head], 2),
            "seconds": prune["seconds"], "peak_rss_mb": prune["peak_rss_mb"],
            "speedup": round(report["ratios"]["speedup"], 3)}


def with_ratios(rows: list[dict]) -> list[dict]:
    """peak_memory_ratio and time_ratio against uniform Wanda at the same task and sparsity."""
    base = {(r["family"], r["task"], r["sparsity"]): r for r in rows if r["method"] == "wanda"}
    for r in rows:
        w = base.get((r["family"], r["task"], r["sparsity"]))
        r["peak_memory_ratio"] = round(r["peak_rss_mb"] / w["peak_rss_mb"], 3) if w else None
        r["time_ratio"] = round(r["seconds"] / w["seconds"], 2) if w else None
    return rows


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable") for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(pair: str, sparsity: float) -> float | None:
    """Spearman correlation of the fast and reference allocations' block sparsities (§3.6)."""
    family, task = pair.split(":")
    runs = ROOT / "runs" / "bench" / "ecoflap"
    files = [runs / f"{family}_{task}_{m}_{sparsity}" / "sparsity.json"
             for m in ("ecoflap_zo_wanda", "ecoflap_fast_wanda")]
    if not all(f.exists() for f in files):
        return None
    ref, fast = (json.loads(f.read_text()) for f in files)
    return spearman([ref[k] for k in ref], [fast[k] for k in ref])


def save(rows: list[dict]) -> None:
    merge_rows(RESULTS, rows, ("family", "task", "method", "sparsity"))


def table(rows: list[dict]) -> str:
    lines = [("| family | task | method | sparsity | metric | value | dense | memory × Wanda | "
              "time × Wanda |"), "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['peak_memory_ratio']:.2f}" if r.get("peak_memory_ratio") else "-"
        t = f"{r['time_ratio']:.2f}" if r.get("time_ratio") else "-"
        lines.append(f"| {r['family']} | {r['task']} | {r['method']} | {r['sparsity']} | "
                     f"{r['metric']} | {r['value']:.2f} | {r['dense_value']:.2f} | {mem} | {t} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["clip:retrieval"], choices=sorted(TASKS))
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args()
    methods = ["wanda"] + [m for m in args.methods if m != "wanda"]   # the ratios' baseline first
    rows = []
    for pair in args.tasks:
        for s in args.sparsities:
            for m in methods:
                rows.append(run_one(pair, m, s))
                print(table(with_ratios(rows)[-1:]).splitlines()[-1], flush=True)
    save(with_ratios(rows))
    print(table(rows))
    for pair in args.tasks:
        for s in args.sparsities:
            rho = agreement(pair, s)
            if rho is not None:
                print(f"{pair} at {s}: Spearman(fast, reference block sparsities) = {rho:.3f}")


if __name__ == "__main__":
    main()
