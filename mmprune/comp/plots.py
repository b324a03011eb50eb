"""`plots/mps_modes.png`: which mode each stage advanced, and FLOPs and quality over stages."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmprune.comp.mps import CANONICAL

COLOURS = {"vision_tokens": "#1f77b4", "language_tokens": "#ff7f0e", "vision_params": "#2ca02c",
           "language_params": "#d62728", "cross_params": "#9467bd"}
#: why MPS chose a stage's mode -> its marker
MARKERS = {"warm-up": "s", "explore": "^", "exploit": "o", "turn": "D", "capped": "P"}


def plot_trajectory(result: dict[str, Any], path: Path, task: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = result["trajectory"]
    stages = [t for t in traj if t["mode"] is not None]
    modes = [m for m in CANONICAL if m in result["modes"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.4]})
    for t in stages:
        top.scatter(t["stage"], modes.index(t["mode"]), color=COLOURS[t["mode"]], s=60,
                    marker=MARKERS.get(t.get("why"), "o"))
        if t.get("undone"):     # rollback_drop: the stage was run, priced and taken back
            top.scatter(t["stage"], modes.index(t["mode"]), s=110, marker="x", color="red")
        for m in t.get("lookahead", {}):    # cost_at lookahead: the plans priced and passed over
            if m == t["mode"]:
                continue
            if m in t["refused"]:
                top.scatter(t["stage"], modes.index(m), s=18, marker="x", color="grey")
            else:
                top.scatter(t["stage"], modes.index(m), s=18, marker="o", facecolors="none",
                            edgecolors="grey")
    top.set_yticks(range(len(modes)), modes)
    top.set_ylim(-0.5, len(modes) - 0.5)
    title = "MPS: mode per stage (square: warm-up, triangle: exploration, circle: lowest cost)"
    if any(t.get("why") == "turn" for t in stages):
        title = "Round-robin: mode per stage (modes in turn, whatever they cost)"
    if any(t.get("why") == "capped" for t in stages):
        title += "\nplus: lowest cost but for a mode that had run max_run stages in a row"
    if any(t.get("undone") for t in stages):
        title += "\nred x: stage undone (lost more than rollback_drop of its quality)"
    if any("lookahead" in t for t in stages):
        title += "\nsmall: priced, not chosen (x: refused as far dearer than the cheapest)"
    top.set_title(title, fontsize=9)
    top.grid(axis="x", alpha=0.3)
    xs = [t["stage"] for t in traj]
    bottom.plot(xs, [t["flops"] for t in traj], color="black", marker=".", label="FLOPs (share of dense)")
    bottom.axhline(result["target"], color="black", ls=":", lw=1, label="target")
    bottom.set_ylabel("FLOPs / dense")
    bottom.set_xlabel("stage")
    twin = bottom.twinx()
    twin.plot(xs, [t["quality"] for t in traj], color="tab:purple", marker=".", label="validation quality")
    twin.set_ylabel(f"validation quality ({task})", color="tab:purple")
    lines = bottom.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    bottom.legend(lines, [ln.get_label() for ln in lines], loc="lower left", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
