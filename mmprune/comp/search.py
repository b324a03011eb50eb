"""The CoMP search (comp.md §5.3): stages of one FLOPs quantum, each advancing one mode.

Modes come from the graph's tags: a parameter mode per tower that has unit groups and a host
that can fade them ('vision_params', 'language_params', 'cross_params'), and the token modes
of the runtime's sites ('vision_tokens', 'language_tokens'): a managed tower's blocks (CLIP,
BLIP), or sites between the layers of a decoder LLM, where image and instruction tokens are the
two modes' candidates (LLaVA; there the decoder is the only host, so the ViT is not pruned).
A stage plans the removal of one
quantum in its mode, trains K steps while the planned heads/channels fade out (μ = 1 − k/K) or
the token threshold ramps, commits, and measures quality and FLOPs on the validation subset so
MPS can price the mode. When the target is reached, faded units are removed physically.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmprune.comp.cim import CIPStatistics
from mmprune.comp.mps import CANONICAL, ModeScheduler
from mmprune.context import Context
from mmprune.data.batching import collate_rows
from mmprune.errors import MMPruneError
from mmprune.eval_mode import eval_mode
from mmprune.graph import remove_units
from mmprune.graph.cost import over_passes
from mmprune.graph.units import HeadGroup, UnitGroup
from mmprune.measure import group_token_counts, headline
from mmprune.runtime.runtime import TokenRuntime
from mmprune.training import Trainer, batch_stream

PARAM_TOWERS = {"vision_params": "vision", "language_params": "language", "cross_params": "cross"}


def available_modes(ctx: Context, runtime: TokenRuntime) -> list[str]:
    """The modes this model has: parameter modes of towers with units and a host that runs
    their blocks with masks, and the runtime's token modes."""
    towers = {g.tower for g in ctx.graph.groups.values()}
    modes = [m for m, t in PARAM_TOWERS.items() if t in towers and runtime.host(t) is not None]
    modes += list(runtime.token_modes())
    return [m for m in CANONICAL if m in modes]


def has_decoder_llm(adapter) -> bool:
    try:
        adapter.decoder_layers()
    except MMPruneError:
        return False
    return True


def stage_cap(quantum: float, share: float, left: float) -> float:
    """What one stage of a mode that can still remove `left` may remove: a quantum, or `share`
    of what is left if less (`max_stage_share` for units, `token_stage_share` for tokens).
    Uncapped, a mode with under a quantum left takes all of it in one stage (a caption's tokens
    are a few percent of the FLOPs), priced only once it has happened; capped, a tower's last
    units or tokens go over several stages, each priced before the next."""
    return min(quantum, share * left)


@dataclass
class StagePlan:
    mode: str
    units: dict[str, list[int]] = field(default_factory=dict)   # parameter modes
    theta: tuple[float, float] | None = None                     # token modes: (old, new)
    planned_flops: float = 0.0                                   # fraction of dense, on the probe set
    order: list[tuple[str, int]] = field(default_factory=list)  # parameter units, weakest first
    nominal: float = 0.0        # parameter plans: the units' own FLOPs at today's token counts
    cap: float = 1.0            # most a stage may remove (max_stage_share, token_stage_share)
    last: bool = False      # the mode cannot remove a whole quantum: this is its last stage
    refit: dict[str, tuple[float, float]] = field(default_factory=dict)  # token mode: (θ old, new)

    @property
    def empty(self) -> bool:
        return not self.units and (self.theta is None or self.theta[1] <= self.theta[0])

    @property
    def removes(self) -> float:
        """FLOPs the stage is expected to remove: as measured on the probe set, or its units' own
        FLOPs where those are more."""
        return max(self.planned_flops, self.nominal)


@dataclass
class StageStart:
    """What a stage changes, as it was before the stage: enough to undo it (`rollback_drop`)."""
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scores: dict[str, torch.Tensor]
    thetas: dict[str, float]


class CompSearch:
    """One search run. `p` is the pass's parameter model (mmprune.passes.comp.CompParams)."""

    def __init__(self, ctx: Context, p: Any, log: Callable[[str], None] = print):
        self.ctx, self.p, self.log = ctx, p, log
        self.graph = ctx.graph
        self.rt = TokenRuntime.attach(ctx.graph)
        if has_decoder_llm(ctx.adapter):
            self.rt.manage_decoder().head_reduce = p.head_reduce or "mean"
        for t in self.rt.towers.values():
            t.head_reduce = p.head_reduce or "max"
        self.rt.set_cit(p.cit)
        self.stats = CIPStatistics(ctx.graph, token_weighted=p.cip)
        modes = available_modes(ctx, self.rt)
        asked = modes if p.modes == "all" else list(p.modes)
        towers = {g.tower for g in ctx.graph.groups.values()}
        unmanaged = [m for m in asked if m in PARAM_TOWERS and m not in modes and PARAM_TOWERS[m] in towers]
        if unmanaged:
            raise MMPruneError(f"comp: the '{ctx.adapter.name}' adapter does not run the towers of "
                               f"{unmanaged} block by block, so their units cannot fade out")
        missing = [m for m in asked if m not in modes]
        if missing:
            raise MMPruneError(f"comp: this model has no mode(s) {missing}; it has {', '.join(modes)}")
        self.modes = [m for m in CANONICAL if m in asked]
        self.scope = None       # FLOPs of the whole model
        if p.flops_scope == "decoder":
            if self.rt.decoder is None:
                raise MMPruneError(f"comp: flops_scope 'decoder' needs a decoder LLM; the "
                                   f"'{ctx.adapter.name}' adapter has none (use 'model')")
            self.scope = self.rt.decoder.tower
        if p.schedule == "round_robin":
            self.scheduler = ModeScheduler(self.modes, seed=ctx.seed, round_robin=True)
        else:
            self.scheduler = ModeScheduler(self.modes, rho=p.rho, tau=p.tau, lambda0=p.lambda0,
                                           i_max=p.i_max, seed=ctx.seed, memory=p.cost_memory,
                                           window=p.cost_window, exploration=p.exploration,
                                           max_run=p.max_run)
        self.frozen: dict[str, set[int]] = {gid: set() for gid in self.graph.groups}
        # units whose stage was undone (rollback_drop): the model needs them, later plans skip them
        self.kept: dict[str, set[int]] = {gid: set() for gid in self.graph.groups}
        self.token_modes = self.rt.token_modes()      # mode -> the tower whose counts it changes
        for mode in self.modes:
            if mode in self.token_modes:
                tower = self.token_modes[mode]
                layers = p.token_layers.get(tower) if p.token_layers else None
                self.rt.enable_token_mode(mode, p.token_floor(mode), p.merge_dropped == "fuse_one", layers,
                                          score=p.score_of(mode))
        self.v_sub = self._fixed_batches(p.val_split, p.v_sub, ctx.seed + 1)
        self.probe = self._fixed_batches(p.train_split, p.probe_set, ctx.seed + 2)
        self.trajectory: list[dict] = []
        self.scores: dict[str, torch.Tensor] = {}
        self.barred: dict[str, int] = {}   # mode -> accepted stages it waits after a rollback
        self.released = False   # kept units given back to reach the target; no more undoing
        self._p0 = self.graph.cost.params({gid: g.total for gid, g in self.graph.groups.items()})

    # ---- data
    def _fixed_batches(self, split: str, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
        ds = self.ctx.examples(split)
        order = np.random.default_rng(seed).permutation(len(ds))[:n].tolist()
        bs = self.p.eval_batch_size
        return [collate_rows(self.ctx.adapter, ds, order[i:i + bs]) for i in range(0, len(order), bs)]

    # ---- measurements
    def _sizes(self) -> dict[str, int]:
        return {gid: g.size - len(self.frozen[gid]) for gid, g in self.graph.groups.items()}

    @torch.no_grad()
    def measure_flops(self, batches, dense: bool = False,
                      sizes: dict[str, int] | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        """Mean per-example FLOPs over `batches`, and the per-group token counts behind it.

        Units fading in the current stage still count (they are not removed until committed).
        `dense` measures the unpruned model: every unit, no token dropping.
        """
        if sizes is None:
            sizes = {gid: g.total for gid, g in self.graph.groups.items()} if dense else self._sizes()
        per_example, counts = [], []
        with self.rt.quiet(), eval_mode(self.ctx.model), \
                (self.rt.without_sites() if dense else nullcontext()):
            for batch in batches:
                c = group_token_counts(self.ctx, batch)
                per_example.append(self.graph.cost.flops_per_example(c, sizes, tower=self.scope))
                counts.append(c)
        merged = {gid: torch.cat([c[gid] for c in counts]) for gid in counts[0]}
        return float(torch.cat(per_example).mean()), merged

    @torch.no_grad()
    def quality(self) -> float:
        """Q on the validation subset: the headline metric, or −100 × validation loss."""
        with self.rt.quiet(), eval_mode(self.ctx.model):
            if self.p.cost_metric == "val_loss":
                losses = [float(self.ctx.adapter.task_loss(b, self.ctx.task)) for b in self.v_sub]
                return -100.0 * float(np.mean(losses))
            metrics = self.ctx.adapter.evaluate(iter(self.v_sub), self.ctx.task)
        return headline(self.ctx, metrics)

    # ---- planning
    def _floor(self, group: UnitGroup) -> int:
        if isinstance(group, HeadGroup):
            return min(self.p.min_heads_per_module, group.total)
        return max(1, math.ceil(self.p.min_ffn_frac * group.total))

    def _unit_flops(self, group: UnitGroup, counts: dict[str, torch.Tensor]) -> float:
        n = counts.get(group.id)
        tokens = {**self.graph.cost.tokens, group.tower: n if n is not None else self.graph.cost.tokens[group.tower]}
        return float(torch.as_tensor(over_passes(self.graph.cost.group_flops(group, 1, tokens))).mean())

    def plan_params(self, mode: str, quantum: float, counts: dict[str, torch.Tensor], f_now: float,
                    f0: float) -> StagePlan:
        tower = PARAM_TOWERS[mode]
        scores = self.scores
        ranked = []
        for kind in ("head", "channel"):
            pool = []
            for gid, g in self.graph.groups.items():
                if g.tower != tower or g.kind != kind:
                    continue
                s = scores.get(gid)
                if s is None:
                    raise MMPruneError(f"comp: no importance statistics for {gid}; "
                                       "warm-up must run at least one step")
                pool += [(float(s[i]), gid, i) for i in range(g.size)
                         if i not in self.frozen[gid] and i not in self.kept[gid]]
            if not pool:
                continue
            vals = np.array([v for v, _, _ in pool])
            if self.p.score_norm == "zscore_per_kind":
                vals = (vals - vals.mean()) / (vals.std() + 1e-12)
            ranked += [(v, gid, i) for v, (_, gid, i) in zip(vals, pool)]
        ranked.sort(key=lambda r: (r[0], r[1], r[2]))
        left = {gid: g.size - len(self.frozen[gid]) - max(self._floor(g), len(self.kept[gid]))
                for gid, g in self.graph.groups.items()}
        unit = {gid: self._unit_flops(self.graph.groups[gid], counts) / f0 for gid in left}
        prunable = sum(unit[gid] * max(left[gid], 0) for gid, g in self.graph.groups.items()
                       if g.tower == tower)
        # one stage never takes most of what a tower has left: the cost of the next cut is
        # measured before it is made (a 5% quantum can be most of a token-pruned text tower)
        cap = stage_cap(quantum, self.p.max_stage_share, prunable)
        # units whose tokens are mostly gone cost little FLOPs each: a parameter quantum keeps a
        # stage from taking hundreds of them because the FLOPs quantum would allow it
        param_cap = math.inf if self.p.param_quantum is None else self.p.param_quantum * self._p0
        plan, removed, removed_params, param_capped = StagePlan(mode, cap=cap), 0.0, 0, False
        for _, gid, i in ranked:
            if removed >= cap:
                break
            if left[gid] <= 0:
                continue
            unit_params = self.graph.cost.unit_param_cost(self.graph.groups[gid])
            if plan.order and removed_params + unit_params > param_cap:
                param_capped = True
                break
            left[gid] -= 1
            plan.order.append((gid, i))
            removed += unit[gid]
            removed_params += unit_params
        plan.last = removed < quantum and cap >= quantum and not param_capped
        plan = self._fit_to_tokens(plan, cap, unit, counts, f_now, f0)
        plan.nominal = sum(unit[gid] for gid, _ in plan.order)
        return plan

    def _fit_to_tokens(self, plan: StagePlan, cap: float, unit: dict[str, float],
                       counts: dict[str, torch.Tensor], f_now: float, f0: float) -> StagePlan:
        """Shorten a parameter plan whose units, once masked, make the token sites drop more
        tokens than before: the removal is measured on the probe set with the units at zero, and
        the longest prefix of the ranked units that stays within the cap (+5%) is kept. Where even
        one unit overshoots, the token modes it made drop more get a lower θ (`refit_tokens`), but
        never so low that the stage removes less than its units' own FLOPs."""
        n = len(plan.order)
        r, after = self._removal(plan, n, {}, f_now, f0) if n else (0.0, {})
        if n > 1 and r > 1.05 * cap:
            lo, hi, at_lo, at_hi = 0, n, (0.0, {}), (r, after)  # removal(lo) ≤ 1.05·cap < removal(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                at_mid = self._removal(plan, mid, {}, f_now, f0)
                if at_mid[0] <= 1.05 * cap:
                    lo, at_lo = mid, at_mid
                else:
                    hi, at_hi = mid, at_mid
            n, (r, after) = (lo, at_lo) if lo else (1, at_hi)   # hi is 1 when even one unit overshoots
            plan.last = False
        bound = max(cap, sum(unit[gid] for gid, _ in plan.order[:n]))
        if n and r > 1.05 * bound and self.p.refit_tokens:
            plan.refit, r = self._refit_thetas(plan, n, bound, r, counts, after, f_now, f0)
        for gid, i in plan.order[:n]:
            plan.units.setdefault(gid, []).append(i)
        plan.order = plan.order[:n]
        plan.planned_flops = r
        return plan

    def _removal(self, plan: StagePlan, n: int, thetas: dict[str, float], f_now: float,
                 f0: float) -> tuple[float, dict[str, torch.Tensor]]:
        """Share of the dense FLOPs the probe set loses with `plan`'s first n units at zero and
        the token modes at `thetas`, and the token counts behind it; everything is put back."""
        trial = StagePlan(plan.mode)
        for gid, i in plan.order[:n]:
            trial.units.setdefault(gid, []).append(i)
        before = {m: self.rt.mode_theta(m) for m in thetas}
        try:
            self._apply(trial, 1.0)
            for m, theta in thetas.items():
                self.rt.set_mode_theta(m, theta)
            f, counts = self.measure_flops(self.probe, sizes=self._sizes_after(trial))
        finally:
            self._apply(StagePlan(plan.mode), 0.0)     # back to the frozen units only
            for m, theta in before.items():
                self.rt.set_mode_theta(m, theta)
        return (f_now - f) / f0, counts

    def _tower_counts(self, counts: dict[str, torch.Tensor], tower: str) -> list[torch.Tensor]:
        """The token counts of `tower`'s unit groups (not the cross-attention key counts)."""
        return [c for gid, c in counts.items() if ":" not in gid and self.graph.groups[gid].tower == tower]

    def _refit_thetas(self, plan: StagePlan, n: int, cap: float, r: float,
                      counts: dict[str, torch.Tensor], after: dict[str, torch.Tensor], f_now: float,
                      f0: float) -> tuple[dict[str, tuple[float, float]], float]:
        """Lower θ of the token modes whose towers lose tokens when `plan`'s first n units are
        masked (`counts` before, `after` with them at zero), by one common factor, so the stage
        removes about its cap: without it, one head that reshapes a token-pruned tower's
        attention can remove several quanta at once, and MPS prices (and the model pays for) a
        cut far wider than planned."""
        def tokens(cs: dict[str, torch.Tensor], tower: str) -> float:
            return sum(float(c.float().sum()) for c in self._tower_counts(cs, tower))

        old = {m: self.rt.mode_theta(m) for m, tower in self.token_modes.items()
               if m in self.modes and self.rt.mode_theta(m) > 0
               and tokens(after, tower) < 0.99 * tokens(counts, tower)}
        lo, hi, best = 0.0, 1.0, None            # scale s: the removal falls with s
        for _ in range(12 if old else 0):
            mid = (lo + hi) / 2
            r_mid, _ = self._removal(plan, n, {m: mid * t for m, t in old.items()}, f_now, f0)
            if r_mid > 1.05 * cap:
                hi = mid
            else:
                lo, best = mid, (mid, r_mid)
                if r_mid >= 0.95 * cap:
                    break
        if best is None:    # nothing to refit, or even every token back leaves it over the cap
            return {}, r
        s, r_fit = best
        return {m: (t, s * t) for m, t in old.items()}, r_fit

    def plan_tokens(self, mode: str, quantum: float, f_now: float, f0: float,
                    counts: dict[str, torch.Tensor]) -> StagePlan:
        """Bisection on θ so that the probe set's mean FLOPs fall by a quantum ± 5% (§5.1).

        Deviation (`token_stage_share` < 1): by min(quantum, share × what the mode can still
        remove) ± 5%; see `stage_cap`.
        """
        tower = self.token_modes[mode]
        # |Cand|·S ≥ θ fails for every candidate once θ exceeds the token count: no use going higher
        cap = 1.0 + max(float(c.max()) for c in self._tower_counts(counts, tower))
        old = self.rt.mode_theta(mode)

        def removed(theta: float) -> float:
            self.rt.set_mode_theta(mode, theta)
            return (f_now - self.measure_flops(self.probe)[0]) / f0

        try:
            lo, hi = old, min(max(2 * old, 0.25), cap)
            r_hi = removed(hi)
            while r_hi < quantum and hi < cap:
                lo, hi = hi, min(2 * hi, cap)
                r_hi = removed(hi)
            if r_hi < 0.05 * quantum:   # the floor is reached: nothing left to drop here
                return StagePlan(mode)
            goal = quantum
            if self.p.token_stage_share * r_hi < quantum:   # else a quantum is the smaller
                goal = stage_cap(quantum, self.p.token_stage_share,
                                 r_hi if hi >= cap else removed(cap))
                lo = old if goal < quantum else lo      # capped: search θ from the old value up
            if r_hi < 0.95 * goal or (goal < quantum and hi >= cap and r_hi <= 1.05 * goal):
                # what is left is less than a quantum (or, capped, about a goal): take it, retire
                return StagePlan(mode, theta=(old, hi), planned_flops=r_hi, last=True)
            best, best_r = hi, r_hi
            if r_hi > goal * 1.05:
                for _ in range(20):
                    mid = (lo + hi) / 2
                    r = removed(mid)
                    if abs(r - goal) <= 0.05 * goal:
                        best, best_r = mid, r
                        break
                    if r < goal:
                        lo = mid
                    else:
                        hi, best, best_r = mid, mid, r
            return StagePlan(mode, theta=(old, best), planned_flops=best_r, cap=goal)
        finally:
            self.rt.set_mode_theta(mode, old)

    # ---- stages
    def _apply(self, plan: StagePlan, frac: float) -> None:
        """Masks and thresholds at fraction `frac` of a stage (1 = end)."""
        for gid, g in self.graph.groups.items():
            if self.rt.host(g.tower) is None:
                continue
            fading = plan.units.get(gid, [])
            if not self.frozen[gid] and not fading:
                self.rt.set_mask(gid, None)
                continue
            mask = torch.ones(g.size)
            mask[sorted(self.frozen[gid])] = 0.0
            mask[fading] = 1.0 - frac
            self.rt.set_mask(gid, mask)
        if plan.theta is not None:
            old, new = plan.theta
            self.rt.set_mode_theta(plan.mode, old + (new - old) * frac)
        for mode, (old, new) in plan.refit.items():
            self.rt.set_mode_theta(mode, old + (new - old) * frac)

    @contextmanager
    def _plan_held(self, plan: StagePlan, frac: float, then: float) -> Iterator[None]:
        """`plan` at fraction `frac` for the body, at `then` after it, even if the body fails."""
        self._apply(plan, frac)
        try:
            yield
        finally:
            self._apply(plan, then)

    def _plan_damage(self, plan: StagePlan, f0: float) -> tuple[float, float]:
        """Quality and FLOPs (fraction of dense) on the validation subset with `plan` applied in
        full to today's weights: the stage's cost before training can recover or mask it."""
        with self._plan_held(plan, 1.0, then=0.0):      # the stage starts from the committed state
            return self.quality(), self.measure_flops(self.v_sub, sizes=self._sizes_after(plan))[0] / f0

    def _without_stage(self, plan: StagePlan) -> float:
        """Quality on the validation subset of today's weights with `plan`'s cut put back (its
        units at 1, θ at its old value): what the stage's K steps of training would have left
        without the stage, measured in the same state, so the stage's price is its own."""
        with self._plan_held(plan, 0.0, then=1.0):
            return self.quality()

    def _sizes_after(self, plan: StagePlan) -> dict[str, int]:
        sizes = self._sizes()
        for gid, units in plan.units.items():
            sizes[gid] -= len(units)
        return sizes

    def _plan(self, mode: str, quantum: float, f_probe_now: float, f0_probe: float,
              counts: dict[str, torch.Tensor]) -> StagePlan | None:
        """`mode`'s next stage, or None when it has nothing worth a stage (the caller drops it)."""
        if mode in self.token_modes:
            plan = self.plan_tokens(mode, quantum, f_probe_now, f0_probe, counts)
        else:
            plan = self.plan_params(mode, quantum, counts, f_probe_now, f0_probe)
        if plan.empty:
            self.log(f"comp: mode {mode} is exhausted")
            return None
        if plan.removes < self.p.retire_below * quantum:
            self.log(f"comp: mode {mode} is retired: its next stage would remove "
                     f"{plan.removes:.4f} of the FLOPs, under {self.p.retire_below} of a quantum")
            return None
        return plan

    def _pick(self, planned: Callable[[str], StagePlan | None], f0: float,
              among: set[str] | None = None):
        """MPS as in the spec: choose on past costs, then plan; a mode with no plan is dropped
        and the choice made again."""
        while (choice := self.scheduler.choose(among=among)) is not None:
            mode, why = choice
            plan = planned(mode)
            if plan is None:
                self.scheduler.exhaust(mode)
                continue
            priced = self._plan_damage(plan, f0) if self.p.cost_at == "plan" else None
            return mode, why, plan, priced, {}
        return None

    def _pick_by_lookahead(self, planned: Callable[[str], StagePlan | None], quantum: float,
                           q_cur: float, f_cur: float, f0: float, among: set[str] | None = None):
        """Plan and price every active mode's next stage, then choose: among the prices
        (`cost_at: lookahead`), or on past costs as `cost_at` says (`refuse_dear_plans`). A plan
        expected to lose more than `lookahead_margin` of quality per quantum beyond the cheapest
        is refused, so neither exploration nor a cheap history can take it."""
        plans, damage, prices = {}, {}, {}
        for mode in [m for m in self.scheduler.active if among is None or m in among]:
            plan = planned(mode)
            if plan is None:
                self.scheduler.retire(mode)
                continue
            plans[mode] = plan
            damage[mode] = q, f = self._plan_damage(plan, f0)
            prices[mode] = self.scheduler.price(q_cur, q, f_cur, f, planned=plan.removes)
        if not prices:
            return None
        plan_prices = dict(prices)
        if self.p.lookahead_calibration:
            prices = {m: r + self._gap(m) for m, r in prices.items()}
        best = min(prices.values())
        allowed = {m: r for m, r in prices.items() if (r - best) * quantum <= self.p.lookahead_margin}
        unseen = [m for m in allowed if not self._gaps(m)]
        if self.p.lookahead_calibration and unseen:   # a gap is learnt from a stage of the mode's own
            mode, why = self.scheduler.choose(among={unseen[0]})
        elif self.p.cost_at == "lookahead":
            mode, why = self.scheduler.choose(allowed)
        else:
            mode, why = self.scheduler.choose(among=set(allowed))
        looked = {"lookahead": prices, "refused": sorted(set(prices) - set(allowed))}
        if self.p.lookahead_calibration:
            looked["plan_prices"] = plan_prices
        # calibrated: the stage is recorded at its end (Eq. 3), which its price predicts
        priced = (damage[mode] if self.p.cost_at not in ("stage_end", "paired")
                  and not self.p.lookahead_calibration else None)
        return mode, why, plans[mode], priced, looked

    def _gaps(self, mode: str) -> list[float]:
        """`mode`'s calibrated stages so far: stage-end cost minus plan price, oldest first."""
        return [t["r"] - t["plan_prices"][mode] for t in self.trajectory
                if t["mode"] == mode and "plan_prices" in t]

    def _gap(self, mode: str) -> float:
        """The mean of `mode`'s last three gaps (0 before its first stage)."""
        recent = self._gaps(mode)[-3:]
        return sum(recent) / len(recent) if recent else 0.0

    def run(self, trainer_factory: Callable[[int], Trainer]) -> dict[str, Any]:
        p, ctx = self.p, self.ctx
        f0, _ = self.measure_flops(self.v_sub, dense=True)
        f0_probe, _ = self.measure_flops(self.probe, dense=True)
        target = 1.0 - p.target
        f_cur = self.measure_flops(self.v_sub)[0] / f0
        k = max(p.k_min, int(p.search_steps * p.stage_quantum / max(p.target, 1e-9)))
        warmup = p.warmup_steps if p.warmup_steps is not None else k
        stages_est = max(1, math.ceil(max(f_cur - target, 0) / p.stage_quantum))
        trainer = trainer_factory(warmup + k * stages_est)
        stream = batch_stream(ctx, p.train_split, p.batch_size, ctx.seed)
        self.rt.set_observer(self.stats)
        self.log(f"comp: dense {f0:.4g} FLOPs/example, start at {f_cur:.3f}, target {target:.3f}; "
                 f"K = {k} steps per stage, modes {', '.join(self.modes)}")
        for batch in ctx.progress(islice(stream, warmup), "comp warm-up", total=warmup):
            trainer.step(batch)
        steps_done = warmup
        self._close_window()
        q_cur = self.quality()   # after warm-up, so the first stage is not credited with it
        self.trajectory.append({"stage": 0, "mode": None, "quality": q_cur, "flops": f_cur})
        bar = tqdm(total=stages_est, desc="comp stages", leave=False, disable=not ctx.show_progress,
                   dynamic_ncols=True)
        while f_cur > target + p.tol:
            quantum = min(p.stage_quantum, f_cur - target)
            f_probe_now, counts = self.measure_flops(self.probe)
            planned = partial(self._plan, quantum=quantum, f_probe_now=f_probe_now,
                              f0_probe=f0_probe, counts=counts)

            def pick(among: set[str] | None):
                if p.cost_at == "lookahead" or p.refuse_dear_plans:
                    return self._pick_by_lookahead(planned, quantum, q_cur, f_cur, f0, among)
                return self._pick(planned, f0, among)

            among = {m for m in self.scheduler.active if m not in self.barred} if self.barred else None
            chosen = pick(among) if among != set() else None
            guarded = p.rollback_drop is not None and not self.released and chosen is not None
            if chosen is None and among is not None:
                # every mode left was undone lately: the stage runs unguarded rather than stop short
                chosen = pick(None)
            if chosen is None and any(self.kept.values()):
                self._release_kept()
                continue
            if chosen is None:
                self.log("comp: every mode is exhausted before the target")
                break
            mode, why, plan, priced, looked = chosen
            start = self._stage_start(trainer) if guarded else None
            # stages smaller than the quantum (capped, or the last) can outrun the estimate:
            # stretch the schedule rather than train the extra stages at zero learning rate
            trainer.total = max(trainer.total, steps_done + k)
            for step in range(1, k + 1):
                self._apply(plan, step / k)
                trainer.step(next(stream))
            steps_done += k
            self._commit(plan)
            self._close_window()
            q_new = self.quality()
            f_new = self.measure_flops(self.v_sub)[0] / f0
            undone = start is not None and q_cur - q_new > p.rollback_drop * abs(q_cur)
            if plan.last and not undone:
                self.scheduler.retire(mode)
            q_priced, f_priced = priced or (q_new, f_new)
            q_ref = self._without_stage(plan) if p.cost_at == "paired" else q_cur
            if undone and plan.units:   # its next plan skips these units: this price is not its
                r = self.scheduler.price(q_ref, q_priced, f_cur, f_priced, planned=plan.removes)
            else:
                r = self.scheduler.record(mode, q_ref, q_priced, f_cur, f_priced, why=why,
                                          planned=plan.removes, theta=self._thetas())
            tried = {}
            if undone:
                self._undo(plan, start, trainer)
                if plan.units:
                    for gid, units in plan.units.items():
                        self.kept[gid].update(units)
                    then = "its units are kept from now on"
                else:
                    self.barred[mode] = p.rollback_bar
                    then = f"{mode} waits {p.rollback_bar} stage(s)"
                self.log(f"comp stage {self.scheduler.stage}: {mode} ({why}) undone: quality "
                         f"{q_cur:.2f} → {q_new:.2f}, more than {p.rollback_drop:.0%} lost; {then}")
                tried = {"undone": True, "tried_quality": q_new, "tried_flops": f_new}
                q_new, f_new = q_cur, f_cur       # the path goes on from the stage's start
            else:
                self.barred = {m: n - 1 for m, n in self.barred.items() if n > 1}
                self.log(f"comp stage {self.scheduler.stage}: {mode} ({why}) FLOPs {f_cur:.3f} → "
                         f"{f_new:.3f}, quality {q_cur:.2f} → {q_new:.2f}")
            self.trajectory.append({"stage": self.scheduler.stage, "mode": mode, "why": why,
                                    "quality": q_new, "flops": f_new, "r": r,
                                    "costs": dict(self.scheduler.cost), **tried,
                                    **({"unguarded": True} if p.rollback_drop is not None
                                       and not guarded else {}),
                                    **({"priced_quality": q_priced, "priced_flops": f_priced}
                                       if priced else {}),
                                    **({"paired_quality": q_ref} if p.cost_at == "paired" else {}),
                                    **looked,
                                    "removed": f_cur - f_new, "planned": plan.planned_flops,
                                    "nominal": plan.nominal,
                                    "quantum": quantum, "cap": min(quantum, plan.cap),
                                    "last": plan.last,
                                    "theta": self._thetas(),
                                    "units": {gid: len(v) for gid, v in plan.units.items()},
                                    **({"refit": plan.refit} if plan.refit else {}),
                                    "param_share": sum(self.graph.cost.unit_param_cost(self.graph.groups[gid]) * len(v)
                                                       for gid, v in plan.units.items()) / self._p0})
            q_cur, f_cur = q_new, f_new
            bar.update(1)
        bar.close()
        self.freeze()
        return {"dense_flops": f0, "flops_tower": self.scope, "target": target,
                "final_flops": f_cur, "final_quality": q_cur, "kept_released": self.released,
                "steps_per_stage": k, "warmup_steps": warmup, "modes": self.modes,
                "thresholds": self._thetas(),
                "trajectory": self.trajectory}

    def _release_kept(self) -> None:
        """Every mode is exhausted short of the target while undone stages keep units: give
        them back to the parameter modes and run the rest of the search unguarded, so the target
        is reached (and a stage undone again cannot keep them once more, which could loop)."""
        n = sum(len(u) for u in self.kept.values())
        self.log(f"comp: every mode is exhausted before the target; the {n} unit(s) kept by "
                 "undone stages are released and the search goes on without undoing stages")
        self.kept = {gid: set() for gid in self.graph.groups}
        self.scheduler.exhausted -= {m for m in self.modes if m in PARAM_TOWERS}
        self.barred, self.released = {}, True

    def _stage_start(self, trainer: Trainer) -> StageStart:
        return StageStart(weights={n: t.detach().clone() for n, t in self.ctx.model.named_parameters()},
                          optimizer=copy.deepcopy(trainer.opt.state_dict()),
                          scores=self.scores, thetas=self._thetas())

    @torch.no_grad()
    def _undo(self, plan: StagePlan, start: StageStart, trainer: Trainer) -> None:
        """Put the model back as it was before `plan`'s stage: weights, optimizer moments,
        masks, token thresholds and the scores the next stage plans with. The learning-rate
        schedule goes on: the stage's steps were spent."""
        for gid, units in plan.units.items():
            self.frozen[gid].difference_update(units)
        self._apply(StagePlan(plan.mode), 0.0)
        for m, theta in start.thetas.items():
            if self.rt.mode_theta(m) != theta:     # only what the stage moved (token plan, refit)
                self.rt.set_mode_theta(m, theta)
        for n, t in self.ctx.model.named_parameters():
            t.copy_(start.weights[n])
        lrs = [g["lr"] for g in trainer.opt.param_groups]
        trainer.opt.load_state_dict(start.optimizer)
        for g, lr in zip(trainer.opt.param_groups, lrs):
            g["lr"] = lr
        self.scores = start.scores

    def _thetas(self) -> dict[str, float]:
        return {m: self.rt.mode_theta(m) for m in self.token_modes}

    def _close_window(self) -> None:
        """Score with this window's statistics (the next stage selects on them), then reset."""
        self.scores = self.stats.scores()
        self.stats.reset()

    def _commit(self, plan: StagePlan) -> None:
        self._apply(plan, 1.0)
        for gid, units in plan.units.items():
            self.frozen[gid].update(units)

    def freeze(self) -> None:
        """Remove every unit whose mask reached 0, physically; stop collecting statistics."""
        self.rt.set_observer(None)
        self.rt.clear_masks()
        for gid, units in self.frozen.items():
            if units:
                remove_units(self.graph, self.graph.groups[gid], sorted(units))
        self.frozen = {gid: set() for gid in self.graph.groups}
        self.rt.release_idle()   # towers without token pruning go back to fused attention
