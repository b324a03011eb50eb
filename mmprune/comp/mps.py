"""MPS mode choice (comp.md §5.2): smoothed cost per mode, history decay, random exploration.

Pure bookkeeping, no model: the search loop asks `choose()` for the next stage's mode and tells
`record()` what the stage cost. A dedicated RNG seeded from the run seed drives exploration, so
the mode trajectory is reproducible and independent of data order and dropout.
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Literal

#: the canonical order: warm-up order and tie-break order
CANONICAL = ("vision_tokens", "language_tokens", "vision_params", "language_params", "cross_params")


def history_weight(gap: int, lambda0: float, i_max: int) -> float:
    """Eq. (4): λ = max(λ₀ − (λ₀ / I_max)·(I − 1), 0) for a mode last run `gap` stages ago."""
    return max(lambda0 - (lambda0 / i_max) * (gap - 1), 0.0)


@dataclass
class ModeScheduler:
    modes: list[str]
    rho: float = 0.2
    tau: float = 5.0
    lambda0: float = 0.4
    i_max: int = 5
    seed: int = 0
    eps_flops: float = 1e-6
    memory: Literal["ema", "median"] = "ema"
    window: int = 5
    exploration: Literal["random", "stride"] = "random"
    #: most stages one mode may run in a row, its warm-up stage included; the cap acts after the
    #: warm-up (None: no limit, the paper)
    max_run: int | None = None
    #: modes in turn whatever they cost (the CIM-only ablation): no warm-up, exploration or history
    round_robin: bool = False
    picks: int = 0                                               # choices after the warm-up
    stage: int = 0
    cost: dict[str, float] = field(default_factory=dict)       # R_b
    history: dict[str, list[float]] = field(default_factory=dict)  # every r of each mode
    last: dict[str, int] = field(default_factory=dict)
    exhausted: set[str] = field(default_factory=set)
    trajectory: list[dict] = field(default_factory=list)

    def __post_init__(self):
        unknown = [m for m in self.modes if m not in CANONICAL]
        if unknown:
            raise ValueError(f"unknown mode(s) {unknown}; modes are {', '.join(CANONICAL)}")
        if self.memory not in ("ema", "median") or self.window < 1:
            raise ValueError(f"memory is 'ema' or 'median' and window at least 1, not "
                             f"{self.memory!r} / {self.window}")
        if self.exploration not in ("random", "stride"):
            raise ValueError(f"exploration is 'random' or 'stride', not {self.exploration!r}")
        if self.max_run is not None and self.max_run < 1:
            raise ValueError(f"max_run is at least 1 (or None), not {self.max_run}")
        self.modes = [m for m in CANONICAL if m in self.modes]
        self.last = {m: 0 for m in self.modes}
        self._rng = random.Random(self.seed)
        self._turn: str | None = None
        self._chosen: list[str] = []          # each stage's mode, exhausted choices taken back

    @property
    def active(self) -> list[str]:
        return [m for m in self.modes if m not in self.exhausted]

    def choose(self, prices: dict[str, float] | None = None,
               among: set[str] | None = None) -> tuple[str, str] | None:
        """(mode, why) for the next stage, or None when every mode is exhausted.

        `prices` (lookahead): each candidate mode's cost r of its next stage, measured before
        choosing; only those modes are candidates, none needs a warm-up stage, and a mode's
        cost is its price blended with its history as Eq. (5) blends a stage's r. `among`
        limits the candidates without prices (plans refused by a lookahead).
        """
        active = [m for m in self.active if (prices is None or m in prices)
                  and (among is None or m in among)]
        if not active:
            return None
        self.stage += 1
        mode, why = self._choose(active, prices)
        self._chosen.append(mode)
        return mode, why

    def _choose(self, active: list[str], prices: dict[str, float] | None) -> tuple[str, str]:
        if self.round_robin:
            return self._next_in_turn(active), "turn"
        fresh = [] if prices is not None else [m for m in active if m not in self.cost]
        if fresh:
            return fresh[0], "warm-up"
        capped = self._capped(active)
        if capped is not None:
            active = [m for m in active if m != capped]
        if self._explores():
            logits = [(self.stage - self.last[m]) / self.tau for m in active]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            return self._rng.choices(active, weights=weights)[0], "explore"
        cost = self.cost if prices is None else {m: self._new_cost(m, r) for m, r in prices.items()}

        def rank(m: str) -> tuple[float, int]:
            return cost[m], self.modes.index(m)
        cheapest = min(active, key=rank)
        if capped is not None and rank(capped) < rank(cheapest):
            return cheapest, "capped"        # the argmin, had its run not reached max_run
        return cheapest, "exploit"

    def _capped(self, active: list[str]) -> str | None:
        """The mode that ran the last `max_run` stages in a row, when another can run instead.

        Deviation (max_run): Eq. (5) updates a mode's cost only when it runs, so while one mode
        keeps winning, the others are priced by stages run long ago, on a model since cut
        elsewhere; with ρ = 0.2 a run can last 25 stages (the first of Random(0)'s draws below
        0.2 is its 26th). A cap makes MPS re-price the cheapest other mode on the model as it is.
        """
        if self.max_run is None or len(self._chosen) < self.max_run or len(active) < 2:
            return None
        mode = self._chosen[-1]
        in_a_row = all(m == mode for m in self._chosen[-self.max_run:])
        return mode if in_a_row and mode in active else None

    def _next_in_turn(self, active: list[str]) -> str:
        """The first of `active` after the mode chosen last, in canonical order, cyclically."""
        after = self.modes.index(self._turn) + 1 if self._turn is not None else 0
        ring = self.modes[after:] + self.modes[:after]
        self._turn = next(m for m in ring if m in active)
        return self._turn

    def _explores(self) -> bool:
        """Whether this choice (after the warm-up) explores: with probability ρ (§5.2).

        Deviation (exploration 'stride'): at each choice that takes ⌊n·ρ⌋ up (n: choices so
        far), so every 1/ρ-th one. Random draws come in streaks: the first of Random(0)'s below
        0.2 is its 26th, so the shipped recipes (seed 0) never explored in the 25 stages after
        their warm-up, the stages in which one warm-up price of a mode kept it out.
        """
        self.picks += 1
        if self.exploration == "stride":
            return math.floor(self.picks * self.rho) > math.floor((self.picks - 1) * self.rho)
        return self._rng.random() < self.rho

    def _new_cost(self, mode: str, r: float) -> float:
        """Eq. (5): `r` blended with `mode`'s history, weighted by how long ago it last ran.

        Deviation (memory 'median'): the median of `r` and the mode's last `window` − 1 costs.
        One stage's r is mostly noise (a quantum's quality change on a few hundred validation
        examples) and Eq. (5) keeps 60% or more of it, so one dear stage shuts a mode out until
        exploration happens to pick it again; a median of three or more costs ignores one
        outlier. Of two (or any even count) it is the mean of the middle pair, so a mode's
        second stage still moves its cost halfway; and a median forgets by count, not by age
        (i_max does not apply).
        """
        if self.memory == "median":
            return statistics.median((self.history.get(mode, []) + [r])[-self.window:])
        if mode not in self.cost:
            return r
        lam = history_weight(self.stage - self.last[mode], self.lambda0, self.i_max)
        return lam * self.cost[mode] + (1 - lam) * r

    def price(self, q_before: float, q_after: float, f_before: float, f_after: float,
              planned: float = 0.0) -> float:
        """Eq. (3), quality lost per FLOP removed (F as a fraction of dense).

        Deviation from Eq. (3): the FLOPs removed are taken as at least half of what the stage
        `planned`. Removing heads reshapes attention maps, so relative token thresholds can keep
        more tokens and a stage can remove nothing or even add FLOPs; dividing by ε_F then made a
        stage whose quality merely recovered look infinitely cheap, and MPS chased that mode.
        """
        return (q_before - q_after) / max(f_before - f_after, 0.5 * planned, self.eps_flops)

    def exhaust(self, mode: str) -> None:
        """`mode` cannot remove a quantum any more: never choose it again; the stage did not run."""
        self.exhausted.add(mode)
        self.stage -= 1
        if self._chosen:
            self._chosen.pop()

    def retire(self, mode: str) -> None:
        """`mode` ran its last stage (it removed what it could, less than a quantum)."""
        self.exhausted.add(mode)

    def record(self, mode: str, q_before: float, q_after: float, f_before: float, f_after: float,
               planned: float = 0.0, **log) -> float:
        """Eqs. (3)-(5) after a stage of `mode` (see `price`). Returns r."""
        r = self.price(q_before, q_after, f_before, f_after, planned)
        self.cost[mode] = self._new_cost(mode, r)
        self.history.setdefault(mode, []).append(r)
        self.last[mode] = self.stage
        self.trajectory.append({"stage": self.stage, "mode": mode, "r": r, "R": dict(self.cost),
                                "quality": q_after, "flops": f_after, **log})
        return r
