"""Magnitude, Wanda and SparseGPT kernels (ecoflap.md §4.2-4.3; invariant tests §10.4-5)."""
import numpy as np
import pytest
import torch

from mmprune.sparsity import (
    InputStats,
    magnitude_mask,
    pruned_count,
    sparsegpt_prune,
    wanda_mask,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(samples: int, d_in: int, seed: int) -> torch.Tensor:
    """Tokens driven by a few shared factors plus noise, with channel scales over two decades."""
    g = _gen(seed)
    factors = torch.randn(samples, 6, generator=g) @ torch.randn(6, d_in, generator=g)
    scales = torch.logspace(-1, 1, d_in)[torch.randperm(d_in, generator=g)]
    return (factors + 0.3 * torch.randn(samples, d_in, generator=g)) * scales


def _reconstruction_error(x: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor) -> float:
    return torch.linalg.norm(x @ weight.T - x @ pruned.T).item()


# ---- Wanda and magnitude


@pytest.mark.parametrize("sparsity, d_in, zeros", [(0.5, 64, 32), (0.3, 50, 15), (0.5, 33, 17), (0.7, 17, 12),
                                                   (0.0, 8, 0), (1.0, 8, 8)])
def test_wanda_prunes_round_s_d_in_lowest_scores_per_row(sparsity, d_in, zeros):
    g = _gen(d_in)
    weight, norms = torch.randn(24, d_in, generator=g), torch.rand(d_in, generator=g) * 3
    mask = wanda_mask(weight, norms, sparsity)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert ((~mask).sum(dim=1) == zeros).all()
    scores = weight.abs() * norms
    if 0 < zeros < d_in:
        pruned_max = scores.masked_fill(mask, -1).amax(dim=1)
        kept_min = scores.masked_fill(~mask, float("inf")).amin(dim=1)
        assert (pruned_max <= kept_min).all()


def test_pruned_count_rounds_halves_up_in_decimal():
    counts = [pruned_count(0.5, 33), pruned_count(0.3, 10), pruned_count(0.35, 10), pruned_count(0.7, 17)]
    assert counts == [17, 3, 4, 12]


def test_wanda_with_unit_norms_is_row_magnitude_pruning():
    weight = torch.randn(16, 40, generator=_gen(1))
    ones = torch.ones(40)
    assert torch.equal(wanda_mask(weight, ones, 0.6), magnitude_mask(weight, 0.6))
    assert torch.equal(wanda_mask(weight, ones, 0.5, "2:4"), magnitude_mask(weight, 0.5, "2:4"))
    order = np.argsort(np.abs(weight.numpy()), axis=1, kind="stable")[:, :24]
    expected = np.ones((16, 40), dtype=bool)
    np.put_along_axis(expected, order, False, axis=1)
    assert np.array_equal(magnitude_mask(weight, 0.6).numpy(), expected)


def test_input_norms_change_the_mask():
    weight = torch.randn(16, 40, generator=_gen(2))
    norms = torch.logspace(-2, 2, 40)
    assert not torch.equal(wanda_mask(weight, norms, 0.5), magnitude_mask(weight, 0.5))


def test_ties_are_pruned_at_the_lower_column_first():
    weight = torch.tensor([[1.0, -1.0, 1.0, 1.0, 2.0, 1.0]])
    assert wanda_mask(weight, torch.ones(6), 0.5).tolist() == [[False, False, False, True, True, True]]
    assert magnitude_mask(torch.ones(1, 4), 0.5, "2:4").tolist() == [[False, False, True, True]]


def test_matrix_comparison_prunes_the_global_lowest():
    g = _gen(3)
    weight, norms = torch.randn(10, 30, generator=g), torch.rand(30, generator=g)
    mask = wanda_mask(weight, norms, 0.4, comparison="matrix")
    assert (~mask).sum() == 120
    scores = weight.abs() * norms
    assert scores[~mask].max() <= scores[mask].min()
    assert ((~mask).sum(dim=1) != 12).any()  # rows differ, unlike the row comparison


@pytest.mark.parametrize("pattern, sparsity", [("2:4", 0.5), ((2, 4), 0.5), ("1:4", 0.25), ("4:8", 0.5)])
def test_n_m_zeroes_exactly_n_lowest_per_chunk(pattern, sparsity):
    n, m = (int(p) for p in pattern.split(":")) if isinstance(pattern, str) else pattern
    g = _gen(4)
    weight, norms = torch.randn(12, 64, generator=g), torch.rand(64, generator=g)
    mask = wanda_mask(weight, norms, sparsity, pattern).view(12, 64 // m, m)
    assert ((~mask).sum(dim=-1) == n).all()
    scores = (weight.abs() * norms).view(12, 64 // m, m)
    assert (scores.masked_fill(mask, -1).amax(-1) <= scores.masked_fill(~mask, float("inf")).amin(-1)).all()


@pytest.mark.parametrize("pattern, sparsity, d_in", [("2:4", 0.6, 8), ((2, 4), 0.25, 8), ("2:4", 0.5, 10),
                                                     ("4:4", 1.0, 8), ("two:four", 0.5, 8)])
def test_bad_n_m_raises(pattern, sparsity, d_in):
    with pytest.raises(ValueError):
        wanda_mask(torch.randn(4, d_in), torch.ones(d_in), sparsity, pattern)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        wanda_mask(torch.randn(4, 8), torch.ones(7), 0.5)
    with pytest.raises(ValueError):
        magnitude_mask(torch.randn(4, 8), 1.5)
    with pytest.raises(ValueError):
        magnitude_mask(torch.randn(4, 8), 0.5, comparison="column")


# ---- calibration statistics


def _padded_batch(seed: int):
    """Three sequences of lengths 9, 5, 2 padded to 9; padding holds large values on a few channels."""
    g = _gen(seed)
    lengths = [9, 5, 2]
    x = torch.randn(3, 9, 32, generator=g)
    valid = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    x[~valid] = 0.0
    x[~valid, :8] = 50.0
    real = [x[i, :n] for i, n in enumerate(lengths)]
    return x, valid, real


def test_padding_tokens_do_not_change_statistics_or_masks():
    x, valid, real = _padded_batch(5)
    weight = torch.randn(16, 32, generator=_gen(6))
    padded = InputStats(hessian=True)
    padded.add(x, valid)
    unpadded = InputStats(hessian=True)
    unpadded.add(torch.cat(real))
    assert padded.count == unpadded.count == 16
    assert torch.equal(padded.norms, unpadded.norms) and torch.equal(padded.hessian, unpadded.hessian)
    assert torch.equal(wanda_mask(weight, padded.norms, 0.5), wanda_mask(weight, unpadded.norms, 0.5))
    assert torch.equal(sparsegpt_prune(weight, padded.hessian, 0.5)[1],
                       sparsegpt_prune(weight, unpadded.hessian, 0.5)[1])
    polluted = InputStats()
    polluted.add(x)  # what forgetting the mask would do
    assert not torch.equal(wanda_mask(weight, polluted.norms, 0.5), wanda_mask(weight, padded.norms, 0.5))


def test_statistics_match_their_definitions():
    x = torch.randn(2, 7, 12, generator=_gen(7))
    stats = InputStats(hessian=True)
    stats.add(x[0])
    stats.add(x[1])
    rows = x.reshape(-1, 12).double().numpy()
    assert np.allclose(stats.norms.numpy(), np.sqrt((rows ** 2).sum(0)), rtol=1e-6)
    assert np.allclose(stats.hessian.numpy(), 2 / 14 * rows.T @ rows, rtol=1e-5, atol=1e-6)
    assert stats.hessian.dtype == torch.float32


def test_statistics_refuse_what_they_cannot_answer():
    with pytest.raises(RuntimeError):
        _ = InputStats().norms
    stats = InputStats()
    stats.add(torch.randn(3, 4))
    with pytest.raises(RuntimeError):
        _ = stats.hessian
    with pytest.raises(ValueError):
        stats.add(torch.randn(3, 5))
    with pytest.raises(ValueError):
        stats.add(torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))


# ---- SparseGPT


def _layer(seed: int, d_out: int = 32, d_in: int = 64, samples: int = 512):
    x = _correlated_inputs(samples, d_in, seed)
    weight = torch.randn(d_out, d_in, generator=_gen(seed + 1000)) / d_in ** 0.5
    stats = InputStats(hessian=True)
    stats.add(x)
    return x, weight, stats


def test_sparsegpt_at_zero_sparsity_returns_the_weight_unchanged():
    _, weight, stats = _layer(0)
    hessian = stats.hessian.clone()
    hessian[3, :] = hessian[:, 3] = 0.0  # a dead input is not zeroed either at s = 0
    new, mask = sparsegpt_prune(weight.to(torch.bfloat16), hessian, 0.0)
    assert new.dtype == torch.bfloat16 and torch.equal(new, weight.to(torch.bfloat16))
    assert mask.all()


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.77])
def test_sparsegpt_mask_density_is_exact_per_column_block(sparsity):
    _, weight, _ = _layer(1, d_out=24, d_in=100)
    hessian = InputStats(hessian=True)
    hessian.add(_correlated_inputs(256, 100, 11))
    new, mask = sparsegpt_prune(weight, hessian.hessian, sparsity, block_size=32)
    for start in range(0, 100, 32):
        width = min(32, 100 - start)
        assert (~mask[:, start:start + width]).sum() == int(sparsity * 24 * width)  # ⌊s·d_out·B⌋
    assert (new[~mask] == 0).all() and (new[mask] != 0).all()
    assert ((~mask).sum(dim=1) != (~mask).sum(dim=1)[0]).any()  # one threshold per block: rows differ


@pytest.mark.parametrize("block_size", [128, 16])
def test_sparsegpt_reconstructs_better_than_wanda(block_size):
    x, weight, stats = _layer(2)
    wanda = weight * wanda_mask(weight, stats.norms, 0.5)
    sparsegpt, mask = sparsegpt_prune(weight, stats.hessian, 0.5, block_size=block_size)
    assert (~mask).sum() == 0.5 * weight.numel()
    wanda_error = _reconstruction_error(x, weight, wanda)
    assert _reconstruction_error(x, weight, sparsegpt) <= 0.8 * wanda_error
    # Masking alone is not what wins: SparseGPT's mask without its weight update is no better.
    assert _reconstruction_error(x, weight, weight * mask) > _reconstruction_error(x, weight, sparsegpt)


def test_sparsegpt_n_m_chunks_are_exact_and_beat_wanda():
    x, weight, stats = _layer(3)
    new, mask = sparsegpt_prune(weight, stats.hessian, 0.5, "2:4")
    assert ((~mask).view(32, 16, 4).sum(-1) == 2).all()
    assert (new[~mask] == 0).all()
    wanda = weight * wanda_mask(weight, stats.norms, 0.5, "2:4")
    assert _reconstruction_error(x, weight, new) < _reconstruction_error(x, weight, wanda)
    with pytest.raises(ValueError):
        sparsegpt_prune(weight, stats.hessian, 0.6, "2:4")


def test_lazy_block_updates_equal_per_column_updates():
    # With N:M the mask does not depend on the block size, so only the update schedule differs.
    _, weight, stats = _layer(4)
    one_block, mask_one = sparsegpt_prune(weight, stats.hessian, 0.5, "2:4", block_size=64)
    many_blocks, mask_many = sparsegpt_prune(weight, stats.hessian, 0.5, "2:4", block_size=4)
    assert torch.equal(mask_one, mask_many)
    assert torch.allclose(one_block, many_blocks, atol=1e-5, rtol=1e-4)


def test_pruning_leading_columns_gives_the_least_squares_optimum():
    # When every pruned weight precedes every kept one, the sequential OBS updates compose to
    # the exact optimum ŵ_K = w_K + H_KK⁻¹ H_KP w_P (with the same damped H).
    x = _correlated_inputs(256, 16, 8)
    weight = torch.randn(4, 16, generator=_gen(9), dtype=torch.float64)
    weight[:, :8] *= 1e-4
    stats = InputStats(hessian=True)
    stats.add(x)
    new, mask = sparsegpt_prune(weight.float(), stats.hessian, 0.5, damp=0.01)
    assert (~mask[:, :8]).all() and mask[:, 8:].all()
    h = stats.hessian.double()
    h += 0.01 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    optimum = weight[:, 8:] + (torch.linalg.solve(h[8:, 8:], h[8:, :8]) @ weight[:, :8].T).T
    assert torch.allclose(new[:, 8:].double(), optimum, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(new[:, 8:].double(), weight[:, 8:], rtol=1e-4, atol=1e-6)


def test_dead_inputs_are_zeroed_without_nans():
    _, weight, stats = _layer(5)
    hessian = stats.hessian.clone()
    hessian[[3, 40], :] = 0.0
    hessian[:, [3, 40]] = 0.0
    new, mask = sparsegpt_prune(weight, hessian, 0.5)
    assert torch.isfinite(new).all()
    assert (new[:, [3, 40]] == 0).all()
    assert (~mask).sum() == 0.5 * weight.numel()


def test_sparsegpt_computes_in_fp32_and_returns_the_weight_dtype():
    _, weight, stats = _layer(6)
    new, _ = sparsegpt_prune(weight.to(torch.bfloat16), stats.hessian.double(), 0.5)
    reference, _ = sparsegpt_prune(weight.to(torch.bfloat16).float(), stats.hessian, 0.5)
    assert new.dtype == torch.bfloat16
    assert torch.equal(new, reference.to(torch.bfloat16))
