"""CoMP against its single-mode baselines at several FLOPs reductions (BENCHMARKS.md, CoMP table).

    .venv/bin/python benchmarks/comp_table.py --ratios 0.5 0.8 [--methods comp upop tokens sjp]
                                              [--ablations] [--tasks clip:retrieval blip:nlvr]
                                              [--seeds 0 1 2]
    .venv/bin/python benchmarks/comp_table.py --tasks llava:instruct --ratios 0.3 0.46 0.62 \
                                              --methods pdrop fastv pdrop_sft params
    .venv/bin/python benchmarks/comp_table.py --tasks llava:vqa --ratios 0.62 --methods comp params pdrop

Every method runs its recipe (recipes/comp_<family>_<task>.yaml, recipes/baselines/*) with
only the FLOPs target changed, so budgets, data, search schedule and fine-tuning steps are the
same. Numbers are test metrics of the exported model; FLOPs reductions are the analytic means
over the test split; speedups are median latencies of the dense and pruned models timed
interleaved in the same run. LLaVA's token-only methods (PDrop, FastV) take their targets as
reductions of the decoder's prefill FLOPs (`flops_scope: decoder`), with the whole model's
beside. Rows go to benchmarks/results/comp.json (one per family, task, method, ratio, seed, zoo
build and token sites, so a rebuilt zoo or a recipe whose token score or sites changed adds
rows; a rerun replaces its rows) and a markdown table is printed. A run's directory is per
method, ratio and seed only: a rerun replaces the export of a row kept for another build or
token sites (rescore.py checks the directory holds the row's run).
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from results_file import merge_rows

from mmprune.errors import MMPruneError
from mmprune.pipeline import run
from mmprune.plugins.manager import get_registry
from mmprune.recipe import load_recipe
from mmprune.zoo.build import MANIFEST, zoo_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "comp.json"
#: family:task pairs that have a CoMP recipe and baseline recipes
TASKS = ("clip:retrieval", "blip:nlvr", "blip:vqa", "llava:instruct", "llava:vqa")
#: token-only methods inside the LLaVA decoder; their FLOPs targets are of the decoder's prefill
LLAVA_TOKEN_METHODS = ("pdrop", "fastv", "pdrop_sft")

#: method -> (recipe, overrides besides the target)
def methods(family: str, task: str) -> dict[str, tuple[Path, list[str]]]:
    if family == "llava":    # the instruct recipes; VQA (answers generated) swaps the data
        base = ROOT / "recipes" / "baselines"
        data = [] if task == "instruct" else [f"data.minivl={task}"]
        return {"comp": (ROOT / "recipes" / "comp_llava_instruct.yaml", data),
                "sjp": (base / "sjp_llava_instruct.yaml", data),
                "pdrop": (ROOT / "recipes" / "pdrop_llava.yaml", data),
                "fastv": (ROOT / "recipes" / "fastv_llava.yaml", data),
                "pdrop_sft": (base / "pdrop_sft_llava_instruct.yaml", data),
                "params": (base / "params_llava_instruct.yaml", data)}
    comp = ROOT / "recipes" / f"comp_{family}_{task}.yaml"
    base = ROOT / "recipes" / "baselines"
    upop = base / f"upop_{family}_{task}.yaml"
    tokens = base / f"tokens_{family}_{task}.yaml"
    sjp = base / f"sjp_{family}_{task}.yaml"
    return {
        "comp": (comp, []),
        "upop": (upop, []),
        "tokens": (tokens, []),
        "sjp": (sjp, []),
        # control: the dense model trained as long as a search and its fine-tuning, nothing pruned
        "dense_ft": (base / f"dense_ft_{family}_{task}.yaml", []),
        # ablations (comp.md §8). Under the recipes' distinct image-token score, `cit` acts on
        # the text tokens' ranking and on the attention that weighs CIP, not on the image
        # tokens' ranking; the rows before 2026-11-26 (token_sites 'attention; default sites')
        # are the paper's ablations
        "comp_cim_off": (comp, ["passes.0.comp.cip=false", "passes.0.comp.cit=false"]),
        "comp_cip_only": (comp, ["passes.0.comp.cit=false"]),
        "comp_cit_only": (comp, ["passes.0.comp.cip=false"]),
        "comp_round_robin": (comp, ["passes.0.comp.schedule=round_robin"]),
        "comp_greedy": (comp, ["passes.0.comp.rho=0", "passes.0.comp.lambda0=0"]),
        "comp_greedy_explore": (comp, ["passes.0.comp.lambda0=0"]),
        # stages priced by their plan before they train (comp.cost_at), against Eq. 3's stage end
        "comp_plan": (comp, ["passes.0.comp.cost_at=plan"]),
        # every mode's plan priced before the choice; dear plans refused
        "comp_lookahead": (comp, ["passes.0.comp.cost_at=lookahead"]),
        # lookahead prices corrected by each mode's recent gap to its stage-end costs
        "comp_calibrated": (comp, ["passes.0.comp.cost_at=lookahead",
                                   "passes.0.comp.lookahead_calibration=true"]),
        # stage-end pricing as the spec's, with plans far dearer than the cheapest refused
        "comp_refuse": (comp, ["passes.0.comp.refuse_dear_plans=true",
                               "passes.0.comp.lookahead_margin=20"]),
        # stages priced by the headline validation metric (Eq. 3) instead of the recipes' loss
        "comp_accuracy": (comp, ["passes.0.comp.cost_metric=val_metric"]),
        # a parameter stage takes what its units make the token sites drop, several quanta at times
        "comp_no_refit": (comp, ["passes.0.comp.refit_tokens=false"]),
        # stage-end pricing against the same weights with the stage's cut put back (de-trended)
        "comp_paired": (comp, ["passes.0.comp.cost_at=paired"]),
        # a mode's cost is the median of its last five stage costs instead of Eq. 5's blend
        "comp_median": (comp, ["passes.0.comp.cost_memory=median"]),
        # exploration every 1/ρ-th choice instead of with probability ρ (seed 0: none in 25 stages)
        "comp_stride": (comp, ["passes.0.comp.exploration=stride"]),
        # a token stage takes at most a third of what its mode has left (as parameter stages do)
        "comp_token_share": (comp, ["passes.0.comp.token_stage_share=0.34"]),
        "upop_plan": (upop, ["passes.0.comp.cost_at=plan"]),
        # parameters only, with the same undo of stages that lose over a tenth of their quality
        "upop_rollback": (upop, ["passes.0.comp.rollback_drop=0.1"]),
        # the CLIP and NLVR recipes undo stages (rollback_drop 0.1); these are without it
        "upop_no_rollback": (upop, ["passes.0.comp.rollback_drop=null"]),
        "comp_no_rollback": (comp, ["passes.0.comp.rollback_drop=null"]),
        "tokens_no_rollback": (tokens, ["passes.0.comp.rollback_drop=null"]),
        "sjp_no_rollback": (sjp, ["passes.0.comp.rollback_drop=null", "passes.1.comp.rollback_drop=null"]),
        # at least half of each site's caption tokens kept, against MPS emptying the text tower
        "comp_text_floor": (comp, ["passes.0.comp.min_token_frac={language_tokens: 0.5}"]),
        # every mode but text tokens (BLIP: NLVR's statements decide the answer)
        "comp_no_text_tokens": (comp, ["passes.0.comp.modes=[vision_params, language_params, "
                                       "cross_params, vision_tokens]"]),
        # every mode but image tokens (BLIP): vision FLOPs only from ViT heads and channels
        "comp_no_vision_tokens": (comp, ["passes.0.comp.modes=[vision_params, language_params, "
                                         "cross_params, language_tokens]"]),
        # dropped tokens folded into one weighted token, as the token-only baseline does
        "comp_merge": (comp, ["passes.0.comp.merge_dropped=fuse_one"]),
        # the recipes until e3e1756: image tokens ranked by the attention they receive (CIT, the
        # paper), at a site after every ViT block
        "comp_attention": (comp, ["passes.0.comp.token_score=attention", "passes.0.comp.token_layers=null"]),
        # attention-ranked image-token sites after blocks 1-3 only (BLIP/CLIP MiniVL: 4 blocks),
        # where attention received says least about where the objects are at block 0
        "comp_late_tokens": (comp, ["passes.0.comp.token_score=attention",
                                    "passes.0.comp.token_layers={vision: [1, 2, 3]}"]),
        "tokens_late": (tokens, ["passes.0.comp.token_layers={vision: [1, 2, 3]}"]),
        # and every image keeps a quarter of its patches at least, about what its objects touch
        # (27% on average): below that even a perfect score loses information
        "comp_late_floor": (comp, ["passes.0.comp.token_score=attention",
                                   "passes.0.comp.token_layers={vision: [1, 2, 3]}",
                                   "passes.0.comp.min_token_frac={vision_tokens: 0.25}"]),
        # the recipes rank image tokens by how unlike the image's other patches they are
        # (token_localization.py, BLIP NLVR: AUC 0.88-0.90 for the patches objects touch, against
        # 0.61-0.68 by attention received) at one site after the ViT's first block. These take
        # one of the two back: distinctiveness at every block (the carried score re-cut at later
        # sites compounds) and attention at the one site
        "comp_distinct": (comp, ["passes.0.comp.token_layers=null"]),
        "comp_first": (comp, ["passes.0.comp.token_score=attention"]),
        # the token-only baseline (attention at every block, MADTP-like) given the recipes' score
        "tokens_distinct": (tokens, ["passes.0.comp.token_score={vision_tokens: distinct}"]),
        "tokens_distinct_first": (tokens, ["passes.0.comp.token_score={vision_tokens: distinct}",
                                           "passes.0.comp.token_layers={vision: [0]}"]),
        # no mode runs more than three stages in a row: the others are priced again on the
        # model as it is (seed 0 ran 25 image-token stages in a row on the converged NLVR model)
        "comp_max_run": (comp, ["passes.0.comp.max_run=3"]),
        # a mode whose next stage would remove under a quarter of a quantum is retired
        "comp_retire": (comp, ["passes.0.comp.retire_below=0.25"]),
        # a stage that loses more than a tenth of its starting quality is undone
        "comp_rollback": (comp, ["passes.0.comp.rollback_drop=0.1"]),
        # a tighter bar: a stage that adds over 5% to the validation loss is undone
        "comp_rollback05": (comp, ["passes.0.comp.rollback_drop=0.05"]),
        "upop_rollback05": (upop, ["passes.0.comp.rollback_drop=0.05"]),
        # fine-tuning distilled from the dense model (KL on its logits, weight 1), same steps
        "comp_kd": (comp, ["passes.1.finetune.kd_weight=1.0"]),
        "upop_kd": (upop, ["passes.1.finetune.kd_weight=1.0"]),
        # three times the fine-tuning steps (900), selection on validation as before
        "comp_long_ft": (comp, ["passes.1.finetune.steps=900"]),
        "upop_long_ft": (upop, ["passes.1.finetune.steps=900"]),
        # distilled in the search's training steps too
        "comp_kd_search": (comp, ["passes.0.comp.kd_weight=1.0", "passes.1.finetune.kd_weight=1.0"]),
        "upop_kd_search": (upop, ["passes.0.comp.kd_weight=1.0", "passes.1.finetune.kd_weight=1.0"]),
    }


ABLATIONS = ["comp_cim_off", "comp_cip_only", "comp_cit_only", "comp_round_robin", "comp_greedy",
             "comp_greedy_explore"]


def targets(method: str, ratio: float) -> list[str]:
    if method in LLAVA_TOKEN_METHODS:
        return [f"passes.0.token_prune.flops_target={ratio}"]
    if method == "params":     # LLaVA: structured pruning of the decoder to the target
        return [f"passes.1.prune_structured.target={ratio}"]
    if method == "dense_ft":   # nothing pruned: the target does not apply
        return []
    if method == "sjp":   # tokens to half the reduction, then parameters for the rest
        return [f"passes.0.comp.target={ratio / 2}", f"passes.1.comp.target={ratio}"]
    return [f"passes.0.comp.target={ratio}"]


def zoo_build(name: str | None) -> str:
    """The zoo model's build: a hash of its manifest (training time, loss curve, machine), so
    two builds whose dense test metric rounds alike are kept apart in the results file."""
    return hashlib.sha256((zoo_dir(name) / MANIFEST).read_bytes()).hexdigest()[:12] if name else "-"


def token_sites(rec) -> str:
    """How the recipe's first comp pass with a token mode ranks tokens and where its sites are
    ('attention; default sites', after every block of a ViT or BERT-style tower, at
    round(L·{1/4, 1/2, 3/4}) in a decoder LLM;
    'vision_tokens distinct; vision [0]'), '-' without one: rows of one method measured under
    recipes that differ there are kept apart in the results file."""
    comp = next((spec.params for spec in rec.passes if spec.name == "comp"
                 and (spec.params.modes == "all"
                      or any(m.endswith("_tokens") for m in spec.params.modes))), None)
    if comp is None:
        return "-"
    score, layers = comp.token_score, comp.token_layers

    def each(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items())
    return (f"{score if isinstance(score, str) else each(score)}; "
            f"{'default sites' if layers is None else each(layers)}")


def run_dir(family: str, task: str, method: str, ratio: float, seed: int) -> Path:
    """Where `run_one` writes a run (and rescore.py finds its export)."""
    return ROOT / "runs" / "bench" / "comp" / f"{family}_{task}_{method}_{ratio}_s{seed}"


def run_one(family: str, task: str, method: str, ratio: float, seed: int = 0) -> dict:
    recipe, extra = methods(family, task)[method]
    reg = get_registry()
    out = run_dir(family, task, method, ratio, seed)
    rec = load_recipe(recipe, reg, tuple(targets(method, ratio) + extra + [f"seed={seed}"]))
    t0 = time.perf_counter()
    report = run(rec, reg, out=out, overwrite=True, show_progress=False, log=lambda m: None)
    head = report["headline_metric"]
    row = {"family": family, "task": task, "method": method, "flops_reduction": ratio, "seed": seed,
           "achieved_flops_reduction": round(report["ratios"]["flops_reduction"], 4),
           "metric": head, "value": round(report["final"]["metrics"][head], 2),
           "dense_value": round(report["baseline"]["metrics"][head], 2),
           "zoo_build": zoo_build(rec.model.zoo), "token_sites": token_sites(rec),
           "speedup": round(report["ratios"]["speedup"], 3),
           "params_reduction": round(report["ratios"]["params_reduction"], 4),
           "seconds": round(time.perf_counter() - t0, 1)}
    for key in ("ttft_speedup", "decode_speedup"):     # generating families: the two phases
        if key in report["ratios"]:
            row[key] = round(report["ratios"][key], 3)
    if family == "llava":    # targets are of the decoder's FLOPs, the whole model's beside
        tower = "language"
        before, after = (report[k]["flops_by_tower"][tower] for k in ("baseline", "final"))
        return {**row, "flops_scope": "decoder",
                "achieved_flops_reduction": round(1 - after / before, 4),
                "model_flops_reduction": row["achieved_flops_reduction"],
                "sites": report["state"].get("token_prune", {}).get("sites"),
                **_comp_summary(report)}
    if not report["state"].get("comp"):      # dense_ft: nothing pruned, no target
        steps = sum(f["steps"] for f in report["state"].get("finetune", []))
        return {**row, "flops_reduction": 0.0, "schedule": f"dense, {steps} fine-tuning steps"}
    cp = report["state"]["comp"][0]["params"]
    return {**row,
            # the search schedule, so rows measured under different recipes are not confused
            "schedule": f"quantum {cp['stage_quantum']}, K {cp['k_min']}, {cp['cost_metric']}"
                        + (f", param quantum {pq}" if (pq := _param_quantum(report)) else "")
                        + (f", rollback {cp['rollback_drop']}" if cp.get("rollback_drop") else "")
                        + "".join(f", {spec.name} distilled {spec.params.kd_weight}" for spec in rec.passes
                                  if getattr(spec.params, "kd_weight", 0))}


def _comp_summary(report: dict) -> dict:
    """LLaVA CoMP / SJP rows: each token mode's final θ and the modes the stages ran."""
    comps = report["state"].get("comp")
    if not comps:
        return {}
    stages = [t["mode"] for c in comps for t in c["trajectory"] if t["mode"]]
    return {"thresholds": comps[-1]["thresholds"],
            "stages": {m: stages.count(m) for m in dict.fromkeys(stages)}}


def _param_quantum(report: dict) -> float | None:
    """The parameter quantum of the run's parameter-pruning comp pass, if it had one."""
    return next((c["params"].get("param_quantum") for c in report["state"]["comp"]
                 if c["params"].get("param_quantum")), None)


def save(rows: list[dict]) -> None:
    # the zoo build in the key: a rebuilt zoo (another machine, another dense model) adds rows,
    # even where its dense metric rounds as an earlier build's did. Rows from before builds were
    # recorded are told apart by dense_value only; rows from before seeds were, ran seed 0. The
    # token sites too: a method run again after the recipes changed them adds rows
    merge_rows(RESULTS, rows, ("family", "task", "method", "flops_reduction", "dense_value",
                               "zoo_build", "seed", "token_sites"),
               defaults={"seed": 0, "zoo_build": "-"})


def table(rows: list[dict]) -> str:
    lines = ["| family | task | method | seed | target | achieved | metric | value | dense | kept | speedup | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = 100 * r["value"] / r["dense_value"] if r["dense_value"] else float("nan")
        lines.append(f"| {r['family']} | {r['task']} | {r['method']} | {r['seed']} | {r['flops_reduction']} | "
                     f"{r['achieved_flops_reduction']:.3f} | {r['metric']} | {r['value']:.2f} | "
                     f"{r['dense_value']:.2f} | {kept:.0f}% | {r['speedup']:.2f}x | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["clip:retrieval"], choices=TASKS)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.85])
    ap.add_argument("--methods", nargs="+", default=["comp", "upop", "tokens", "sjp"])
    ap.add_argument("--ablations", action="store_true", help="also the ablations, at 0.8 only")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (the recipes' is 0): "
                    "the search's batches, exploration draws and fine-tuning order; the zoo model "
                    "is the same")
    args = ap.parse_args()
    plan = []
    for pair in args.tasks:
        family, task = pair.split(":")
        plan += [(family, task, m, r, s) for s in args.seeds for r in args.ratios for m in args.methods]
        if args.ablations:
            plan += [(family, task, m, 0.8, s) for s in args.seeds for m in ABLATIONS]
    rows = []
    # dense_ft prunes nothing: one run per seed, its row and run directory at 0.0 whatever
    # --ratios asked (rescore.py finds the directory by the row's cut)
    plan = list(dict.fromkeys((f, t, m, 0.0 if m == "dense_ft" else r, s) for f, t, m, r, s in plan))
    for family, task, method, ratio, seed in plan:
        try:
            row = run_one(family, task, method, ratio, seed)
        except MMPruneError as exc:       # e.g. a token-only target beyond what its sites can drop
            print(f"| {family} | {task} | {method} | {seed} | {ratio} | not reachable: {exc} |", flush=True)
            continue
        rows.append(row)
        save([row])
        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
