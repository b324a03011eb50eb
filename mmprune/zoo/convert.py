"""Weight converters between zoo families, for `ZooEntry.init_convert`: a trained parent's state
dict rewritten into the child architecture's names and layouts before `init_map` applies.

BLIP's ViT is CLIP's with the q / k / v projections fused into one `qkv` Linear, a bias on the
patch embedding and the vision projection, and no layer norm before the first block. That layer
norm is folded into the embeddings: its centring is linear and folds exactly, its division by each
token's standard deviation does not, and is replaced by the median over a sample of real images.
On clip-minivl the converted tower's image embeddings have cosine 0.83 to the original's (0.57
with the layer norm dropped): a warm start, not the same function, which the child's training
adapts.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mmprune.errors import MMPruneError, did_you_mean

Weights = dict[str, torch.Tensor]


def _clip_embeddings(w: Weights, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP's vision embeddings (CLS + patches, plus positions) before its pre-block layer norm."""
    src = "vision_model.embeddings."
    patch = w[src + "patch_embedding.weight"]
    x = torch.nn.functional.conv2d(pixels, patch, stride=patch.shape[-1]).flatten(2).transpose(1, 2)
    cls = w[src + "class_embedding"].expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], 1) + w[src + "position_embedding.weight"]


def clip_vision_to_blip(w: Weights, sample: dict[str, torch.Tensor]) -> Weights:
    """CLIPModel's vision tower and visual projection as BLIP `vision_model.*` and `vision_proj.*`,
    its pre-block layer norm folded into the embeddings with the median token deviation on
    `sample["pixel_values"]`."""
    src, out = "vision_model.", {}
    with torch.no_grad():
        sigma = _clip_embeddings(w, sample["pixel_values"]).std(-1, unbiased=False).median()
    gamma, beta = w[src + "pre_layrnorm.weight"], w[src + "pre_layrnorm.bias"]
    dim = gamma.numel()
    fold = (gamma / sigma)[:, None] * (torch.eye(dim) - 1.0 / dim)   # y ≈ fold @ x + beta
    emb = w[src + "embeddings.class_embedding"]
    out["vision_model.embeddings.class_embedding"] = (fold @ emb).reshape(1, 1, -1)
    pos = w[src + "embeddings.position_embedding.weight"]
    out["vision_model.embeddings.position_embedding"] = (pos @ fold.T + beta).unsqueeze(0)
    patch = w[src + "embeddings.patch_embedding.weight"]
    out["vision_model.embeddings.patch_embedding.weight"] = torch.einsum("od,dchw->ochw", fold, patch)
    out["vision_model.embeddings.patch_embedding.bias"] = patch.new_zeros(patch.shape[0])
    layer = 0
    while f"{src}encoder.layers.{layer}.layer_norm1.weight" in w:
        a, b = f"{src}encoder.layers.{layer}.", f"vision_model.encoder.layers.{layer}."
        for kind in ("weight", "bias"):
            out[b + f"self_attn.qkv.{kind}"] = torch.cat(
                [w[a + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], 0)
            out[b + f"self_attn.projection.{kind}"] = w[a + f"self_attn.out_proj.{kind}"].clone()
            for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                out[b + f"{name}.{kind}"] = w[a + f"{name}.{kind}"].clone()
        layer += 1
    for kind in ("weight", "bias"):
        out[f"vision_model.post_layernorm.{kind}"] = w[src + f"post_layernorm.{kind}"].clone()
    proj = w["visual_projection.weight"]
    out["vision_proj.weight"] = proj.clone()
    out["vision_proj.bias"] = proj.new_zeros(proj.shape[0])
    return out


#: name -> converter(parent weights, a collated batch of the child's training data)
CONVERTERS: dict[str, Callable[[Weights, dict[str, torch.Tensor]], Weights]] = {
    "clip_vision_to_blip": clip_vision_to_blip}


def convert(name: str, weights: Weights, sample: dict[str, torch.Tensor]) -> Weights:
    if name not in CONVERTERS:
        raise MMPruneError(f"unknown weight converter '{name}'." + did_you_mean(name, CONVERTERS))
    return CONVERTERS[name](weights, sample)
