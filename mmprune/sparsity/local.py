"""Stage-2 kernels on one weight matrix: magnitude, Wanda and SparseGPT (ecoflap.md §4.2-4.3).

Weights use the nn.Linear layout `(d_out, d_in)`. Masks are bool tensors, True = kept. Ties in
every ranking go to the lower index (stable sort), so masks are deterministic.

N:M patterns follow the spec and the Wanda/SparseGPT reference code: `N` is the number of entries
*zeroed* in every chunk of `M` consecutive inputs, so the sparsity must equal `N/M`.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from mmprune.sparsity.allocate import as_fraction

Pattern = tuple[int, int]
COMPARISONS = ("row", "matrix")


def parse_pattern(pattern: str | tuple[int, int] | None, sparsity: float) -> Pattern | None:
    """`None`/"unstructured" → None; "2:4" or (2, 4) → (2, 4), checked against the sparsity."""
    if pattern is None or pattern == "unstructured":
        return None
    try:
        n, m = (int(part) for part in pattern.split(":")) if isinstance(pattern, str) else pattern
    except (TypeError, ValueError):
        raise ValueError(f"pattern must be 'unstructured', 'N:M' or (N, M), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    if as_fraction(sparsity) != as_fraction(n) / m:
        raise ValueError(f"pattern {n}:{m} zeroes {n} of every {m} weights, which is sparsity "
                         f"{n / m:g}, but sparsity={sparsity!r} was asked for")
    return n, m


def pruned_count(sparsity: float, total: int) -> int:
    """round(s·total), halves rounded up, in exact decimal arithmetic (0.3·10 is 3)."""
    return math.floor(_check_sparsity(sparsity) * total + Fraction(1, 2))


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: str | tuple[int, int] | None = None,
                   comparison: str = "row") -> torch.Tensor:
    """Zero the smallest |W_ij|, per row (or per matrix), or the N smallest per chunk of M."""
    _check_matrix(weight)
    return _mask_from_scores(weight.detach().float().abs(), sparsity, pattern, comparison)


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float,
               pattern: str | tuple[int, int] | None = None, comparison: str = "row") -> torch.Tensor:
    """Zero the smallest S_ij = |W_ij|·‖X_j‖₂ in each row: round(s·d_in) per row, or per matrix
    with `comparison="matrix"`, or the N smallest of every M consecutive inputs. No weight update.
    """
    _check_matrix(weight)
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(f"input_norms must have shape ({weight.shape[1]},), got {tuple(input_norms.shape)}")
    scores = weight.detach().float().abs() * input_norms.detach().float().to(weight.device)[None, :]
    return _mask_from_scores(scores, sparsity, pattern, comparison)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    pattern: str | tuple[int, int] | None = None, block_size: int = 128,
                    damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune columns left to right, pushing each pruned weight's error onto the later
    columns through the upper Cholesky factor U of H⁻¹ (H = (2/n)·Σ x xᵀ of the layer's inputs).

    Unstructured: at the start of each block of `block_size` columns, prune the ⌊s·d_out·width⌋
    entries of the block with the smallest W²/U_jj² (one threshold for the whole block, so rows
    differ). N:M: at every M-th column, the N smallest of the next M columns of each row, scored on
    the current (already updated) weights. Updates inside a block are per column; later blocks
    get one lazy matrix product per block.

    Returns `(new_weight, mask)` in the weight's dtype, computed in fp32. `s = 0` returns the
    weight unchanged. Inputs never seen (H_jj = 0) are zeroed in `new_weight` whether or not the
    mask keeps them; the mask holds the entries SparseGPT chose, so its density is exact.
    """
    _check_matrix(weight)
    s = _check_sparsity(sparsity)
    nm = parse_pattern(pattern, sparsity)
    d_out, d_in = weight.shape
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"hessian must have shape ({d_in}, {d_in}), got {tuple(hessian.shape)}")
    if block_size <= 0 or (nm is not None and block_size % nm[1]):
        raise ValueError(f"block_size must be a positive multiple of M, got {block_size}")
    if nm is not None and d_in % nm[1]:
        raise ValueError(f"d_in={d_in} is not a multiple of M={nm[1]}")
    if s == 0:
        return weight.detach().clone(), torch.ones_like(weight, dtype=torch.bool)

    W = weight.detach().float().clone()
    H = hessian.detach().float().to(W.device).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(d_in, device=H.device)
    U = _upper_cholesky_of_inverse(H)

    pruned = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, d_in, block_size):
        end = min(start + block_size, d_in)
        W_blk, U_blk, pruned_blk = W[:, start:end], U[start:end, start:end], pruned[:, start:end]
        u_diag_sq = torch.diagonal(U_blk).square()
        if nm is None:
            count = math.floor(s * d_out * (end - start))
            scores = W_blk.square() / u_diag_sq[None, :]
            pruned_blk |= ~_keep_all_but_lowest(scores.reshape(1, -1), count).view_as(scores)
        errors = torch.zeros_like(W_blk)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                chunk = W_blk[:, j:j + m].square() / u_diag_sq[None, j:j + m]
                pruned_blk[:, j:j + m] = ~_keep_all_but_lowest(chunk, n)
            column = W_blk[:, j]
            error = torch.where(pruned_blk[:, j], column, 0.0) / U_blk[j, j]
            W_blk[:, j + 1:] -= error[:, None] * U_blk[j, j + 1:][None, :]
            column.masked_fill_(pruned_blk[:, j], 0.0)
            errors[:, j] = error
        W[:, end:] -= errors @ U[start:end, end:]  # views: W_blk and pruned_blk wrote in place
    return W.to(weight.dtype), ~pruned


class InputStats:
    """Running statistics of one layer's inputs over valid (non-padding) tokens, in fp32.

    `norms` is ‖X_j‖₂ per input channel (Wanda); `hessian` is H = (2/n)·Σ x xᵀ (SparseGPT), kept
    only with `hessian=True` because it costs d_in² memory.
    """

    def __init__(self, hessian: bool = False):
        self.track_hessian = hessian
        self.count = 0
        self._square_sum: torch.Tensor | None = None
        self._outer_sum: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor, valid_mask: torch.Tensor | None = None) -> None:
        """Add tokens `x` of shape (..., d_in); `valid_mask` (shape x.shape[:-1]) is True for real tokens."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if valid_mask is not None:
            if valid_mask.shape != x.shape[:-1]:
                raise ValueError(f"valid_mask shape {tuple(valid_mask.shape)} does not match the "
                                 f"token shape {tuple(x.shape[:-1])}")
            rows = rows[valid_mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        if self._square_sum is None:
            self._square_sum = rows.new_zeros(rows.shape[1])
            if self.track_hessian:
                self._outer_sum = rows.new_zeros(rows.shape[1], rows.shape[1])
        elif rows.shape[1] != self._square_sum.shape[0]:
            raise ValueError(f"expected {self._square_sum.shape[0]} input channels, got {rows.shape[1]}")
        self._square_sum += rows.square().sum(dim=0)
        if self._outer_sum is not None:
            self._outer_sum += rows.T @ rows
        self.count += rows.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all valid tokens added so far."""
        self._require_data()
        return self._square_sum.sqrt()

    @property
    def hessian(self) -> torch.Tensor:
        """(2/n)·Σ x xᵀ over the n valid tokens added so far."""
        self._require_data()
        if self._outer_sum is None:
            raise RuntimeError("InputStats was created without hessian=True")
        return self._outer_sum * (2.0 / max(self.count, 1))

    def _require_data(self) -> None:
        if self._square_sum is None:
            raise RuntimeError("InputStats has no inputs yet; call add() first")


def _mask_from_scores(scores: torch.Tensor, sparsity: float, pattern, comparison: str) -> torch.Tensor:
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")
    _check_sparsity(sparsity)
    nm = parse_pattern(pattern, sparsity)
    d_out, d_in = scores.shape
    if nm is not None:
        n, m = nm
        if comparison != "row":
            raise ValueError("N:M patterns are per row; use comparison='row'")
        if d_in % m:
            raise ValueError(f"d_in={d_in} is not a multiple of M={m}")
        return _keep_all_but_lowest(scores.view(d_out, d_in // m, m), n).view(d_out, d_in)
    if comparison == "matrix":
        flat = scores.reshape(1, -1)
        return _keep_all_but_lowest(flat, pruned_count(sparsity, flat.shape[1])).view(d_out, d_in)
    return _keep_all_but_lowest(scores, pruned_count(sparsity, d_in))


def _keep_all_but_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """False at the `count` lowest scores along the last dim (stable: ties lose at the lower index)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count:
        lowest = torch.sort(scores, dim=-1, stable=True).indices[..., :count]
        keep.scatter_(-1, lowest, False)
    return keep


def _upper_cholesky_of_inverse(hessian: torch.Tensor) -> torch.Tensor:
    lower, info = torch.linalg.cholesky_ex(hessian)
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0:
        raise ValueError("the damped Hessian is not positive definite; increase damp")
    return upper


def _check_matrix(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d_out, d_in), got shape {tuple(weight.shape)}")


def _check_sparsity(sparsity: float) -> Fraction:
    ratio = as_fraction(sparsity)
    if not 0 <= ratio <= 1:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    return ratio
