"""Capped water-filling allocator (ecoflap.md §2.4; invariant tests §10.2-3)."""
import math
import random
from fractions import Fraction

import pytest

from mmprune.sparsity import Allocation, allocate, allocate_sparsity

# Block sizes of a BLIP-2-like model: ViT-g blocks, T5 encoder and decoder blocks (unequal sizes).
VIT, T5_ENC, T5_DEC = 5_241_856, 12_582_912, 16_777_216


def _floor_keep(size: int, cap: float) -> int:
    return math.ceil((1 - Fraction(repr(cap))) * size)


def test_hand_computed_split_is_proportional_to_score_above_the_floor():
    # floors ⌈0.1·100⌉ = 10 each, budget 150: the 120 above the floors split 1:2:3.
    got = allocate([100, 100, 100], [1.0, 2.0, 3.0], target=0.5, max_sparsity=0.9)
    assert got == Allocation(kept=[30, 50, 70], sparsity=[0.7, 0.5, 0.3], budget=150)


def test_a_saturated_group_goes_dense_and_the_rest_flows_on():
    # Group 0 fills at t = 0.09; group 1 then takes the remaining 140 - 100 - 10 = 30 above its floor.
    assert allocate([100, 100], [1000.0, 1.0], target=0.3, max_sparsity=0.9).kept == [100, 40]


@pytest.mark.parametrize("seed", range(20))
def test_exact_budget_and_cap_on_unequal_groups(seed):
    rng = random.Random(seed)
    sizes = [VIT] * rng.randint(1, 39) + [T5_ENC] * rng.randint(0, 24) + [rng.randint(1, 10_000)
                                                                         for _ in range(rng.randint(0, 5))]
    scores = [rng.lognormvariate(0, 1.5) for _ in sizes]
    target = rng.choice([0.3, 0.4, 0.5, 0.6, 0.7])
    cap = target + rng.choice([0.05, 0.1, 0.2])
    got = allocate(sizes, scores, target, cap)
    budget = math.floor((1 - Fraction(str(target))) * sum(sizes))
    assert got.budget == budget and sum(got.kept) == budget
    for kept, size in zip(got.kept, sizes):
        assert _floor_keep(size, cap) <= kept <= size  # no group sparser than the cap
    assert all(s <= cap + 1e-12 for s in got.sparsity)


def test_budget_is_exact_for_awkward_sizes_and_targets():
    sizes = [7_000_003, 3, 1001, 12_345, 1]
    for target in (0.37, 1 / 3, 0.5, 0.61, 0.999):
        got = allocate(sizes, [0.3, 5.0, 0.0, 1.0, 2.0], target, min(1.0, target + 0.1))
        assert sum(got.kept) == math.floor((1 - Fraction(repr(target))) * sum(sizes))


def test_equal_scores_and_sizes_give_uniform_sparsity():
    assert allocate_sparsity([4096] * 6, [2.5] * 6, target=0.5) == [0.5] * 6
    assert allocate_sparsity([T5_DEC] * 3, [0.1] * 3, target=0.75) == [0.75] * 3


def test_cap_equal_to_target_gives_uniform_sparsity():
    assert allocate_sparsity([VIT, T5_ENC, T5_DEC], [1.0, 50.0, 0.01], 0.5, max_sparsity=0.5) == [0.5] * 3
    # 0.4·1000 is exactly 400 (a binary-float ceiling would say 401 and declare the cap infeasible).
    assert allocate_sparsity([1000, 1000], [1.0, 2.0], 0.6, max_sparsity=0.6) == [0.6, 0.6]


def test_cap_equal_to_target_on_indivisible_sizes_is_uniform_up_to_rounding():
    sizes = [3, 7, 11, 13]
    got = allocate(sizes, [9.0, 1.0, 4.0, 0.5], target=0.5, max_sparsity=0.5)
    assert sum(got.kept) == math.floor(0.5 * sum(sizes))
    assert all(abs(kept - size / 2) < 1 for kept, size in zip(got.kept, sizes))


def test_all_zero_scores_fall_back_to_uniform():
    got = allocate([1000, 2000, 4000], [0.0, 0.0, 0.0], target=0.5)
    assert got.sparsity == [0.5, 0.5, 0.5]
    got = allocate([7, 11, 13], [0.0, 0.0, 0.0], target=0.5)
    assert sum(got.kept) == 15 and all(abs(k - n / 2) < 1 for k, n in zip(got.kept, [7, 11, 13]))


def test_unscored_groups_share_by_size_once_scored_groups_are_dense():
    # Group 0 can hold only 100 of the 240 kept; groups 1 and 2 (score 0) share the other 140.
    assert allocate([100, 100, 100], [1.0, 0.0, 0.0], target=0.2, max_sparsity=0.9).kept == [100, 70, 70]


def test_default_cap_is_target_plus_a_tenth():
    # The unscored group is held at the cap 0.6; the scored one takes the rest of the budget.
    assert allocate_sparsity([100, 100], [0.0, 1.0], target=0.5) == pytest.approx([0.6, 0.4])


def test_leftover_units_go_to_largest_fractional_part_then_lower_index():
    assert allocate([3, 3], [1.0, 1.0], target=0.5, max_sparsity=1.0).kept == [2, 1]
    # Continuous levels 1.2, 1.4, 0.4 → floors 1, 1, 0; the 1 leftover goes to the 0.4s, lowest first.
    assert allocate([5, 5, 5], [3.0, 3.5, 1.0], target=0.8, max_sparsity=1.0).kept == [1, 2, 0]


@pytest.mark.parametrize("seed", range(10))
def test_raising_a_score_never_lowers_that_groups_keep_count(seed):
    rng = random.Random(100 + seed)
    sizes = [rng.randint(1, 500) for _ in range(rng.randint(2, 8))]
    scores = [rng.choice([0.0, rng.random(), 1.0]) for _ in sizes]
    target = rng.choice([0.2, 0.5, 0.7])
    cap = min(1.0, target + rng.choice([0.0, 0.1, 0.3]))
    for g in range(len(sizes)):
        previous = allocate(sizes, scores, target, cap).kept[g]
        for raised in (scores[g] + 1e-3, scores[g] * 1.5 + 0.1, scores[g] * 4 + 1, 1e6):
            bumped = list(scores)
            bumped[g] = raised
            kept = allocate(sizes, bumped, target, cap).kept[g]
            assert kept >= previous, (sizes, scores, g, raised)
            previous = kept


def test_infeasible_cap_raises_naming_target_and_cap():
    with pytest.raises(ValueError, match=r"max_sparsity=0\.4.*target=0\.5"):
        allocate([100, 200], [1.0, 1.0], target=0.5, max_sparsity=0.4)


@pytest.mark.parametrize("sizes, scores, target, cap", [
    ([100, 0], [1.0, 1.0], 0.5, None),          # empty group
    ([100, 100], [1.0, -1.0], 0.5, None),       # negative score
    ([100, 100], [1.0, float("nan")], 0.5, None),
    ([100, 100], [1.0], 0.5, None),             # length mismatch
    ([100], [1.0], 1.5, None),
    ([100], [1.0], 0.5, 1.2),
    ([], [], 0.5, None),
])
def test_bad_inputs_raise(sizes, scores, target, cap):
    with pytest.raises(ValueError):
        allocate(sizes, scores, target, cap)


def test_target_zero_keeps_everything():
    assert allocate([10, 20], [3.0, 0.0], target=0.0).kept == [10, 20]
