"""Run reports: report.json (the contract later tools read), report.md and plots/*.png."""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.4g}{unit}"


def to_markdown(report: dict) -> str:
    b, f, r = report["baseline"], report["final"], report["ratios"]
    head = report.get("headline_metric")
    lines = [f"# mmprune report: {report.get('recipe') or 'run'}", "",
             f"Model {json.dumps(report['model'])}, task `{report['task']}`, "
             f"data `{report['data']['source']}`, metrics on the `{b['split']}` split "
             f"({b['examples']} examples), seed {report['seed']}.", "",
             "| | dense | compressed | change |", "|---|---:|---:|---:|"]
    for name in b["metrics"]:
        mark = " (headline)" if name == head else ""
        lines.append(f"| {name}{mark} | {b['metrics'][name]:.2f} | {f['metrics'][name]:.2f} | "
                     f"{f['metrics'][name] - b['metrics'][name]:+.2f} |")
    lines += [
        f"| FLOPs / example | {_fmt(b['flops'])} | {_fmt(f['flops'])} | "
        f"−{r['flops_reduction'] * 100:.1f}% |",
        f"| parameters | {_fmt(b['params'])} | {_fmt(f['params'])} | "
        f"−{r['params_reduction'] * 100:.1f}% |",
        f"| size on disk | {_fmt(b['size_bytes'], 'B')} | {_fmt(f['size_bytes'], 'B')} | "
        f"−{r['size_reduction'] * 100:.1f}% |",
        f"| latency (batch {report['latency']['batch_size']}) | {b['latency_ms']:.2f} ms | "
        f"{f['latency_ms']:.2f} ms | {r['speedup']:.2f}× speedup |",
        *_generation_rows(b, f, r),
        "", f"FLOPs: {report['flops_convention']}. Pruning targets are met at the validation "
        f"split's mean token counts, so the FLOPs cut measured here can differ slightly. Latency: {report['latency']['method']}, "
        f"{report['latency']['repeats']} repeats, {report['latency']['threads']} threads.", "",
        "## Passes", "", "| # | pass | seconds | peak RSS (MB) |", "|---:|---|---:|---:|"]
    for i, p in enumerate(report["passes"]):
        lines.append(f"| {i} | {p['name']} | {p['seconds']:.2f} | {p['peak_rss_mb']:.0f} |")
    if report.get("evaluations"):
        lines += ["", "## Intermediate evaluations", "", "| label | split | metrics | FLOPs | latency |",
                  "|---|---|---|---:|---:|"]
        for e in report["evaluations"]:
            metrics = ", ".join(f"{k} {v:.2f}" for k, v in e["metrics"].items())
            lat = f"{e['latency_ms']:.2f} ms" if e.get("latency_ms") else "-"
            lines.append(f"| {e['label']} | {e['split']} | {metrics} | {_fmt(e['flops'])} | {lat} |")
    lines += _comp_section(report.get("state", {}))
    lines += _sparsity_section(report.get("state", {}), r["speedup"])
    lines += ["", "## Kept structure", "", "| group | kept / total |", "|---|---:|"]
    for gid, g in report["structure"].items():
        lines.append(f"| {gid} ({g['kind']}s) | {len(g['kept'])} / {g['total']} |")
    lines += ["", "Plots: `plots/summary.png`, `plots/structure.png`.", ""]
    return "\n".join(lines)


def _comp_section(state: dict) -> list[str]:
    """The CoMP search trajectory and fine-tuning selection, when the run had them."""
    lines = []
    for n, c in enumerate(state.get("comp", []), 1):
        name = "mps_modes.png" if n == 1 else f"mps_modes_{n}.png"
        stages = [t for t in c["trajectory"] if t["mode"]]
        lines += ["", f"## CoMP search {n}" if len(state["comp"]) > 1 else "## CoMP search", "",
                  f"Target: {c['target']:.3f} of the dense FLOPs (validation subset, "
                  f"{_fmt(c['dense_flops'])} dense); reached {c['final_flops']:.3f} in "
                  f"{len(stages)} stages of {c['steps_per_stage']} steps (+{c['warmup_steps']} "
                  f"warm-up). Modes: {', '.join(c['modes'])}. Token thresholds: "
                  + (", ".join(f"{t} θ={v:.3g}" for t, v in c["thresholds"].items()) or "none")
                  + f". Plot: `plots/{name}`.", "",
                  "| stage | mode | chosen by | FLOPs | validation | cost r |", "|---:|---|---|---:|---:|---:|"]
        for t in stages:
            why = f"{t['why']}, undone at {t['tried_quality']:.2f}" if t.get("undone") else t["why"]
            lines.append(f"| {t['stage']} | {t['mode']} | {why} | {t['flops']:.3f} | "
                         f"{t['quality']:.2f} | {t['r']:.3g} |")
    for f in state.get("finetune", []):
        within = any(h.get("within_target", True) for h in f["history"])
        rule = ("best validation within the FLOPs target" if within else
                "no step within the FLOPs target: best validation among the fewest FLOPs")
        lines += ["", f"Fine-tuning: {f['steps']} steps; selected step {f['selected_step']} "
                  f"({rule}): "
                  + ", ".join(f"{h['step']}: {h['quality']:.2f}" for h in f["history"]) + "."]
    return lines


def _sparsity_section(state: dict, speedup: float) -> list[str]:
    """Zeroed weights (layer-wise pruning) and what they do and do not buy on this hardware."""
    s = state.get("sparsity")
    if not s:
        return []
    lines = ["", "## Sparsity", "",
             f"Allocator `{s['allocator']}`: {s['prunable_sparsity'] * 100:.1f}% of the "
             f"{_fmt(s['prunable_params'])} weights inside the transformer blocks are zero "
             f"({s['total_sparsity'] * 100:.1f}% of all parameters). Per tower: "
             + ", ".join(f"{t} {v * 100:.1f}%" for t, v in s["towers"].items()) + ".",
             "", f"Zeroed weights keep their dense shapes: the parameter count, FLOPs and size "
             "above are the dense ones, and dense kernels do the same work on zeros, so the "
             f"measured speedup ({speedup:.2f}×) is what unstructured sparsity buys on this "
             "machine: nothing but noise. N:M sparsity needs semi-structured kernels (2:4 on "
             "recent GPUs) to run faster."]
    if len(set(s["blocks"].values())) > 1:
        scores = s.get("scores", {})
        se = {b: v for b, v in s.get("score_se", {}).items() if v is not None}
        if "score_passes" in s:
            lines += ["", f"Block scores from {s['score_passes']} scoring passes"
                      + (" (± one standard error over batches and directions)." if se else ".")]
        lines += ["", "| block | sparsity | score |", "|---|---:|---:|"]
        lines += [f"| {b} | {v * 100:.1f}% | "
                  + (f"{scores[b]:.4g}" + (f" ± {se[b]:.2g}" if b in se else "") if b in scores else "-")
                  + " |" for b, v in s["blocks"].items()]
    return lines


def plot_summary(report: dict, path: Path) -> None:
    b, f = report["baseline"], report["final"]
    names = ["FLOPs", "params", "size", "latency"]
    keys = ["flops", "params", "size_bytes", "latency_ms"]
    rel = [f[k] / b[k] if b[k] else 0 for k in keys]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [1] * 4, color="#cccccc", label="dense")
    ax.bar(names, rel, width=0.5, color="#3b7dd8", label="compressed")
    for i, v in enumerate(rel):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
    ax.set_ylabel("relative to dense")
    ax.set_ylim(0, 1.25)
    ax.legend(loc="upper right")
    ax.set_title("Compressed vs dense")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_structure(report: dict, path: Path) -> None:
    groups = report["structure"]
    towers = sorted({gid.split(".")[0] for gid in groups})
    fig, axes = plt.subplots(1, len(towers), figsize=(5 * len(towers), 3.2), squeeze=False)
    for ax, tower in zip(axes[0], towers):
        layers = sorted({int(gid.split(".")[1]) for gid in groups if gid.startswith(tower + ".")})
        for kind, color, offset in (("head", "#d8743b", -0.2), ("channel", "#3b7dd8", 0.2)):
            items = sorted((int(gid.split(".")[1]), len(g["kept"]) / g["total"])
                           for gid, g in groups.items() if gid.startswith(tower + ".") and g["kind"] == kind)
            if items:
                ax.bar([l + offset for l, _ in items], [v for _, v in items], width=0.4,
                       color=color, label=f"{kind}s kept")
        ax.set_title(f"{tower} tower")
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_ylim(0, 1.3)
        ax.axhline(1.0, color="#999999", lw=0.8, ls="--")
        ax.set_ylabel("fraction kept")
        ax.legend(loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, report: dict) -> None:
    """Plots and report.md first, report.json last and atomically: its presence means complete."""
    (out / "plots").mkdir(exist_ok=True)
    plot_summary(report, out / "plots" / "summary.png")
    plot_structure(report, out / "plots" / "structure.png")
    (out / "report.md").write_text(to_markdown(report))
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, out / "report.json")


def _generation_rows(b: dict, f: dict, r: dict) -> list[str]:
    if "generation" not in f:
        return []
    bg, fg = b["generation"], f["generation"]
    return [f"| time to first token | {bg['ttft_ms']:.2f} ms | {fg['ttft_ms']:.2f} ms | "
            f"{r['ttft_speedup']:.2f}× speedup |",
            f"| decode, per token | {bg['decode_ms_per_token']:.2f} ms | "
            f"{fg['decode_ms_per_token']:.2f} ms | {r['decode_speedup']:.2f}× speedup |"]
