"""The executor: plan a recipe, run its passes in order, checkpoint after each, resume, report.

A run directory holds `run.json` (status: running / failed / complete), `recipe.yaml` (the recipe
after overrides), `checkpoints/` (the latest completed pass: model + context), and, only once the
run is complete, `report.json`, `report.md` and `plots/`. A run that stops half way therefore never
looks finished, and `--resume` continues after the last completed pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from mmprune import __version__
from mmprune.context import Context, seed_everything
from mmprune.errors import MMPruneError, RecipeError, did_you_mean
from mmprune.measure import generation_latencies_ms, latencies_ms, latency_batch, measure
from mmprune.models.loading import load_model
from mmprune.passes.base import INITIAL_FACTS, Pass
from mmprune.plugins.manager import Registry
from mmprune.recipe import Recipe
from mmprune.saved import load_bundle, save

RUN_FILE, REPORT_JSON, CHECKPOINTS = "run.json", "report.json", "checkpoints"


class RunDirError(MMPruneError):
    pass


@dataclass
class PlannedPass:
    index: int
    name: str
    instance: Pass
    line: int | None

    @property
    def label(self) -> str:
        return f"{self.index:03d}-{self.name}"


def _check_inputs(recipe: Recipe, registry: Registry) -> None:
    """Checks that need no model: the model path exists, split names exist."""
    file = str(recipe.path) if recipe.path else None
    kind, value = recipe.model.source
    if kind == "zoo":
        from mmprune.zoo.catalog import CATALOG
        if value not in CATALOG:
            raise RecipeError(f"unknown zoo model '{value}'." + did_you_mean(value, CATALOG),
                              file=file, line=recipe.lines.get(("model", "zoo")), field="model.zoo")
    if kind == "path" and not Path(value).is_dir():
        raise RecipeError(f"model path '{value}' does not exist or is not a directory.",
                          file=file, line=recipe.lines.get(("model", "path")), field="model.path")
    splits = registry.datasets[recipe.data.source].splits
    if recipe.evaluation.split not in splits:
        raise RecipeError(f"unknown split '{recipe.evaluation.split}'."
                          + did_you_mean(recipe.evaluation.split, splits), file=file,
                          line=recipe.lines.get(("evaluation", "split")), field="evaluation.split")
    for spec in recipe.passes:
        cls = registry.passes[spec.name]
        for name in type(spec.params).model_fields:
            split = getattr(spec.params, name) if name.endswith("split") else None
            field = f"passes.{spec.index}.{spec.name}.{name}"
            if split is not None and split not in splits:
                raise RecipeError(f"unknown split '{split}'." + did_you_mean(split, splits),
                                  file=file, line=spec.line, field=field)
            if split is not None and cls.calibrates and split == recipe.evaluation.split:
                raise RecipeError(f"'{spec.name}' would calibrate on '{split}', the split the "
                                  "report is measured on; use another split (train or validation).",
                                  file=file, line=spec.line, field=field)


def plan(recipe: Recipe, registry: Registry) -> list[PlannedPass]:
    """Instantiate the passes and check each one's `requires` against what earlier passes provide."""
    _check_inputs(recipe, registry)
    facts = set(INITIAL_FACTS)
    planned = []
    for spec in recipe.passes:
        inst = registry.passes[spec.name](spec.params)
        field = f"passes.{spec.index}.{spec.name}"
        missing = sorted(inst.needs() - facts)
        if missing:
            providers = sorted(n for n, c in registry.passes.items() if set(missing) & c.provides)
            hint = (f" Add one of these passes before it: {', '.join(providers)}." if providers
                    else " No registered pass provides it.")
            raise RecipeError(f"pass '{spec.name}' requires {', '.join(repr(m) for m in missing)}, "
                              f"which no earlier pass provides.{hint}",
                              file=str(recipe.path) if recipe.path else None, line=spec.line, field=field)
        blocked = sorted(inst.excludes & facts)
        if blocked:
            raise RecipeError(f"pass '{spec.name}' cannot run once {', '.join(repr(b) for b in blocked)} "
                              "holds (an earlier pass made it so); move it earlier in the recipe.",
                              file=str(recipe.path) if recipe.path else None, line=spec.line, field=field)
        facts |= inst.gives()
        planned.append(PlannedPass(spec.index, spec.name, inst, spec.line))
    return planned


def format_plan(recipe: Recipe, planned: list[PlannedPass]) -> str:
    kind, value = recipe.model.source
    data = f"{recipe.data.source}: {getattr(recipe.data.params, 'task', '')}"
    lines = [f"model  {kind}: {value}", f"data   {data}", f"output {recipe.output}", "passes:"]
    for p in planned:
        params = p.instance.params.model_dump(exclude_defaults=True)
        needs = ", ".join(sorted(p.instance.needs())) or "-"
        gives = ", ".join(sorted(p.instance.gives())) or "-"
        lines.append(f"  {p.index}. {p.name} {json.dumps(params) if params else ''}".rstrip())
        lines.append(f"       requires: {needs}; provides: {gives}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run directory

def _recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def _read_run_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is unreadable ({exc}); the run directory is damaged. Start "
                          "again with --overwrite.") from None


def _source_dir(recipe: Recipe) -> Path | None:
    kind, value = recipe.model.source
    return Path(value).resolve() if kind in ("path", "hf") and Path(value).is_dir() else None


def prepare_run_dir(out: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> dict | None:
    """Create or reopen `out`. Returns the previous run.json when resuming."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output {out} exists and is not a directory.")
    run_file = out / RUN_FILE
    if resume:
        if not run_file.exists():
            raise RunDirError(f"--resume: {out} holds no mmprune run ({RUN_FILE} is missing).")
        previous = _read_run_file(run_file)
        if previous.get("recipe_hash") != _recipe_hash(recipe):
            raise RunDirError(f"--resume: the recipe (after --set overrides) differs from the one {out} "
                              "was started with; resume with the same recipe, or use --overwrite.")
        return previous
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(f"output directory {out} is not empty. Use --resume to continue the run "
                              "in it, --overwrite to replace it, or --out to choose another directory.")
        if not run_file.exists():
            raise RunDirError(f"--overwrite: {out} is not an mmprune run directory ({RUN_FILE} is "
                              "missing); refusing to delete it.")
        source = _source_dir(recipe)
        if source is not None and source.is_relative_to(out.resolve()):
            raise RunDirError(f"--overwrite: the source model {source} lies inside {out}; "
                              "overwriting would delete it. Choose another --out.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


# ----------------------------------------------------------------------------- checkpoints

def _latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / CHECKPOINTS).glob("[0-9][0-9][0-9]-*") if (p / "DONE").exists())
    return done[-1] if done else None


def write_checkpoint(out: Path, label: str, ctx: Context, record: dict) -> None:
    root = out / CHECKPOINTS
    final, tmp = root / label, root / f".{label}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp / "model", ctx.adapter, ctx.graph)
    flat = {f"{fact}|{gid}": t.contiguous() for fact, d in ctx.scores.items() for gid, t in d.items()}
    if flat:
        save_file(flat, str(tmp / "scores.safetensors"))
    _write_json(tmp / "context.json", {"facts": sorted(ctx.facts), "evaluations": ctx.evaluations,
                                       "state": ctx.state, "record": record})
    (tmp / "DONE").write_text(label)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("[0-9][0-9][0-9]-*"):  # keep only the latest model on disk
        if old.name < label:
            shutil.rmtree(old, ignore_errors=True)


def _restore(ctx: Context, ckpt: Path) -> list[dict]:
    saved = _read_run_file(ckpt / "context.json")
    ctx.facts = set(saved["facts"])
    ctx.evaluations, ctx.state = saved["evaluations"], saved["state"]
    if (ckpt / "scores.safetensors").exists():
        for key, t in load_file(str(ckpt / "scores.safetensors")).items():
            fact, gid = key.split("|", 1)
            ctx.scores.setdefault(fact, {})[gid] = t
    return saved["state"].get("_records", [])


# ----------------------------------------------------------------------------- memory sampling

class PeakRSS:
    """Samples this process's resident memory while a pass runs (Linux /proc; else ru_maxrss)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    @staticmethod
    def current_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current_mb()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current_mb())


# ----------------------------------------------------------------------------- run

def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_context(recipe: Recipe, registry: Registry, show_progress: bool,
                  checkpoint: Path | None) -> Context:
    if checkpoint is not None:
        bundle = load_bundle(checkpoint / "model", registry)
        adapter, graph = bundle.adapter, bundle.graph
    else:
        adapter, bundle = load_model(recipe.model, registry, recipe.seed)
        graph = bundle.graph if bundle else None
    task = recipe.data.params.task
    if task not in type(adapter).tasks:
        raise RecipeError(f"model family '{adapter.name}' does not support task '{task}'."
                          + did_you_mean(task, type(adapter).tasks),
                          file=str(recipe.path) if recipe.path else None, line=recipe.data.line,
                          field=f"data.{recipe.data.source}")
    source = registry.datasets[recipe.data.source](recipe.data.params, recipe.seed)
    data = source.load(adapter)
    if graph is None:
        from mmprune.graph import trace
        graph = trace(adapter)
    ctx = Context(adapter, graph, data, task, seed=recipe.seed, show_progress=show_progress,
                  evaluation=recipe.evaluation)
    if _source_dir(recipe) is not None:
        ctx.state["source_path"] = str(_source_dir(recipe))
    if checkpoint is None:
        # the cost model's default token counts: the validation split's mean, never test
        counts = [adapter.tokens_per_example(b) for b in ctx.batches("validation", 64)]
        graph.cost.tokens = {t: float(torch.cat([c[t] for c in counts]).mean()) for t in counts[0]}
    ctx.facts = set(INITIAL_FACTS)
    return ctx


def run(recipe: Recipe, registry: Registry, *, out: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, show_progress: bool = True,
        log: Callable[[str], None] = _log_default) -> dict:
    """Execute `recipe`; returns the report (also written to OUT/report.json)."""
    from mmprune.report import write_report

    planned = plan(recipe, registry)  # every check that needs no model, before any model is loaded
    out = Path(out or recipe.output)
    previous = prepare_run_dir(out, recipe, resume=resume, overwrite=overwrite)
    if previous and previous.get("status") == "complete" and (out / REPORT_JSON).exists():
        log(f"{out}: run already complete; nothing to resume.")
        return _read_run_file(out / REPORT_JSON)
    run_info = {"status": "running", "recipe_hash": _recipe_hash(recipe), "mmprune": __version__,
                "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json(out / RUN_FILE, run_info)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    try:
        report = _execute(recipe, registry, planned, out, resume, show_progress, log)
        write_report(out, report)
    except BaseException as exc:
        run_info.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                        traceback=traceback.format_exc(limit=8))
        _write_json(out / RUN_FILE, run_info)
        raise
    run_info.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    _write_json(out / RUN_FILE, run_info)
    return report


def _execute(recipe: Recipe, registry: Registry, planned: list[PlannedPass], out: Path,
             resume: bool, show_progress: bool, log: Callable[[str], None]) -> dict:
    ckpt = _latest_checkpoint(out) if resume else None
    seed_everything(recipe.seed)
    ctx = _load_context(recipe, registry, show_progress, ckpt)
    ctx.run_dir = out
    ctx.logger = log
    ctx.load_dense = lambda: load_model(recipe.model, registry, recipe.seed)[0]
    records: list[dict] = []
    baseline_file = out / CHECKPOINTS / "baseline.json"
    if ckpt is not None:
        records = _restore(ctx, ckpt)
        baseline = _read_run_file(baseline_file)
        log(f"resuming after {ckpt.name}")
    elif resume and baseline_file.exists():
        baseline = _read_run_file(baseline_file)
    else:
        log("measuring the dense baseline …")
        baseline = measure(ctx, recipe.evaluation, with_latency=False)
        baseline_file.parent.mkdir(parents=True, exist_ok=True)
        _write_json(baseline_file, baseline)
    done = len(records)
    for p in planned[done:]:
        log(f"[{p.index + 1}/{len(planned)}] {p.name}")
        seed_everything(recipe.seed * 100_003 + p.index + 1)
        t0 = time.perf_counter()
        # a pass that fits the model to data must never see the report split (comp.md §12.12)
        ctx.sealed_split = recipe.evaluation.split if p.instance.calibrates else None
        try:
            with PeakRSS() as rss:
                p.instance.run(ctx)
        finally:
            ctx.sealed_split = None
        ctx.facts |= p.instance.gives()
        record = {"name": p.name, "seconds": round(time.perf_counter() - t0, 3),
                  "peak_rss_mb": round(rss.peak, 1)}
        records.append(record)
        ctx.state["_records"] = records
        write_checkpoint(out, p.label, ctx, record)
    log("measuring the final model …")
    final = measure(ctx, recipe.evaluation, with_latency=False)
    dense, _ = load_model(recipe.model, registry, recipe.seed)
    batch = latency_batch(ctx, recipe.evaluation)
    dense_ms, final_ms = latencies_ms([dense, ctx.adapter], batch, recipe.evaluation)
    baseline["latency_ms"], final["latency_ms"] = dense_ms, final_ms
    generation = generation_latencies_ms([dense, ctx.adapter], batch, recipe.evaluation)
    if generation is not None:
        baseline["generation"], final["generation"] = generation
    return build_report(recipe, ctx, baseline, final, records)


def _reduction(before: float, after: float) -> float:
    return 1 - after / before if before else 0.0


def _generation_speedups(baseline: dict, final: dict) -> dict[str, float]:
    if "generation" not in final:
        return {}
    b, f = baseline["generation"], final["generation"]
    return {"ttft_speedup": b["ttft_ms"] / f["ttft_ms"],
            "decode_speedup": (b["decode_ms_per_token"] / f["decode_ms_per_token"]
                               if f["decode_ms_per_token"] > 0 else float("nan"))}


def build_report(recipe: Recipe, ctx: Context, baseline: dict, final: dict, records: list[dict]) -> dict:
    head = type(ctx.adapter).headline_metric.get(ctx.task)
    return {
        "mmprune": __version__,
        "recipe": str(recipe.path) if recipe.path else None,
        "model": dict([recipe.model.source]),
        "data": {"source": recipe.data.source, **recipe.data.params.model_dump()},
        "task": ctx.task,
        "headline_metric": head,
        "seed": recipe.seed,
        "flops_convention": "2 x multiply-accumulates of matmuls and convolutions, per example, "
                            "mean over the evaluated split (analytic cost model)",
        "baseline": baseline,
        "final": final,
        "ratios": {
            "flops_reduction": _reduction(baseline["flops"], final["flops"]),
            "params_reduction": _reduction(baseline["params"], final["params"]),
            "size_reduction": _reduction(baseline["size_bytes"], final["size_bytes"]),
            "speedup": baseline["latency_ms"] / final["latency_ms"],
            **_generation_speedups(baseline, final),
        },
        "latency": {"batch_size": recipe.evaluation.latency_batch_size,
                    "repeats": recipe.evaluation.latency_repeats,
                    "threads": recipe.evaluation.threads or torch.get_num_threads(),
                    "method": "median of timed forwards, dense and final interleaved in one process"},
        "structure": ctx.graph.structure(),
        "evaluations": ctx.evaluations,
        "state": {k: v for k, v in ctx.state.items() if not k.startswith("_")},
        "passes": records,
    }
