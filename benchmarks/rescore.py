"""The exported models of comp_table.py's runs, scored again on a larger test split (BENCHMARKS.md,
"The converged NLVR model on 2,000 test examples").

    .venv/bin/python benchmarks/rescore.py [--task blip:nlvr|blip:vqa] [--test-size 2000] [--against upop]
                                           [--across-cuts]

MiniVL's test split of 500 gives an accuracy a binomial standard error of about 1.8 points at 80%
(2.2 at VQA's 37%), as large as the differences the CoMP goal is about. The generator fills each split in the order
its examples are drawn, so a larger `test_size` keeps train and validation as they were and makes
the old test split the first 500 examples of the new one; nothing trained or selected on it.

For every row of benchmarks/results/comp.json measured on the zoo model's current build whose run
directory still holds that run (its report matches the row), the export is loaded with
`mmprune.load`'s loader and scored per example. The first 500 must reproduce the recorded metric
(else the row is reported, not rescored). Methods are compared with the one named by `--against`
at the same FLOPs target and seed, on the same examples: a paired bootstrap of the difference.
Its interval is the test sample's uncertainty for those two trained models only; another run
seed moves a method by more, so compare seeds too: where two methods share two seeds or more,
the table after the rows pairs their seed means (each example's hits averaged over the seeds).
A run with no reference at its own target and cut is paired with the reference of the same seed
that reached its cut aiming at another (parameters only stops at 0.760 aiming at 0.8 on VQA, so
CoMP aimed at 0.76 is compared with it there); `--across-cuts` also pairs a method with a
reference that stopped short of the target.
On NLVR each row also has the accuracy by statement kind (one image shows a colour, both do,
more objects, more objects of a colour), on VQA by question kind (count, exists, size, where,
colour, shape), to show which questions a pruning method loses.
Rows go to benchmarks/results/rescore.json (tasks scored per example: NLVR, VQA's exact match;
retrieval ranks against the whole split and has no per-example score). A row carries its comp.json
row's `token_sites`, in the key as there.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from comp_table import RESULTS, run_dir, zoo_build
from results_file import merge_rows

from mmprune.data.batching import iterate_batches
from mmprune.data.minivl.source import code_hash
from mmprune.models.loading import load_model
from mmprune.plugins.manager import get_registry
from mmprune.recipe import ModelSpec, load_recipe

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "rescore.json"
ORIGINAL_TEST = 500


def hits(adapter, test, task: str, batch_size: int = 32) -> np.ndarray:
    """1 where the model's answer is right, per test example, in split order."""
    adapter.model.eval()
    with torch.inference_mode():
        out = adapter.example_hits(iterate_batches(adapter, test, batch_size), task)
    return np.array(out, dtype=float)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b) in points, resampling examples (both models see each)."""
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n, len(a)))
    diffs = 100 * (a[idx].mean(1) - b[idx].mean(1))
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def cached_hits(run: Path, reg, test, task: str) -> np.ndarray:
    """`hits` of a run's export, kept in the run directory under the run's finish time (a rerun
    of the method replaces the directory's run) and the MiniVL code (changed data)."""
    finished = json.loads((run / "run.json").read_text())["finished"].replace(":", "")
    cache = run / f"rescore_hits_{len(test)}_{code_hash()}_{finished}.npy"
    if cache.exists():
        return np.load(cache)
    adapter, _ = load_model(ModelSpec(path=str(run / "model")), reg, 0, log=lambda m: None)
    h = hits(adapter, test, task)
    np.save(cache, h)
    return h


#: NLVR statement kinds, by the generator's templates (mmprune/data/minivl/language.py)
STATEMENT_KINDS = (("count", re.compile(r"has more objects")), ("colour count", re.compile(r"has more \w+ objects")),
                   ("both", re.compile(r"^both images")), ("one image", re.compile(r"image shows")))


#: VQA question kinds, by the same file's templates (the first that matches)
QUESTION_KINDS = (("count", re.compile(r"^(how many|count the)")),
                  ("exists", re.compile(r"^(is there|does the image contain)")),
                  ("size", re.compile(r"small or large")), ("where", re.compile(r"^where is")),
                  ("colour", re.compile(r"colou?r")), ("shape", re.compile(r"shape")))


def statement_kinds(test) -> list[str] | None:
    """The kind of each test statement (NLVR) or question (VQA), in split order; None for other
    tasks."""
    for column, kinds in (("statement", STATEMENT_KINDS), ("question", QUESTION_KINDS)):
        if column in test.column_names:
            return [next((k for k, rx in kinds if rx.search(s)), "other") for s in test[column]]
    return None


def by_kind(h: np.ndarray, kinds: list[str] | None) -> dict[str, float]:
    if kinds is None:
        return {}
    k = np.array(kinds)
    return {name: round(float(100 * h[k == name].mean()), 1) for name in dict.fromkeys(kinds)}


def check_prefix(small, test) -> None:
    """The recipe's own test split must be the first examples of the larger one."""
    head = test.select(range(ORIGINAL_TEST))
    for col in small.column_names:
        a, b = small.with_format("numpy")[col], head.with_format("numpy")[col]
        if len(a) != len(b) or any(not np.array_equal(x, y) for x, y in zip(a, b)):
            raise SystemExit(f"the test split of {ORIGINAL_TEST} is not the start of the larger one "
                             f"(column {col!r} differs): the generator changed; rescoring would mix splits")


def runs_of(family: str, task: str, build: str) -> list[tuple[dict, Path]]:
    """comp.json rows of the current build whose run directory still holds the run."""
    found = []
    for row in json.loads(RESULTS.read_text()):
        if (row["family"], row["task"], row.get("zoo_build")) != (family, task, build):
            continue
        d = run_dir(family, task, row["method"], row["flops_reduction"], row.get("seed", 0))
        if not (d / "report.json").exists() or not (d / "model").is_dir():
            print(f"{d.name}: no run directory with an export; not rescored", flush=True)
            continue
        report = json.loads((d / "report.json").read_text())
        head = report["headline_metric"]
        if (round(report["final"]["metrics"][head], 2) != row["value"] or report["seed"] != row.get("seed", 0)
                or round(report["baseline"]["metrics"][head], 2) != row["dense_value"]):
            print(f"{d.name}: holds another run than the row's; not rescored", flush=True)
            continue
        found.append((row, d))
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="blip:nlvr", choices=["blip:nlvr", "blip:vqa"],
                    help="a task scored per example (NLVR's true/false, VQA's exact match)")
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--against", default="upop", help="method every other is compared with")
    ap.add_argument("--across-cuts", action="store_true",
                    help="where no run of --against reached a run's cut (at its target or another), "
                         "compare with --against at the same target although it stopped short "
                         "(parameters only ends at 0.760 on VQA); rows then name its cut")
    args = ap.parse_args()
    family, task = args.task.split(":")
    reg = get_registry()
    recipe = load_recipe(ROOT / "recipes" / f"comp_{family}_{task}.yaml", reg)
    recorded = recipe.data.params
    if recorded.test_size != ORIGINAL_TEST or args.test_size <= ORIGINAL_TEST:
        raise SystemExit(f"the recipes measure on {recorded.test_size} test examples and this script "
                         f"extends {ORIGINAL_TEST}; --test-size must be larger than {ORIGINAL_TEST}")
    build = zoo_build(recipe.model.zoo)
    dense, _ = load_model(recipe.model, reg, recipe.seed, log=lambda m: None)
    source = reg.datasets[recipe.data.source]
    test = source(recorded.model_copy(update={"test_size": args.test_size}), recipe.seed).load(dense)["test"]
    check_prefix(source(recorded, recipe.seed).load(dense)["test"], test)
    dense_hits = hits(dense, test, task)
    dense_first = round(100 * dense_hits[:ORIGINAL_TEST].mean(), 2)
    dense_value = round(100 * dense_hits.mean(), 2)
    kinds = statement_kinds(test)
    dense_kinds = by_kind(dense_hits, kinds)
    print(f"dense: {dense_value:.2f} on {len(test)}, by kind {dense_kinds}", flush=True)
    scored, rows = {}, []
    for row, d in runs_of(family, task, build):
        h = cached_hits(d, reg, test, task)
        first = round(100 * h[:ORIGINAL_TEST].mean(), 2)
        key = (row["method"], row["flops_reduction"], row["seed"])
        if first != row["value"] or dense_first != row["dense_value"]:
            print(f"{d.name}: the first {ORIGINAL_TEST} give {first} (dense {dense_first}), the row "
                  f"says {row['value']} (dense {row['dense_value']}); not rescored", flush=True)
            continue
        scored[key] = h
        rows.append({"family": family, "task": task, "method": key[0], "flops_reduction": key[1],
                     "seed": key[2], "zoo_build": build, "test_size": len(test),
                     "token_sites": row.get("token_sites", "-"),
                     "achieved_flops_reduction": row["achieved_flops_reduction"],
                     "value_500": row["value"], "value": round(100 * h.mean(), 2),
                     "rest": round(100 * h[ORIGINAL_TEST:].mean(), 2),
                     "dense_value": dense_value, "by_statement": by_kind(h, kinds),
                     "dense_by_statement": dense_kinds})
        print(f"{d.name}: {row['value']} on 500, {rows[-1]['value']} on {len(test)}", flush=True)
    achieved = {(r["method"], r["flops_reduction"], r["seed"]): r["achieved_flops_reduction"] for r in rows}
    for r in rows:
        own = (r["method"], r["flops_reduction"], r["seed"])
        key = reference(own, scored, achieved, args.against, args.across_cuts)
        if key is not None:
            lo, hi = paired_bootstrap(scored[own], scored[key])
            r[f"minus_{args.against}"] = round(r["value"] - 100 * scored[key].mean(), 2)
            r[f"minus_{args.against}_ci95"] = [round(lo, 2), round(hi, 2)]
            if key[1] != own[1] or not same_cut(achieved, key, own):
                r[f"{args.against}_target"] = key[1]
                r[f"{args.against}_achieved"] = achieved[key]
    merge_rows(OUT, rows, ("family", "task", "method", "flops_reduction", "seed", "zoo_build",
                           "test_size", "token_sites"), defaults={"token_sites": "-"})
    print(table(rows, args.against))
    print(seed_means(scored, achieved, args.against, args.across_cuts))
    if kinds is not None:
        print(kind_table(rows))


def same_cut(achieved: dict[tuple, float], a: tuple, b: tuple) -> bool:
    """Whether two runs reached the same FLOPs cut (within 0.01), so pairing them compares
    methods and not cuts."""
    return round(abs(achieved[a] - achieved[b]), 6) <= 0.01     # 0.77 - 0.76 is 0.0100000...09


def reference(own: tuple, scored: dict[tuple, np.ndarray], achieved: dict[tuple, float], against: str,
              across_cuts: bool) -> tuple | None:
    """The `against` run that `own` (method, target, seed) is paired with: the same seed at the same
    target if it reached the same cut; else the same seed at another target whose run reached
    `own`'s cut (CoMP aimed at 0.76 against parameters only that stopped at 0.760 short of 0.8);
    else, with `across_cuts`, the same target although it stopped short. None if there is none,
    or if `own` is an `against` run."""
    if own[0] == against:
        return None
    same_target = (against, own[1], own[2])
    if same_target in scored and same_cut(achieved, same_target, own):
        return same_target
    at_cut = [k for k in scored if k[0] == against and k[2] == own[2] and same_cut(achieved, k, own)]
    if at_cut:
        return min(at_cut, key=lambda k: abs(achieved[k] - achieved[own]))
    return same_target if across_cuts and same_target in scored else None


def seed_means(scored: dict[tuple, np.ndarray], achieved: dict[tuple, float], against: str,
               across_cuts: bool) -> str:
    """Each method's mean over the seeds it has a `reference` run for at a target, minus those
    references': per example, the hits averaged over seeds, then the paired bootstrap (an interval
    for these seeds' models, as the per-seed ones are). The table gives each reference's cut and
    the target it aimed at, which can differ seed by seed."""
    lines = [f"| method | target | seeds | mean on all | minus {against} (95% CI) | {against}'s cut |",
             "|---|---|---|---|---|---|"]
    for method, target in sorted({(m, t) for m, t, _ in scored if m != against}, key=lambda k: (k[1], k[0])):
        pairs = [(own, reference(own, scored, achieved, against, across_cuts))
                 for own in sorted(k for k in scored if k[:2] == (method, target))]
        pairs = [(own, ref) for own, ref in pairs if ref is not None]
        if len(pairs) < 2:
            continue
        a = np.mean([scored[own] for own, _ in pairs], axis=0)
        b = np.mean([scored[ref] for _, ref in pairs], axis=0)
        lo, hi = paired_bootstrap(a, b)
        seeds = ", ".join(str(own[2]) for own, _ in pairs)
        cuts = ", ".join(f"{achieved[ref]:.3f} (aimed at {ref[1]})" for _, ref in pairs)
        lines.append(f"| {method} | {target} | {seeds} | {100 * a.mean():.2f} | "
                     f"{100 * (a.mean() - b.mean()):+.2f} ({lo:+.2f}, {hi:+.2f}) | {cuts} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def kind_table(rows: list[dict]) -> str:
    """Accuracy by NLVR statement or VQA question kind, the dense model first."""
    if not rows:
        return ""
    names = list(rows[0]["by_statement"])
    lines = [f"| model | target | seed | {' | '.join(names)} |", "|---|---|---|" + "---|" * len(names),
             f"| dense | – | – | {' | '.join(str(rows[0]['dense_by_statement'][n]) for n in names)} |"]
    for r in sorted(rows, key=lambda r: (r["flops_reduction"], r["method"], r["seed"])):
        lines.append(f"| {r['method']} | {r['flops_reduction']} | {r['seed']} | "
                     f"{' | '.join(str(r['by_statement'][n]) for n in names)} |")
    return "\n".join(lines)


def table(rows: list[dict], against: str) -> str:
    lines = [f"| method | target | seed | on 500 | on the other {rows[0]['test_size'] - ORIGINAL_TEST if rows else 0} "
             f"| on all | minus {against} (95% CI) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["flops_reduction"], r["method"], r["seed"])):
        ci = r.get(f"minus_{against}_ci95")
        diff = f"{r[f'minus_{against}']:+.1f} ({ci[0]:+.1f}, {ci[1]:+.1f})" if ci else ""
        if f"{against}_achieved" in r:     # a reference at another target, or one that stopped short
            diff += f" against {against} at {r[f'{against}_achieved']:.3f}"
        lines.append(f"| {r['method']} | {r['flops_reduction']} | {r['seed']} | {r['value_500']:.1f} | "
                     f"{r['rest']:.1f} | {r['value']:.1f} | {diff} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
