"""Per-group sparsities from global group scores: capped water-filling (ecoflap.md §2.4).

All budget arithmetic is exact (`fractions.Fraction`): the kept counts are floors and ceilings of
products of ratios and sizes, and binary float error would move them by one parameter, e.g.
``(1 - 0.6) * 1000 == 400.00000000000006`` whose ceiling is 401.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

DEFAULT_CAP_MARGIN = Fraction(1, 10)  # s_max = s + 0.1, as in every released ECoFLaP script


@dataclass(frozen=True)
class Allocation:
    """Kept parameters and sparsity per group; `sum(kept) == budget` exactly."""

    kept: list[int]
    sparsity: list[float]
    budget: int


def as_fraction(ratio: float) -> Fraction:
    """A ratio as the decimal it prints as, so that 0.6 means 3/5 and not the nearest binary float."""
    if isinstance(ratio, (int, Fraction)):
        return Fraction(ratio)
    value = float(ratio)
    if not math.isfinite(value):
        raise ValueError(f"ratio must be finite, got {ratio!r}")
    return Fraction(repr(value))


def allocate(sizes: Sequence[int], scores: Sequence[float], target: float,
             max_sparsity: float | None = None) -> Allocation:
    """Split the keep budget ⌊(1 − target)·Σ sizes⌋ over groups in proportion to their scores.

    Every group first keeps its floor ⌈(1 − max_sparsity)·n_g⌉; the rest of the budget rises like
    water, group g at rate `scores[g]`, until each group is dense or the budget is spent. Kept
    counts above the floor are therefore proportional to the raw score (not the score per
    parameter). Whole units left by rounding go to the largest fractional parts (ties: lower
    index). All-zero scores give uniform sparsity; groups scored 0 among positive ones stay at
    their floor unless every positive group is dense, then they share the rest by size.

    `max_sparsity` defaults to `target + 0.1` (at most 1). A cap below the target is infeasible
    and raises `ValueError`. When the cap is within rounding of the target, the ceilings alone can
    overshoot the budget by a few units; those groups then take the floor instead (again largest
    fractional parts keep the ceiling), so each is at most one parameter sparser than the cap and
    `max_sparsity == target` yields uniform sparsity rather than an error.
    """
    n = [_size(x) for x in sizes]
    a = [_score(x) for x in scores]
    if len(n) != len(a):
        raise ValueError(f"{len(n)} group sizes but {len(a)} scores")
    if not n:
        raise ValueError("no groups to allocate over")
    s = _unit_ratio("target", target)
    cap = min(Fraction(1), s + DEFAULT_CAP_MARGIN) if max_sparsity is None else _unit_ratio(
        "max_sparsity", max_sparsity)
    if cap < s:
        raise ValueError(f"infeasible sparsity cap: max_sparsity={float(cap):g} is below "
                         f"target={float(s):g}; no group may exceed the cap, so the target "
                         "cannot be met")

    budget = math.floor((1 - s) * sum(n))
    floor = _keep_floors(n, 1 - cap, budget)
    scored_capacity = sum(ng if ag > 0 else lo for ng, ag, lo in zip(n, a, floor))
    level = _water_fill(floor, n, a, min(budget, scored_capacity))
    if budget > scored_capacity:
        # Every scored group is dense; the unscored ones (all of them if every score is 0) share
        # what is left as if their scores were their sizes, i.e. uniformly.
        unscored = [g for g, ag in enumerate(a) if ag == 0]
        rest = budget - sum(ng for ng, ag in zip(n, a) if ag > 0)
        shares = _water_fill([floor[g] for g in unscored], [n[g] for g in unscored],
                             [Fraction(n[g]) for g in unscored], rest)
        for g, x in zip(unscored, shares):
            level[g] = x

    kept = _round_to_budget(level, budget)
    return Allocation(kept=kept, sparsity=[float(1 - Fraction(k, ng)) for k, ng in zip(kept, n)],
                      budget=budget)


def allocate_sparsity(sizes: Sequence[int], scores: Sequence[float], target: float,
                      max_sparsity: float | None = None) -> list[float]:
    """The per-group sparsities of `allocate` (same arguments)."""
    return allocate(sizes, scores, target, max_sparsity).sparsity


def _keep_floors(sizes: list[int], min_keep: Fraction, budget: int) -> list[int]:
    """lo_g = ⌈min_keep·n_g⌉, with ceilings dropped to floors only as far as the budget demands."""
    exact = [min_keep * ng for ng in sizes]
    floor = [math.ceil(x) for x in exact]
    excess = sum(floor) - budget
    if excess > 0:
        # Only rounding can overshoot here: Σ⌊min_keep·n_g⌋ ≤ ⌊min_keep·Σn⌋ ≤ budget since cap ≥ s.
        rounded_up = [g for g, x in enumerate(exact) if x != math.floor(x)]
        rounded_up.sort(key=lambda g: (-(exact[g] - math.floor(exact[g])), g))
        for g in rounded_up[len(rounded_up) - excess:]:
            floor[g] -= 1
    return floor


def _water_fill(low: list[int], high: list[int], rate: list[Fraction], budget: int) -> list[Fraction]:
    """x_g = min(high_g, low_g + t·rate_g) with Σ x_g = budget (groups at rate 0 stay at low_g).

    t is solved exactly: walk the breakpoints (high_g − low_g)/rate_g in increasing order; between
    two of them the total is linear in t. If the budget exceeds what the groups can reach, every
    positive-rate group is returned full and the caller places the rest.
    """
    groups = range(len(low))
    rising = sorted((g for g in groups if rate[g] > 0),
                    key=lambda g: ((high[g] - low[g]) / rate[g], g))
    filled = sum(low[g] for g in groups if rate[g] == 0)  # constant part: stuck groups, then full ones
    base = sum(low[g] for g in rising)
    slope = sum((rate[g] for g in rising), Fraction(0))
    level = None
    for g in rising:
        full_at = (high[g] - low[g]) / rate[g]
        if filled + base + full_at * slope >= budget:
            level = (budget - filled - base) / slope
            break
        filled, base, slope = filled + high[g], base - low[g], slope - rate[g]
    return [Fraction(low[g]) if rate[g] == 0
            else Fraction(high[g]) if level is None
            else min(Fraction(high[g]), low[g] + level * rate[g]) for g in groups]


def _round_to_budget(level: list[Fraction], budget: int) -> list[int]:
    """Floors of `level`, plus one for the largest fractional parts until the sum is `budget`."""
    kept = [math.floor(x) for x in level]
    leftover = budget - sum(kept)
    assert 0 <= leftover <= sum(1 for x, k in zip(level, kept) if x != k), (leftover, level)
    by_remainder = sorted(range(len(level)), key=lambda g: (-(level[g] - kept[g]), g))
    for g in by_remainder[:leftover]:
        kept[g] += 1
    return kept


def _size(value: int) -> int:
    size = operator.index(value)
    if size <= 0:
        raise ValueError(f"group sizes must be positive integers, got {value!r}")
    return size


def _score(value: float) -> Fraction:
    score = float(value)
    if not math.isfinite(score) or score < 0:
        raise ValueError(f"group scores must be finite and non-negative, got {value!r}")
    return Fraction(score)  # exact binary value: scores are measurements, not decimals


def _unit_ratio(name: str, value: float) -> Fraction:
    ratio = as_fraction(value)
    if not 0 <= ratio <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return ratio
