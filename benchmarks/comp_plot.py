"""Plot CoMP and its single-mode baselines against the FLOPs reduction, from benchmarks/results/comp.json.

One figure per task and zoo build (the build is picked by its dense metric, since a rebuilt zoo
gives another dense model): the test metric and the measured speedup of each method at each
target, every seed as a dot and their mean as a line, with the zoo's dense model and the dense
model trained as long as a search (`dense_ft`) as horizontal lines.

    .venv/bin/python benchmarks/comp_plot.py --task blip:nlvr --dense 69.8

With `--rescored`, the metric of each run is the one `rescore.py` measured on its larger test
split (benchmarks/results/rescore.json); runs it did not rescore are left out.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from results_file import GENERATOR_FIELD, MINIVL_GENERATOR

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"comp": "CoMP (the recipe)",
          "comp_attention": "CoMP, image tokens by attention at every block (paper)",
          "upop": "parameters only (UPop-like)", "tokens": "tokens only (MADTP-like)",
          "sjp": "tokens, then parameters",
          "comp_late_floor": "CoMP, late image-token sites + floor"}


def build_rows(rows: list[dict], family: str, task: str, dense: float,
               zoo_build: str | None = None) -> list[dict]:
    """The current generator's rows of one task and zoo build (two builds can share a dense
    metric: `zoo_build` tells them apart where the rows carry it)."""
    return [r for r in rows if r.get(GENERATOR_FIELD, 1) == MINIVL_GENERATOR
            and (r["family"], r["task"]) == (family, task) and abs(r["dense_value"] - dense) < 1e-6
            and (zoo_build is None or r.get("zoo_build") == zoo_build)]


def rescored(rows: list[dict], path: Path = RESULTS / "rescore.json") -> tuple[list[dict], float, str]:
    """`rows` with `value` from rescore.py's larger test split (rows it did not rescore dropped),
    the dense model's value on that split, and the split's name for the axis."""
    def key(r: dict) -> tuple:
        return r["family"], r["task"], r["method"], r["flops_reduction"], r.get("seed", 0), r.get("zoo_build")
    big: dict[tuple, dict] = {}
    for r in json.loads(path.read_text()):
        if key(r) in big:      # rescored at two test sizes: which one to plot is not ours to guess
            raise SystemExit(f"{path} scores {key(r)} twice (test sizes {big[key(r)]['test_size']} "
                             f"and {r['test_size']}): keep one")
        big[key(r)] = r
    out = []
    for r in rows:
        if key(r) in big:
            out.append({**r, "value": big[key(r)]["value"]})
        else:
            print(f"not rescored, left out: {r['method']} at {r['flops_reduction']}, seed {r.get('seed', 0)}")
    if not out:
        raise SystemExit(f"none of these rows is in {path}: run benchmarks/rescore.py first")
    first = big[key(out[0])]
    return out, first["dense_value"], f"test ({first['test_size']} examples)"


def by_method(rows: list[dict], field: str) -> dict[str, dict[float, list[float]]]:
    """{method: {target: [value of each seed]}} for the methods in LABELS."""
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["method"] in LABELS:
            out[r["method"]][r["flops_reduction"]].append(r[field])
    return out


def plot(rows: list[dict], family: str, task: str, dense: float, path: Path, split: str = "test") -> None:
    fig, (ax_m, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, field in ((ax_m, "value"), (ax_s, "speedup")):
        measured = by_method(rows, field)
        for method in (m for m in LABELS if m in measured):
            points = measured[method]
            xs = sorted(points)
            line, = ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o",
                            label=LABELS[method])
            for x in xs:
                ax.scatter([x] * len(points[x]), points[x], color=line.get_color(), s=12, alpha=0.5)
        ax.set_xlabel("FLOPs reduction (target)")
    metric = rows[0]["metric"]
    ax_m.axhline(dense, color="black", ls="--", lw=1, label=f"dense, zoo ({dense:g})")
    trained = [r["value"] for r in rows if r["method"] == "dense_ft"]
    if trained:
        ax_m.axhline(trained[0], color="grey", ls=":", lw=1,
                     label=f"dense, trained as long ({trained[0]:g})")
    ax_m.set_ylabel(f"{split} {metric}")
    ax_s.set_ylabel("measured speedup vs dense (same run)")
    ax_m.set_title(f"{family} {task}: {split} {metric} (dots: seeds, line: mean)", fontsize=10)
    ax_s.set_title("latency speedup")
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, help="family:task, e.g. clip:retrieval")
    ap.add_argument("--dense", type=float, required=True, help="the build's dense metric (comp.json's dense_value)")
    ap.add_argument("--suffix", default="", help="added to the figure's file name, so a new build's "
                    "figure does not replace one that BENCHMARKS.md shows for an older build")
    ap.add_argument("--zoo-build", help="only rows of this zoo build (comp.json's zoo_build)")
    ap.add_argument("--rescored", action="store_true", help="the metric rescore.py measured on its "
                    "larger test split instead of the run's own (speedups stay the run's)")
    args = ap.parse_args()
    family, task = args.task.split(":")
    rows = build_rows(json.loads((RESULTS / "comp.json").read_text()), family, task, args.dense,
                      args.zoo_build)
    if not rows:
        raise SystemExit(f"no rows for {args.task} with dense_value {args.dense}"
                         f"{f' and zoo_build {args.zoo_build}' if args.zoo_build else ''} in "
                         f"{RESULTS / 'comp.json'}")
    dense, split = args.dense, "test"
    if args.rescored:
        rows, dense, split = rescored(rows)
    path = RESULTS / f"comp_{family}_{task}{args.suffix}.png"
    plot(rows, family, task, dense, path, split)
    print(path)


if __name__ == "__main__":
    main()
