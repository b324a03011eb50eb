"""Why `blip-minivl-nlvr` stays at chance: NLVR layouts on `blip-minivl`, per statement kind.

    .venv/bin/python benchmarks/nlvr_layouts.py probe                       # ~3 min
    .venv/bin/python benchmarks/nlvr_layouts.py finetune LAYOUT [--steps 600] [--lr 5e-4]
                                                [--batch-size 48] [--freeze-vision]

Layouts, all starting from the built `blip-minivl` (ViT, text encoder with cross-attention):
- `stitched`: the zoo's until 2026-11-23: the pair side by side (position embeddings interpolated to 8x16
  patches), one fused pass, the ITM head as classifier.
- `sides`: each image through the ViT on its own, one fused pass per image, a new linear head
  on the two [CLS] states (closer to BLIP's own NLVR model, which has two cross-attentions).
- `paired`: the zoo's now (`BlipRetrievalAdapter`'s NLVR forward): as `sides`, but each fused
  pass reads the statement behind a word naming its image ("left" / "right"), so the pass knows
  which side it sees, and the mean of the two [CLS] states goes through the model's own ITM head
  (no new parameters).

`probe` fits an MLP (one hidden layer of 256) on frozen features of the train split and scores
validation: the unimodal text [CLS] (a blind baseline), the stitched fused [CLS], the two
per-image fused [CLS], and the two images' ViT [CLS] and mean patch states with the text [CLS].
`finetune` trains the whole model (or all but the ViT) and scores validation every 300 steps.
Both print accuracy per statement kind; rows go to benchmarks/results/nlvr_layouts.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from mmprune.data.batching import iterate_batches
from mmprune.data.minivl.source import MiniVLParams, load_task
from mmprune.models.blip import BlipRetrievalAdapter
from mmprune.training import cosine
from mmprune.zoo.build import build

RESULTS = Path(__file__).parent / "results" / "nlvr_layouts.json"
KINDS = ("both", "side_has", "more_color", "more")
#: the statement set rows were measured on: "shapes" (kinds both / has / total / more, before
#: 2026-11-23) or "colours" (language.statement now)
STATEMENTS = "colours"


def kind(statement: str) -> str:
    """The statement's kind (language.statement): both, side_has, more_color or more."""
    if statement.startswith("both"):
        return "both"
    if "more objects" in statement:
        return "more"
    return "more_color" if "more" in statement else "side_has"


def scored(hits: np.ndarray, statements: list[str]) -> dict:
    kinds = np.array([kind(s) for s in statements])
    return {"accuracy": round(float(100 * hits.mean()), 1),
            **{k: round(float(100 * hits[kinds == k].mean()), 1) for k in KINDS if (kinds == k).any()}}


def halves(ad, b) -> tuple[tuple, tuple]:
    """Each image's ViT states (the adapter's batches hold the pair as [B, 2, C, H, W])."""
    return ad._vision(b["pixel_values"][:, 0]), ad._vision(b["pixel_values"][:, 1])


def stitched(ad, b) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT states of the pair side by side, position embeddings interpolated to 8x16 patches."""
    px = torch.cat([b["pixel_values"][:, 0], b["pixel_values"][:, 1]], dim=-1)
    states = ad.model.vision_model(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
    return states, torch.ones(states.shape[:2], dtype=torch.long)


def plain(b) -> dict:
    """The statement alone: the adapter's batches put a side word after [SOS] in each pass."""
    return {k: torch.cat([b[k][:, 0, :1], b[k][:, 0, 2:]], 1) for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def features(ad: BlipRetrievalAdapter, ds) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    out: dict[str, list] = {"text": [], "stitched": [], "sides": [], "vision": []}
    labels = []
    for b in iterate_batches(ad, ds, 100):
        left, right = halves(ad, b)
        statement = plain(b)
        text = ad._text_cls(statement)
        out["text"].append(text)
        out["stitched"].append(ad._text_cls(statement, stitched(ad, b)))
        out["sides"].append(torch.cat([ad._text_cls(statement, left), ad._text_cls(statement, right)], -1))
        out["vision"].append(torch.cat([left[0][:, 0], left[0][:, 1:].mean(1), right[0][:, 0],
                                        right[0][:, 1:].mean(1), text], -1))
        labels.append(b["labels"])
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)


def mlp_probe(xtr, ytr, xva, steps: int = 3000) -> torch.Tensor:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    net = torch.nn.Sequential(torch.nn.Linear(xtr.shape[1], 256), torch.nn.GELU(),
                              torch.nn.Dropout(0.2), torch.nn.Linear(256, 2))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (128,), generator=g)
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return net(xva).argmax(-1)


def probe(ad, data) -> list[dict]:
    tr, ytr = features(ad, data["train"])
    va, yva = features(ad, data["validation"])
    rows = []
    for name in tr:
        hits = (mlp_probe(tr[name], ytr, va[name]) == yva).numpy()
        rows.append({"experiment": "probe", "statements": STATEMENTS, "features": name,
                     **scored(hits, data["validation"]["statement"])})
        print(rows[-1], flush=True)
    return rows


def finetune(ad, data, layout: str, steps: int, lr: float, batch_size: int, freeze: bool) -> list[dict]:
    model = ad.model
    head = torch.nn.Linear(2 * model.config.text_config.hidden_size, 2)

    def logits(b):
        if layout == "stitched":
            text = plain(b)
            return ad._itm(stitched(ad, b), text["input_ids"], text["attention_mask"])
        if layout == "paired":      # the zoo's layout: the adapter's own NLVR forward
            return ad._pair_itm(b)
        left, right = halves(ad, b)
        statement = plain(b)
        return head(torch.cat([ad._text_cls(statement, left), ad._text_cls(statement, right)], -1))

    for n, p in model.named_parameters():
        p.requires_grad_(not (freeze and n.startswith("vision_model.")))
    params = [p for p in model.parameters() if p.requires_grad]
    params += list(head.parameters()) if layout == "sides" else []
    opt = torch.optim.AdamW(params, lr, weight_decay=0.05)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps, warm))
    rows, losses, epoch, t0 = [], [], 0, time.perf_counter()
    model.train()
    while len(losses) < steps:
        for b in iterate_batches(ad, data["train"], batch_size, shuffle=True, seed=epoch, drop_last=True):
            loss = F.cross_entropy(logits(b), b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if len(losses) % 300 == 0 or len(losses) == steps:
                model.eval()
                with torch.no_grad():
                    hits = np.array([h for v in iterate_batches(ad, data["validation"], 100)
                                     for h in (logits(v).argmax(-1) == v["labels"]).tolist()])
                model.train()
                rows.append({"experiment": "finetune", "statements": STATEMENTS, "layout": layout, "lr": lr,
                             "batch_size": batch_size, "freeze_vision": freeze, "step": len(losses),
                             "loss_last_100": round(float(np.mean(losses[-100:])), 3),
                             "seconds": round(time.perf_counter() - t0, 1),
                             **scored(hits, data["validation"]["statement"])})
                print(rows[-1], flush=True)
            if len(losses) >= steps:
                break
        epoch += 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["probe", "finetune"])
    ap.add_argument("layout", nargs="?", choices=["stitched", "sides", "paired"], default="stitched")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--freeze-vision", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval.from_pretrained(build("blip-minivl")).eval()
    ad = BlipRetrievalAdapter(model, *BlipRetrievalAdapter.default_processors(model))
    data = load_task(MiniVLParams(task="nlvr"))
    rows = (probe(ad, data) if a.experiment == "probe" else
            finetune(ad, data, a.layout, a.steps, a.lr, a.batch_size, a.freeze_vision))
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
