"""Global block scores for ECoFLaP's allocation (ecoflap.md §2.2): how much the loss cares about
each block, estimated with zeroth-order (two forwards per probe) or first-order (gradients) signals.

A group is a list of named weight matrices (a transformer block's Linear weights). Scores feed
`allocate`, which turns them into per-group sparsities under one budget.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmprune.eval_mode import eval_mode
from mmprune.sparsity.suffix import BlockOutputs

Groups = Mapping[str, Sequence[str]]      # group name -> parameter names


def _direction(param: torch.Tensor, seed: int, name: str, batch: int, k: int) -> torch.Tensor:
    """z ~ N(0, I) in fp32 on the parameter's device, seeded by (run seed, parameter, batch,
    direction), so every probe is reproducible and independent of the order probes run in."""
    g = torch.Generator().manual_seed(hash((seed, zlib.crc32(name.encode()), batch, k)) % (2 ** 63))
    return torch.randn(param.shape, generator=g, dtype=torch.float32).to(param.device)


@torch.no_grad()
def zeroth_order_scores(model: nn.Module, groups: Groups, loss: Callable[[dict], torch.Tensor],
                        batches: Sequence[dict], eps: float = 1e-3, directions: int = 1,
                        seed: int = 0, progress: Callable[[Iterable, str, int], Iterable] =
                        lambda it, d, n: it, probes: dict[str, list[float]] | None = None
                        ) -> dict[str, float]:
    """ECoFLaP's reference estimate: score_P = Σ_b Σ_k |L_b(P + εz) − L_b(P − εz)| / 2ε per matrix,
    summed over the group's matrices. Every probe sees the same batches (common random numbers).
    A perturbed matrix is restored by copying back a saved copy, never by subtracting εz (which
    rounds, and drifts over hundreds of probes). `probes`, if given, receives each group's
    per-(batch, direction) terms (summed over its matrices), for the report's standard errors."""
    params = dict(model.named_parameters())
    scores: dict[str, float] = {}
    with eval_mode(model):
        for group, names in progress(list(groups.items()), "zeroth-order scores", len(groups)):
            total = 0.0
            terms = [0.0] * (len(batches) * directions)
            for name in names:
                p = params[name]
                saved = p.detach().clone()
                exact = saved.float()          # P ± εz from fp32, then cast (spec §3.1)
                try:
                    for b, batch in enumerate(batches):
                        for k in range(directions):
                            z = _direction(p, seed, name, b, k)
                            p.copy_((exact + eps * z).to(p.dtype))
                            up = float(loss(batch))
                            p.copy_((exact - eps * z).to(p.dtype))
                            down = float(loss(batch))
                            total += abs(up - down) / (2 * eps)
                            terms[b * directions + k] += abs(up - down) / (2 * eps)
                finally:
                    p.copy_(saved)             # bit-exact, whatever happened
            scores[group] = total
            if probes is not None:
                probes[group] = terms
    return scores


def first_order_scores(model: nn.Module, groups: Groups, loss: Callable[[dict], torch.Tensor],
                       batches: Sequence[dict]) -> dict[str, float]:
    """ecoflap_fo: score_g = Σ_{w ∈ g} |w| · mean_b |∂L_b/∂w| (absolute value per batch)."""
    params = dict(model.named_parameters())
    wanted = {n for names in groups.values() for n in names}
    acc = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in wanted}
    try:
        with eval_mode(model):
            for batch in batches:
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss(batch).backward()
                for n in wanted:
                    if params[n].grad is not None:
                        acc[n] += params[n].grad.detach().float().abs()
    finally:
        model.zero_grad(set_to_none=True)
    m = max(len(batches), 1)
    return {g: float(sum((params[n].detach().float().abs() * acc[n] / m).sum() for n in names))
            for g, names in groups.items()}


@torch.no_grad()
def outlier_ratios(model: nn.Module, layers: Mapping[str, Mapping[str, nn.Linear]],
                   forward: Callable[[dict], object], batches: Sequence[dict],
                   valid_of: Callable[[str, dict], torch.Tensor | None] = lambda g, b: None,
                   m: float = 5.0) -> dict[str, float]:
    """OWL's outlier ratio D per group: the share of its matrices' entries whose Wanda score
    |W_ij|·‖X_j‖ exceeds `m` times the mean score of that matrix, on the dense model."""
    from mmprune.sparsity.local import InputStats
    from mmprune.sparsity.sequential import collecting_inputs

    flat = {(g, n): layer for g, ls in layers.items() for n, layer in ls.items()}
    stats = {key: InputStats() for key in flat}
    current: list[dict | None] = [None]
    with eval_mode(model), collecting_inputs(flat, stats, lambda key: valid_of(key[0], current[0])):
        for batch in batches:
            current[0] = batch
            forward(batch)
    ratios = {}
    for g, ls in layers.items():
        outliers = total = 0
        for n, layer in ls.items():
            a = layer.weight.detach().float().abs() * stats[(g, n)].norms[None, :]
            outliers += int((a > m * a.mean()).sum())
            total += a.numel()
        ratios[g] = outliers / total
    return ratios


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], target: float,
                   lam: float = 0.08) -> list[float]:
    """OWL's mapping with a parameter-weighted mean (ecoflap.md §2.3), so that Σ n_l·keep_l is
    exactly (1 − s)·Σ n_l even when blocks differ in size: more outliers, lower sparsity."""
    lo, hi = min(ratios), max(ratios)
    spread = [0.0 if hi == lo else 2 * lam * (d - lo) / (hi - lo) for d in ratios]
    mean = sum(n * d for n, d in zip(sizes, spread)) / sum(sizes)
    keep = [(1 - target) + d - mean for d in spread]
    if any(not 0 <= k <= 1 for k in keep):
        raise ValueError(f"OWL: a block's keep ratio left [0, 1] ({min(keep):.3f}..{max(keep):.3f}); "
                         f"lower owl_lambda ({lam}) or the target ({target})")
    return [1 - k for k in keep]


class _Loss(nn.Module):
    """`loss(batch)` as a module call, so `functional_call` can substitute any parameter of
    `model` however the adapter reaches it (methods, submodules, several towers)."""

    def __init__(self, model: nn.Module, loss: Callable[[dict], torch.Tensor]):
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch: dict) -> torch.Tensor:
        return self._loss(batch).float()


def directional_derivative(model: nn.Module, loss: Callable[[dict], torch.Tensor], batch: dict,
                           names: Sequence[str], tangents: Sequence[torch.Tensor]) -> float:
    """∇_θ L(batch) · z for the parameters `names` and directions `tangents`, exactly, with one
    forward-mode pass (`torch.func.jvp`); the parameters are substituted, never written."""
    from torch.func import functional_call, jvp

    wrapper = _Loss(model, loss)
    params = dict(model.named_parameters())
    primals = tuple(params[n].detach() for n in names)

    def f(*values):
        return functional_call(wrapper, {f"model.{n}": v for n, v in zip(names, values)}, (batch,))

    # fused SDPA kernels have no forward-mode derivative; the math path is plain matmuls
    # no_grad: forward-mode AD still runs, but no backward graph is recorded for the other
    # parameters (memory stays that of a forward, as the zeroth-order allocator promises)
    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        _, d = jvp(f, primals, tuple(t.to(p.dtype) for t, p in zip(tangents, primals)))
    return float(d.detach())


def block_jvp_scores(model: nn.Module, groups: Groups, loss: Callable[[dict], torch.Tensor],
                     batches: Sequence[dict], directions: int = 1, seed: int = 0,
                     progress: Callable[[Iterable, str, int], Iterable] = lambda it, d, n: it,
                     suffix: tuple[BlockOutputs, Mapping[str, Sequence[str]]] | None = None,
                     probes: dict[str, list[float]] | None = None,
                     target_rel_se: float | None = None, max_directions: int = 8,
                     ) -> tuple[dict[str, float], str]:
    """Our fast allocator's scores (ecoflap.md §3.2, §3.4): one Gaussian direction over all of a
    block's matrices at once and the exact directional derivative by forward-mode AD, so
    score_g = Σ_b Σ_k |∇_{θ_g} L_b · z| with one dual forward per probe instead of two forwards
    per matrix. Where the model has an op without forward-mode AD, the same block-level probe
    falls back to the two-point finite difference (functional, nothing written). Returns the
    scores and the estimator used ('jvp' or 'finite_difference').

    With `suffix` (recorded block outputs, and per group the blocks it cannot influence; see
    `mmprune.sparsity.suffix`, recorded with `record_block_outputs`), those blocks replay their
    outputs instead of running: the same scores for less work (§3.3). With `target_rel_se`
    (§3.5), a group gets more directions, one round over every batch at a time, until its
    standard error is at most that share of its score or it has `max_directions`. `probes`, if
    given, receives each group's per-(batch, direction) terms."""
    params = dict(model.named_parameters())
    scores: dict[str, float] = {}
    method = "jvp"

    def probe(group: str, names: Sequence[str], b: int, k: int) -> float:
        nonlocal method
        z = [_direction(params[n], seed, f"{group}/{n}", b, k) for n in names]
        if suffix:        # every loss evaluation replays from the start of the batch's record
            def probe_loss(batch):
                with suffix[0].replaying(b, suffix[1][group]):
                    return loss(batch)
        else:
            probe_loss = loss
        if method == "jvp":
            try:
                return abs(directional_derivative(model, probe_loss, batches[b], names, z))
            except (RuntimeError, NotImplementedError) as e:
                if "forward AD" not in str(e) and "forward-mode" not in str(e):
                    raise          # a real failure, not a missing forward rule
                method = "finite_difference"
        with sdpa_kernel([SDPBackend.MATH]):     # as the recorded outputs were computed
            return abs(_finite_difference(model, probe_loss, batches[b], names, z))

    with eval_mode(model):
        for group, names in progress(list(groups.items()), "block scores", len(groups)):
            terms: list[float] = []
            k = 0
            while k < directions or (target_rel_se is not None and k < max_directions
                                     and relative_standard_error(terms) > target_rel_se):
                terms += [probe(group, names, b, k) for b in range(len(batches))]
                k += 1
            # on the scale of `directions` rounds, whatever number this group needed
            scores[group] = sum(terms) * directions / k
            if probes is not None:
                probes[group] = terms
    return scores, method


def relative_standard_error(terms: Sequence[float]) -> float:
    """Standard error of the mean of `terms` over their mean (inf when undefined)."""
    n = len(terms)
    mean = sum(terms) / n if n else 0.0
    if n < 2 or mean == 0:
        return float("inf")
    sd = (sum((t - mean) ** 2 for t in terms) / (n - 1)) ** 0.5
    return sd / n ** 0.5 / mean


def record_block_outputs(model: nn.Module, paths: Sequence[str], loss: Callable[[dict], torch.Tensor],
                         batches: Sequence[dict]) -> BlockOutputs:
    """Every block's outputs on the unperturbed loss of each batch, computed as the probes compute
    theirs (eval mode, the math attention path), so that replaying them changes nothing."""
    outputs = BlockOutputs(model, paths)
    with eval_mode(model), sdpa_kernel([SDPBackend.MATH]):
        for b, batch in enumerate(batches):
            outputs.record(b, lambda: loss(batch))
    return outputs


@torch.no_grad()
def _finite_difference(model, loss, batch, names, z, eps: float = 1e-3) -> float:
    from torch.func import functional_call

    wrapper = _Loss(model, loss)
    params = dict(model.named_parameters())

    def at(sign: float) -> float:
        values = {f"model.{n}": (params[n].detach().float() + sign * eps * d.float()).to(params[n].dtype)
                  for n, d in zip(names, z)}
        return float(functional_call(wrapper, values, (batch,)))

    return (at(1.0) - at(-1.0)) / (2 * eps)
