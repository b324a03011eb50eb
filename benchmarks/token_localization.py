"""Do attention scores find the patches a MiniVL statement is about?

    .venv/bin/python benchmarks/token_localization.py [--dense ZOO ...] [EXPORT_DIR ...]

Token pruning can only keep what a scene's statement or question is about if its scores rank the
object patches above the background. MiniVL knows where its objects are, so this measures it on
`--images` fresh scenes (1-4 objects each, as the tasks draw them):

- each dense zoo model (`--dense`), per ViT block: how well each candidate score ranks the
  8 x 8 patches an object touches: CIT's attention received (heads combined by max, the ViT
  default, or by mean), the CLS token's attention (EViT's score) and the distinctiveness
  (1 − mean cosine similarity to the other patches, `token_score: distinct`). Columns: object patches among the top 30% and
  15% of patches (recall) and the ROC AUC of the score for "an object touches this patch"
  (0.5: no better than chance).
- each exported model given, per token site: the share of all patches it keeps, and of object
  patches (the runtime's own kept sets, θ and floors as exported).
- `--curve N` (with an NLVR zoo model, the first `--dense`): accuracy on N fresh statement
  pairs against the share of the dense FLOPs left when image tokens are dropped by the
  runtime's keep rule at θ (`--thetas`), at every ViT block or at some, ranked by attention
  received or by distinctiveness. No fine-tuning.
- `--nlvr N` (with an NLVR zoo model, the first `--dense`): how much of the dense model's
  accuracy on N fresh statement pairs survives when, at one ViT block (`--block`), each image
  keeps only as many patches as its objects touch (x `--budget`), chosen by the object masks
  (an oracle), by the runtime's attention score (CIT), by distinctiveness, or at random. No fine-tuning: it asks
  whether the information is in few patches, and whether the score finds them.

Writes benchmarks/results/token_localization.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from mmprune.data.minivl import language
from mmprune.data.minivl import scenes as S
from mmprune.graph import trace
from mmprune.models.loading import load_model
from mmprune.plugins.manager import get_registry
from mmprune.recipe import ModelSpec
from mmprune.runtime import tokens as T
from mmprune.runtime import SiteControl
from mmprune.runtime.runtime import TokenRuntime, runtime_of

HERE = Path(__file__).parent
SIZE, PATCH = 64, 8


def object_mask(scene: S.Scene, size: int = SIZE) -> np.ndarray:
    """The pixels `scene`'s objects cover, replaying `render`'s draws (checked against it)."""
    rng = np.random.default_rng(scene.background)
    img = S.background(size, rng)
    covered = np.zeros((size, size), dtype=bool)
    cell = size / 3
    for obj in scene.objects:
        r = cell * S.RADIUS[obj.size]
        room = max(0.0, cell * 0.5 - r) * S.JITTER
        cy = (obj.row + 0.5) * cell + rng.uniform(-room, room)
        cx = (obj.col + 0.5) * cell + rng.uniform(-room, room)
        colour = np.asarray(S.COLORS[obj.color], dtype=float) + rng.normal(0, 12, 3)
        m = S._mask(obj.shape, r, cy, cx, size)
        img[m] = colour + rng.normal(0, 8, (int(m.sum()), 3))
        covered |= m
    if not np.array_equal(np.clip(img, 0, 255).astype(np.uint8), S.render(scene, size)):
        raise RuntimeError("object_mask no longer replays scenes.render; update it")
    return covered


def object_patches(mask: np.ndarray) -> np.ndarray:
    """[patches] bool, row-major as the ViT numbers them: an object touches the patch."""
    n = mask.shape[0] // PATCH
    return mask.reshape(n, PATCH, n, PATCH).any(axis=(1, 3)).reshape(-1)


def scenes_with_objects(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    drawn = [S.sample_scene(rng) for _ in range(n)]
    return [S.render(s, SIZE) for s in drawn], np.stack([object_patches(object_mask(s)) for s in drawn])


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of one image's patch scores (Mann-Whitney U, ties averaged)."""
    r = rankdata(score)
    n1 = positive.sum()
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(positive) - n1)))


def recall_at(score: np.ndarray, positive: np.ndarray, share: float) -> float:
    top = np.argsort(-score, axis=1, kind="stable")[:, :round(score.shape[1] * share)]
    hit = np.take_along_axis(positive, top, axis=1).sum(1)
    return float(np.mean(hit / positive.sum(1).clip(min=1)))


def candidate_scores(attn: torch.Tensor, hidden: torch.Tensor) -> dict[str, np.ndarray]:
    """Per patch scores [B, patches] from one block's attention [B, H, N, N] (CLS at 0) and its
    hidden states [B, N, D] after attention, where a token site scores."""
    b, _, n, _ = attn.shape
    valid = torch.ones(b, n, dtype=torch.bool)
    cls = torch.zeros_like(valid)
    cls[:, 0] = True
    return {"received (max)": T.attention_received(attn, valid, cls, reduce="max")[:, 1:].numpy(),
            "received (mean)": T.attention_received(attn, valid, cls, reduce="mean")[:, 1:].numpy(),
            "CLS attention": attn[:, :, 0, 1:].mean(1).numpy(),
            "distinctiveness": T.distinctiveness(hidden, valid & ~cls)[:, 1:].numpy()}


@torch.inference_mode()
def score_table(name: str, images, positive) -> list[dict]:
    adapter, _ = load_model(ModelSpec(zoo=name, attn_implementation="eager"), get_registry(), 0)
    px = adapter.image_processor(images, return_tensors="pt")["pixel_values"]
    after_attention = []      # the residual stream between attention and MLP: layer_norm2's input
    hooks = [layer.layer_norm2.register_forward_pre_hook(lambda m, a: after_attention.append(a[0]))
             for layer in adapter.model.vision_model.encoder.layers]
    try:
        attentions = adapter.model.vision_model(pixel_values=px, output_attentions=True).attentions
    finally:
        for h in hooks:
            h.remove()
    some = (positive.sum(1) > 0) & (positive.sum(1) < positive.shape[1])
    rows = []
    for layer, attn in enumerate(attentions):
        for kind, s in candidate_scores(attn, after_attention[layer]).items():
            rows.append({"model": name, "block": layer, "score": kind,
                         "recall_top30": round(recall_at(s, positive, 0.3), 3),
                         "recall_top15": round(recall_at(s, positive, 0.15), 3),
                         "auc": round(float(np.mean([auc(s[i], positive[i]) for i in np.flatnonzero(some)])), 3)})
    return rows


@torch.inference_mode()
def kept_table(export: str, images, positive) -> list[dict]:
    adapter, _ = load_model(ModelSpec(path=export), get_registry(), 0)
    rt = runtime_of(adapter.model)
    tower = rt.towers.get("vision") if rt is not None else None
    if tower is None:
        return [{"model": export, "site": "-", "kept": 1.0, "objects_kept": 1.0}]
    px = adapter.image_processor(images, return_tensors="pt")["pixel_values"]
    adapter.model.vision_model(pixel_values=px)
    rows = []
    for layer, (position, valid) in sorted(tower.last_kept.items()):
        kept = np.zeros_like(positive)
        for i in range(len(positive)):
            p = position[i][valid[i]]
            p = p[(p >= 1) & (p <= positive.shape[1])] - 1       # not CLS, not a merged token
            kept[i, p.numpy()] = True
        rows.append({"model": export, "site": layer, "kept": round(float(kept.mean()), 3),
                     "objects_kept": round(float(kept[positive].mean()), 3)})
    return rows


def nlvr_pairs(n: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """`n` statement pairs drawn as the NLVR task draws them (without its per-statement label
    balancing), and the object patches [2n, patches] in the order the BLIP adapter runs the
    pair's images (every left image, then every right one)."""
    rng = np.random.default_rng(seed)
    rows, masks = [], {"left": [], "right": []}
    for _ in range(n):
        left, right = S.sample_scene(rng), S.sample_scene(rng)
        text, truth = language.statement(left, right, rng)
        rows.append({"image_left": S.render(left), "image_right": S.render(right),
                     "statement": text, "label": int(truth)})
        masks["left"].append(object_patches(object_mask(left)))
        masks["right"].append(object_patches(object_mask(right)))
    return rows, np.stack(masks["left"] + masks["right"])


def choose_kept(policy: str, positive: np.ndarray, scores: dict[str, torch.Tensor], budget: float,
                rng: np.random.Generator) -> torch.Tensor:
    """[rows, patches] bool: `budget` x as many patches as each image's objects touch. `scores`:
    the runtime's attention score and the distinctiveness, [rows, patches] each."""
    kept = np.zeros_like(positive)
    for i, pos in enumerate(positive):
        k = min(len(pos), max(1, round(budget * pos.sum())))
        if policy == "objects":
            order = np.lexsort((-scores["attention"][i].numpy(), ~pos))   # object patches first, by score
        elif policy in ("attention", "distinct"):
            order = np.argsort(-scores[policy][i].numpy(), kind="stable")
        else:
            order = rng.permutation(len(pos))
        kept[i, order[:k]] = True
    return torch.from_numpy(kept)


@torch.inference_mode()
def oracle_table(name: str, n: int, block: int, budgets: list[float], seed: int) -> list[dict]:
    adapter, _ = load_model(ModelSpec(zoo=name), get_registry(), 0)
    rows, positive = nlvr_pairs(n, seed)
    batch = adapter.collate(rows)
    rt = TokenRuntime.attach(trace(adapter))
    tower = rt.towers["vision"]
    dense = adapter.evaluate(iter([batch]), "nlvr")["accuracy"]
    out = [{"model": name, "block": block, "policy": "dense", "budget": None, "kept": 1.0,
            "accuracy": round(dense, 1)}]
    rt.set_sites("vision", SiteControl(theta=1.0), layers=[block])
    drop, chosen = tower._drop, {}

    def drop_chosen(st, s, site, layer):      # the site keeps CLS and the chosen patches
        if "kept" not in chosen:              # first pass: record the runtime's scores
            chosen["scores"] = {"attention": s[:, 1:].clone(),
                                "distinct": T.distinctiveness(st.x, st.valid & ~st.global_)[:, 1:]}
            return drop(st, s, SiteControl(theta=0.0), layer)
        keep = torch.cat([st.protected[:, :1], chosen["kept"]], dim=1) & st.valid
        index, valid = T.compaction(keep)
        g = lambda t: T.gather_tokens(t, index)                       # noqa: E731
        new = type(st)(g(st.x), valid, g(st.protected) & valid, g(st.global_) & valid,
                       g(st.position), st.candidates0)
        return new, g(s) * valid.to(s.dtype)

    tower._drop = drop_chosen
    adapter.evaluate(iter([batch]), "nlvr")
    for budget in budgets:
        for policy in ("objects", "attention", "distinct", "random"):
            chosen["kept"] = choose_kept(policy, positive, chosen["scores"], budget,
                                         np.random.default_rng(seed))
            acc = adapter.evaluate(iter([batch]), "nlvr")["accuracy"]
            out.append({"model": name, "block": block, "policy": policy, "budget": budget,
                        "kept": round(float(chosen["kept"].float().mean()), 3),
                        "accuracy": round(acc, 1)})
    tower._drop = drop
    return out


#: (ViT blocks with a site, score) of the `--curve` test
CURVES = [([0, 1, 2, 3], "attention"), ([0, 1, 2, 3], "distinct"), ([0], "attention"),
          ([0], "distinct"), ([0, 2], "distinct"), ([1, 2, 3], "distinct")]


@torch.inference_mode()
def curve_table(name: str, n: int, thetas: list[float], seed: int) -> list[dict]:
    """The dense NLVR model, no fine-tuning, image tokens dropped at θ by the runtime's own keep
    rule (floor 5%) for each (sites, score) of CURVES: accuracy on n fresh statement pairs
    against the share of the dense FLOPs per example (analytic cost model)."""
    adapter, _ = load_model(ModelSpec(zoo=name), get_registry(), 0)
    rows, _ = nlvr_pairs(n, seed)
    batches = [adapter.collate(rows[i:i + 100]) for i in range(0, n, 100)]
    graph = trace(adapter)
    rt = TokenRuntime.attach(graph)

    def measured() -> tuple[float, float]:
        correct, flops = 0.0, []
        for b in batches:
            correct += adapter.evaluate(iter([b]), "nlvr")["accuracy"] * len(b["labels"]) / 100
            flops.append(torch.as_tensor(graph.cost.flops_per_example(rt.counts())))
        return 100 * correct / n, float(torch.cat(flops).mean())

    dense, f0 = measured()
    out = [{"sites": "-", "score": "dense", "theta": None, "accuracy": round(dense, 1), "flops": 1.0}]
    for layers, score in CURVES:
        for theta in thetas:
            rt.set_sites("vision", SiteControl(theta=theta, min_keep_frac=0.05, score=score), layers=layers)
            acc, f = measured()
            out.append({"sites": layers, "score": score, "theta": theta, "accuracy": round(acc, 1),
                        "flops": round(f / f0, 3)})
        rt.set_sites("vision", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="*", help="mmprune export directories (runs/.../model)")
    ap.add_argument("--dense", nargs="+", default=["blip-minivl-nlvr", "clip-minivl"],
                    help="zoo models whose scores are compared")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--nlvr", type=int, default=0, help="statement pairs of the kept-set test (0: skip)")
    ap.add_argument("--block", type=int, default=1, help="ViT block of the kept-set test's site")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 2.0],
                    help="patches kept per image, as a multiple of those its objects touch")
    ap.add_argument("--curve", type=int, default=0, help="statement pairs of the accuracy-FLOPs "
                    "test of the token sites and scores (0: skip)")
    ap.add_argument("--thetas", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.0, 1.1, 1.3])
    a = ap.parse_args()
    images, positive = scenes_with_objects(a.images, a.seed)
    scores = [r for name in a.dense for r in score_table(name, images, positive)]
    kept = [r for e in a.exports for r in kept_table(e, images, positive)]
    oracle = oracle_table(a.dense[0], a.nlvr, a.block, a.budgets, a.seed) if a.nlvr else []
    curve = curve_table(a.dense[0], a.curve, a.thetas, a.seed + 1) if a.curve else []
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "token_localization.json").write_text(json.dumps(
        {"images": a.images, "seed": a.seed, "object_patch_share": round(float(positive.mean()), 3),
         "scores": scores, "kept": kept, "kept_set_test": oracle, "curve": curve}, indent=1) + "\n")
    print(f"object patches: {positive.mean():.0%} of all ({a.images} scenes)\n")
    print("| model | block | score | objects in top 30% | in top 15% | AUC |\n|---|---:|---|---:|---:|---:|")
    for r in scores:
        print(f"| {r['model']} | {r['block']} | {r['score']} | {r['recall_top30']:.2f} | "
              f"{r['recall_top15']:.2f} | {r['auc']:.2f} |")
    if kept:
        print("\n| export | site | patches kept | object patches kept |\n|---|---:|---:|---:|")
        for r in kept:
            print(f"| {r['model']} | {r['site']} | {r['kept']:.2f} | {r['objects_kept']:.2f} |")
    if oracle:
        print(f"\n{a.nlvr} NLVR pairs, site at block {a.block}\n")
        print("| patches kept, chosen by | per image (× object patches) | share kept | accuracy |\n"
              "|---|---:|---:|---:|")
        for r in oracle:
            print(f"| {r['policy']} | {r['budget'] or '-'} | {r['kept']:.2f} | {r['accuracy']:.1f} |")
    if curve:
        print(f"\n{a.curve} NLVR pairs, image tokens dropped, no fine-tuning\n")
        print("| sites (ViT blocks) | score | θ | FLOPs left | accuracy |\n|---|---|---:|---:|---:|")
        for r in curve:
            print(f"| {r['sites']} | {r['score']} | {r['theta'] or '-'} | {r['flops']:.3f} | {r['accuracy']:.1f} |")


if __name__ == "__main__":
    main()
