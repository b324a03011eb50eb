"""Token importance from attention (CIT) or from how unlike the other tokens a token is, the keep
rule, and the CIP token weights (comp.md §3-4)."""
from __future__ import annotations

import torch


def attention_received(probs: torch.Tensor, valid: torch.Tensor, global_: torch.Tensor,
                       head_mask: torch.Tensor | None = None, reduce: str = "max") -> torch.Tensor:
    """Raw CIT score s_i of every token: attention it receives from the valid non-global queries.

    `probs` [B, H, N, N] is post-softmax (query, key). With `head_mask` [H] each head's map is
    scaled by its mask first, so a fading head fades out of the ranking without flattening it.
    Scores of padding and global tokens are 0.
    """
    per_key = reduce_heads(probs, head_mask, reduce)                  # [B, N, N]
    queries = (valid & ~global_).to(per_key.dtype)                    # [B, N]
    s = torch.einsum("bnk,bn->bk", per_key, queries)
    return s * (valid & ~global_).to(s.dtype)


def distinctiveness(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1 − the mean cosine similarity of each token to the other `reference` tokens [B, N].

    `x` [B, N, D] are the hidden states at a site, `reference` [B, N] the tokens compared with
    (an image's patches). Patches of a flat background resemble one another and score low; an
    object's patches are unlike most of the image and score high, whichever heads attend to
    them. Scores of tokens outside `reference` are computed against it too.
    """
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    ref = reference.to(u.dtype)
    sim = (u @ u.transpose(1, 2)) * ref[:, None, :]                   # [B, N, N], keys in ref
    self_sim = (u * u).sum(-1) * ref                                  # a token's own term
    others = (ref.sum(dim=1, keepdim=True) - ref).clamp_min(1.0)
    return (1.0 - (sim.sum(-1) - self_sim) / others).clamp_min(0.0).to(x.dtype)


def reduce_heads(probs: torch.Tensor, head_mask: torch.Tensor | None, reduce: str) -> torch.Tensor:
    """Attention [B, H, ...] with heads combined: each scaled by its mask, then the max, or the
    mask-weighted mean Σ_h μ_h A_h / Σ_h μ_h (comp.md §3.1)."""
    shape = (1, -1) + (1,) * (probs.dim() - 2)
    a = probs if head_mask is None else probs * head_mask.view(shape).to(probs.dtype)
    if reduce == "max":
        return a.amax(dim=1)
    if reduce == "mean":
        w = head_mask if head_mask is not None else torch.ones(a.shape[1], device=a.device)
        return a.sum(dim=1) / w.sum().clamp_min(1e-12)
    raise ValueError(f"head reduction must be 'max' or 'mean', got {reduce!r}")


def normalise(s: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Eq. (1): scores that sum to 1 over each example's candidates (0 elsewhere)."""
    s = s * candidates.to(s.dtype)
    return s / s.sum(dim=1, keepdim=True).clamp_min(1e-12)


def cip_weights(s: torch.Tensor, valid: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
    """Eq. (2)'s ω: 1 for the global token, 0 for padding, s normalised over the other valid tokens."""
    ordinary = valid & ~global_
    w = s * ordinary.to(s.dtype)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return w + global_.to(s.dtype) * valid.to(s.dtype)


def keep_mask(scores: torch.Tensor, candidates: torch.Tensor, protected: torch.Tensor,
              theta: float, min_keep: torch.Tensor) -> torch.Tensor:
    """Which tokens survive a site: protected ones, and candidates with |Cand|·S ≥ θ.

    `scores` are Eq. (1)'s normalised scores; `min_keep` [B] is how many candidates each example
    keeps at least (the top ones by score).
    """
    n_cand = candidates.sum(dim=1, keepdim=True).to(scores.dtype)
    keep = candidates & (n_cand * scores >= theta)
    if theta > 0:
        ranked = torch.where(candidates, scores, torch.full_like(scores, -1.0))
        order = ranked.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        floor = torch.minimum(min_keep, candidates.sum(dim=1))
        keep |= candidates & (rank < floor.unsqueeze(1))
    return keep | protected


def min_keep_count(candidates0: torch.Tensor, frac: float) -> torch.Tensor:
    """⌈frac · N_cand,0⌉ per example, from the candidate counts [B] at the tower's input."""
    return torch.ceil(candidates0.double() * frac - 1e-9).long()


def compaction(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, N'], valid [B, N']) that gather each example's kept tokens, in order, to the front.

    N' is the largest kept count in the batch; shorter examples are padded (valid False, index 0).
    """
    n_new = int(keep.sum(dim=1).max()) if keep.numel() else 0
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :n_new]
    valid = torch.gather(keep, 1, order)
    return torch.where(valid, order, torch.zeros_like(order)), valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] -> [B, N', ...] at `index` [B, N']."""
    shape = index.shape + x.shape[2:]
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return torch.gather(x, 1, idx)

