"""The `mmprune` command line (click). User errors print one paragraph and exit 2; no tracebacks."""
from __future__ import annotations

import functools
import json
import sys
import textwrap
from pathlib import Path

import click

from mmprune.errors import MMPruneError

EXIT_USER_ERROR = 2


def _registry(strict: bool):
    from mmprune.plugins.manager import get_registry

    reg = get_registry(strict)
    for f in reg.failures:
        click.echo(f"warning: plugin '{f.name}' ({f.target}) failed to import and was skipped: "
                   f"{f.error}", err=True)
    return reg


def _planned(recipe: Path, overrides: tuple[str, ...], strict: bool):
    """Load, override, validate and plan a recipe: every check that needs no model."""
    from mmprune.pipeline import plan
    from mmprune.recipe import load_recipe

    reg = _registry(strict)
    rec = load_recipe(recipe, reg, tuple(overrides))
    return rec, plan(rec, reg)


def user_errors(fn):
    """Turn MMPruneError (and its kin) into a one-paragraph message and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MMPruneError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted; the run directory is marked failed and can be resumed "
                       "with --resume.", err=True)
            sys.exit(130)
    return wrapper


strict_option = click.option("--strict-plugins", is_flag=True,
                             help="Fail when a plugin cannot be imported (default: warn and skip).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a recipe field, e.g. passes.1.prune_structured.target=0.5.")


@click.group()
@click.version_option(package_name="mmprune")
def main() -> None:
    """mmprune: compress vision-language models with recipes of pruning and quantization passes."""


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (default: recipe's output).")
@set_option
@click.option("--resume", is_flag=True, help="Continue after the last completed pass in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@strict_option
@user_errors
def run(recipe, out, overrides, resume, overwrite, quiet, strict_plugins):
    """Run RECIPE and write the compressed model and its report."""
    from mmprune.pipeline import run as run_pipeline
    from mmprune.recipe import load_recipe

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other.")
    reg = _registry(strict_plugins)
    rec = load_recipe(recipe, reg, tuple(overrides))
    out_dir = out or Path(rec.output)
    report = run_pipeline(rec, reg, out=out_dir, resume=resume, overwrite=overwrite,
                          show_progress=not quiet)
    r, head = report["ratios"], report.get("headline_metric")
    b, f = report["baseline"]["metrics"], report["final"]["metrics"]
    click.echo(f"done: {out_dir}/report.md")
    if head:
        click.echo(f"  {head}: {b[head]:.2f} -> {f[head]:.2f}")
    click.echo(f"  FLOPs -{r['flops_reduction'] * 100:.1f}%, params -{r['params_reduction'] * 100:.1f}%, "
               f"speedup {r['speedup']:.2f}x")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@set_option
@strict_option
@user_errors
def plan(recipe, overrides, strict_plugins):
    """Validate RECIPE, check every pass's requirements, and print the ordered plan."""
    from mmprune.pipeline import format_plan

    rec, planned = _planned(recipe, overrides, strict_plugins)
    click.echo(format_plan(rec, planned))


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@set_option
@strict_option
@user_errors
def validate(recipe, overrides, strict_plugins):
    """Validate RECIPE (schema, pass names, parameters, requirements) without loading a model."""
    rec, _ = _planned(recipe, overrides, strict_plugins)
    click.echo(f"{recipe}: valid ({len(rec.passes)} passes)")


def _field_doc(name: str, field) -> str:
    default = field.default if field.default is not None else "null"
    ann = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
    return f"      {name} ({ann}, default {json.dumps(default, default=str)}): {field.description or ''}"


@main.command()
@strict_option
@user_errors
def passes(strict_plugins):
    """List the registered passes with their parameters."""
    reg = _registry(strict_plugins)
    for name, cls in sorted(reg.passes.items()):
        click.echo(f"{name}  [{reg.origin[('passes', name)]}]  {cls.summary()}")
        needs, gives = ", ".join(sorted(cls.requires)) or "-", ", ".join(sorted(cls.provides)) or "-"
        click.echo(f"    requires: {needs}; provides: {gives}")
        for fname, field in cls.Params.model_fields.items():
            click.echo("\n".join(textwrap.wrap(_field_doc(fname, field), 100,
                                               subsequent_indent=" " * 8)))


@main.command()
@strict_option
@user_errors
def plugins(strict_plugins):
    """List the loaded plugins and what each registers."""
    reg = _registry(strict_plugins)
    for plugin in reg.plugins:
        owned = {kind: sorted(n for (k, n), p in reg.origin.items() if k == kind and p == plugin)
                 for kind in ("passes", "models", "datasets")}
        click.echo(f"{plugin}")
        for kind, names in owned.items():
            if names:
                click.echo(f"    {kind}: {', '.join(names)}")
    for f in reg.failures:
        click.echo(f"{f.name}  FAILED to import ({f.target}): {f.error}")


@main.command()
@strict_option
@user_errors
def schema(strict_plugins):
    """Print the JSON schema of recipes (with the passes registered now)."""
    from mmprune.recipe import recipe_json_schema

    click.echo(json.dumps(recipe_json_schema(_registry(strict_plugins)), indent=2))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of markdown.")
@user_errors
def report(run_dir, as_json):
    """Print the report of a completed run."""
    from mmprune.report import to_markdown

    path = run_dir / "report.json"
    if not path.exists():
        status = ""
        if (run_dir / "run.json").exists():
            try:
                info = json.loads((run_dir / "run.json").read_text())
            except json.JSONDecodeError:
                info = {"status": "unreadable run.json"}
            status = f" (run status: {info.get('status')}{'; ' + info['error'] if info.get('error') else ''})"
        raise MMPruneError(f"{run_dir} has no report.json: the run is not complete{status}.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MMPruneError(f"{path} is not valid JSON ({exc}).") from None
    click.echo(json.dumps(data, indent=2) if as_json else to_markdown(data))


@main.group()
def zoo() -> None:
    """The MiniVL model zoo: small real-architecture models trained offline on MiniVL tasks."""


@zoo.command("list")
@user_errors
def zoo_list():
    """List zoo models, whether each is built, and its dense test metrics."""
    from mmprune.zoo.build import is_built, read_manifest, stale_warning, zoo_dir
    from mmprune.zoo.catalog import CATALOG

    for name, e in CATALOG.items():
        stale = None
        if is_built(name):
            m = read_manifest(name)
            test = ", ".join(f"{k} {v:.1f}" for k, v in m["metrics"]["test"].items())
            state = f"built ({zoo_dir(name)}): test {test}"
            stale = stale_warning(name)
        else:
            state = "not built"
        click.echo(f"{name}  [{e.family}, MiniVL {e.task}]  {state}")
        click.echo(f"    {e.description}")
        if stale:
            click.echo(f"    stale: {stale}")


@zoo.command("build")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even if already built.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def zoo_build(names, force, quiet):
    """Train zoo models NAMES (default: all) into the cache ($MMPRUNE_CACHE or ~/.cache/mmprune)."""
    from mmprune.zoo.build import build, entry, is_built, stale_warning
    from mmprune.zoo.catalog import CATALOG

    for name in names or tuple(CATALOG):
        entry(name)
        if not force and is_built(name) and (stale := stale_warning(name)):
            click.echo(f"warning: {stale}", err=True)      # kept, not rebuilt
        out = build(name, force=force, progress=not quiet, log=lambda m: click.echo(m, err=True))
        click.echo(f"{name}: {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
