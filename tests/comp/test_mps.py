"""MPS mode choice against a fake cost oracle (comp.md §12.9-10)."""
import math
from collections import Counter

import pytest
from scipy.stats import chisquare

from mmprune.comp.mps import ModeScheduler, history_weight

MODES = ["language_params", "vision_tokens", "vision_params", "language_tokens"]


def test_lambda_table():
    got = [round(history_weight(i, 0.4, 5), 6) for i in range(1, 8)]
    assert got == [0.4, 0.32, 0.24, 0.16, 0.08, 0.0, 0.0]


def test_warm_up_visits_every_mode_once_in_canonical_order():
    s = ModeScheduler(MODES, rho=1.0, seed=3)  # exploration would otherwise win every draw
    seen = []
    for _ in range(4):
        mode, why = s.choose()
        assert why == "warm-up"
        seen.append(mode)
        s.record(mode, 50, 49, 1.0, 0.98)
    assert seen == ["vision_tokens", "language_tokens", "vision_params", "language_params"]


def _choices(s: ModeScheduler, true_cost: dict[str, float], stages: int) -> list[tuple[str, str]]:
    """(mode, why) of each stage, every stage costing its mode's true cost."""
    out = []
    for _ in range(stages):
        mode, why = s.choose()
        out.append((mode, why))
        s.record(mode, 0.0, -true_cost[mode] * 0.02, 1.0, 0.98)  # Δq = r · ΔF
    return out


def _run(s: ModeScheduler, true_cost: dict[str, float], stages: int) -> list[str]:
    return [mode for mode, _ in _choices(s, true_cost, stages)]


def test_greedy_picks_the_cheapest_mode():
    cost = dict(vision_tokens=3.0, language_tokens=0.5, vision_params=2.0, language_params=1.0)
    traj = _run(ModeScheduler(MODES, rho=0.0, lambda0=0.0), cost, 10)
    assert traj[4:] == ["language_tokens"] * 6


def test_rho_zero_always_takes_argmin_of_smoothed_cost():
    s = ModeScheduler(MODES, rho=0.0)
    for mode in ["vision_tokens", "language_tokens", "vision_params", "language_params"]:
        s.choose()
        s.record(mode, 50.0, 50.0 - {"vision_tokens": 4, "language_tokens": 1,
                                     "vision_params": 3, "language_params": 2}[mode] * 0.02, 1.0, 0.98)
    for _ in range(5):
        mode, why = s.choose()
        assert why == "exploit" and mode == min(s.cost, key=s.cost.get)
        s.record(mode, 50.0, 50.0 - 0.5 * 0.02, 1.0, 0.98)


def test_history_blends_with_lambda():
    s = ModeScheduler(["vision_tokens"], rho=0.0)
    s.choose(); s.record("vision_tokens", 10, 9, 1.0, 0.5)       # r = 2
    s.choose(); s.record("vision_tokens", 10, 10, 1.0, 0.5)      # r = 0, gap 1: λ = 0.4
    assert s.cost["vision_tokens"] == pytest.approx(0.4 * 2.0)


def test_same_seed_same_trajectory_other_seed_differs():
    cost = dict(vision_tokens=1.0, language_tokens=1.2, vision_params=0.8, language_params=1.1)
    a = _run(ModeScheduler(MODES, rho=0.3, seed=7), cost, 60)
    b = _run(ModeScheduler(MODES, rho=0.3, seed=7), cost, 60)
    c = _run(ModeScheduler(MODES, rho=0.3, seed=8), cost, 60)
    assert a == b and a != c


def test_exploration_frequencies_follow_softmax_of_staleness():
    """Exploration draws match softmax((T − last)/τ) (χ² test at a fixed staleness pattern)."""
    s = ModeScheduler(MODES, rho=1.0, tau=5.0, seed=0)
    for mode in ["vision_tokens", "language_tokens", "vision_params", "language_params"]:
        s.choose(); s.record(mode, 0, 0, 1, 0.98)
    counts = Counter()
    n = 4000
    for _ in range(n):
        s.stage = 10   # choose() makes it 11; last = 1, 2, 3, 4 in canonical order
        mode, why = s.choose()
        assert why == "explore"
        counts[mode] += 1
    active = s.active
    logits = [(11 - s.last[m]) / 5.0 for m in active]
    z = sum(math.exp(x) for x in logits)
    expected = [n * math.exp(x) / z for x in logits]
    assert chisquare([counts[m] for m in active], expected).pvalue > 1e-3


def test_exhausted_modes_are_never_chosen():
    s = ModeScheduler(MODES, rho=0.5, seed=1)
    assert s.choose() == ("vision_tokens", "warm-up")
    s.exhaust("vision_tokens")  # its plan came back empty: the stage did not run
    assert s.stage == 0
    cost = dict(vision_tokens=0.0, language_tokens=1.0, vision_params=1.0, language_params=1.0)
    traj = _run(s, cost, 50)
    assert "vision_tokens" not in traj and set(traj) == set(MODES) - {"vision_tokens"}
    for m in set(traj):
        s.exhaust(m)
    assert s.choose() is None


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="vision_tokens"):
        ModeScheduler(["vision_tokenz"])


def test_retired_mode_is_not_chosen_again_and_keeps_its_stage():
    s = ModeScheduler(MODES, rho=0.0)
    mode, _ = s.choose()
    s.record(mode, 1, 1, 1, 0.98)
    s.retire(mode)
    assert s.stage == 1 and mode not in s.active


def test_a_stage_that_removed_nothing_is_priced_by_what_it_planned():
    """Head removal can make token sites keep more tokens, so a stage may add FLOPs: its cost is
    then quality change over half the planned removal, not over ε (which made it look free)."""
    s = ModeScheduler(["vision_params"], seed=0)
    s.choose()
    r = s.record("vision_params", -220.0, -214.0, 0.424, 0.426, planned=0.02)
    assert r == pytest.approx(-6.0 / 0.01)
    s.choose()
    assert s.record("vision_params", 10.0, 9.0, 0.5, 0.48, planned=0.02) == pytest.approx(1 / 0.02)


def test_lookahead_prices_need_no_warm_up_and_blend_with_history():
    s = ModeScheduler(MODES, rho=0.0, lambda0=0.4)
    prices = dict(vision_tokens=3.0, language_tokens=2.0, vision_params=1.0, language_params=4.0)
    assert s.choose(prices) == ("vision_params", "exploit")   # no warm-up stage
    s.record("vision_params", 10.0, 10.0 - 1.0 * 0.02, 1.0, 0.98)
    # vision_params ran last stage at r = 1: its cost is 0.4·1 + 0.6·price
    prices = dict(vision_tokens=2.5, language_tokens=2.4, vision_params=3.0, language_params=4.0)
    assert s.choose(prices) == ("vision_params", "exploit")    # 0.4 + 1.8 = 2.2 < 2.4
    s.record("vision_params", 10.0, 10.0 - 3.0 * 0.02, 1.0, 0.98)
    assert s.choose({**prices, "vision_params": 3.5})[0] == "language_tokens"


def test_lookahead_candidates_are_the_priced_modes_only():
    s = ModeScheduler(MODES, rho=1.0, seed=0)      # every draw explores
    for _ in range(200):
        mode, why = s.choose({"vision_tokens": 5.0, "language_params": 9.0})
        assert why == "explore" and mode in {"vision_tokens", "language_params"}
        s.record(mode, 1.0, 0.9, 1.0, 0.98)
    assert s.choose({}) is None


def test_among_limits_the_choice_on_past_costs():
    s = ModeScheduler(MODES, rho=0.0)
    assert s.choose(among={"vision_params", "language_params"}) == ("vision_params", "warm-up")
    s.record("vision_params", 1.0, 0.0, 1.0, 0.98)
    s.choose(among={"language_params"}); s.record("language_params", 1.0, 0.5, 1.0, 0.98)
    # vision_tokens is fresh, but refused: the cheaper of the two allowed runs
    assert s.choose(among={"vision_params", "language_params"}) == ("language_params", "exploit")


def _run_noisy(s: ModeScheduler, prices: dict[str, list[float]], stages: int) -> list[str]:
    """Stages against a fake oracle whose n-th stage of a mode costs prices[mode][n]."""
    out, n = [], Counter()
    for _ in range(stages):
        mode, _ = s.choose()
        r = prices[mode][min(n[mode], len(prices[mode]) - 1)]
        n[mode] += 1
        out.append(mode)
        s.record(mode, 0.0, -r * 0.02, 1.0, 0.98)
    return out


def test_one_dear_stage_shuts_a_mode_out_under_ema_but_not_under_median():
    # vision_params usually costs 10, but its third stage is an outlier at 200; vision_tokens
    # costs 50 every stage
    prices = {"vision_params": [10, 10, 200, 10, 10, 10], "vision_tokens": [50]}
    modes = ["vision_tokens", "vision_params"]
    ema = _run_noisy(ModeScheduler(modes, rho=0.0), prices, 10)
    median = _run_noisy(ModeScheduler(modes, rho=0.0, memory="median", window=5), prices, 10)
    # warm-up, two cheap stages, the outlier: then Eq. 5 holds R at 0.4·10 + 0.6·200 = 124
    assert ema[:4] == ["vision_tokens", "vision_params", "vision_params", "vision_params"]
    assert ema[4:] == ["vision_tokens"] * 6
    # the median of 10, 10, 200 is 10: vision_params goes on
    assert median == ["vision_tokens"] + ["vision_params"] * 9


def test_median_memory_takes_the_last_window_costs():
    s = ModeScheduler(["vision_tokens"], rho=0.0, memory="median", window=3)
    for r in [1.0, 9.0, 5.0, 7.0]:
        s.choose()
        s.record("vision_tokens", 0.0, -r * 0.02, 1.0, 0.98)
    assert s.cost["vision_tokens"] == pytest.approx(7.0)        # median of 9, 5, 7
    assert s._new_cost("vision_tokens", 1.0) == pytest.approx(5.0)  # a lookahead price joins 5, 7


def test_a_median_of_two_costs_is_their_mean_and_of_one_the_cost_itself():
    def costs(window, rs):
        s = ModeScheduler(["vision_tokens"], rho=0.0, memory="median", window=window)
        for r in rs:
            s.choose()
            s.record("vision_tokens", 0.0, -r * 0.02, 1.0, 0.98)
        return s.cost["vision_tokens"]

    assert costs(5, [10.0, 200.0]) == pytest.approx(105.0)   # too few costs to ignore one
    assert costs(5, [10.0, 200.0, 10.0]) == pytest.approx(10.0)
    assert costs(1, [10.0, 200.0, 3.0]) == pytest.approx(3.0)  # window 1: the last cost alone


def test_memory_is_ema_or_median():
    with pytest.raises(ValueError, match="memory"):
        ModeScheduler(MODES, memory="mean")
    with pytest.raises(ValueError, match="window at least 1"):
        ModeScheduler(MODES, memory="median", window=0)


def _whys(s: ModeScheduler, stages: int) -> list[str]:
    cost = dict(vision_tokens=1.0, language_tokens=1.2, vision_params=0.8, language_params=1.1)
    return [why for _, why in _choices(s, cost, stages)]


def test_stride_exploration_explores_every_one_over_rho_choices_after_the_warm_up():
    whys = _whys(ModeScheduler(MODES, rho=0.25, seed=0, exploration="stride"), 4 + 40)
    assert whys[:4] == ["warm-up"] * 4
    assert [i for i, w in enumerate(whys[4:], 1) if w == "explore"] == list(range(4, 41, 4))
    assert "explore" not in _whys(ModeScheduler(MODES, rho=0.0, exploration="stride"), 30)


def test_seed_zero_draws_explore_late_which_stride_exploration_avoids():
    """Why 'stride' exists: with probability ρ = 0.2, the default seed's first exploration is
    the 26th choice after the warm-up; the shipped recipes ran their first 25 stages greedily."""
    whys = _whys(ModeScheduler(MODES, rho=0.2, seed=0), 4 + 30)[4:]
    assert whys.index("explore") == 25
    stride = _whys(ModeScheduler(MODES, rho=0.2, seed=0, exploration="stride"), 4 + 30)[4:]
    assert stride.index("explore") == 4 and stride.count("explore") == 6


def test_unknown_exploration_is_refused():
    with pytest.raises(ValueError, match="exploration is 'random' or 'stride'"):
        ModeScheduler(MODES, exploration="sometimes")


def test_round_robin_takes_modes_in_turn_whatever_they_cost():
    # the CIM-only ablation (comp.md §8); it used to be greedy without history, so it ran the
    # very stages `comp_greedy` did
    cost = dict(vision_tokens=3.0, language_tokens=0.5, vision_params=2.0, language_params=1.0)
    s = ModeScheduler(MODES, rho=0.9, seed=0, round_robin=True)
    choices = _choices(s, cost, 9)
    order = ["vision_tokens", "language_tokens", "vision_params", "language_params"]
    assert choices == [(m, "turn") for m in order + order + order[:1]]
    s.exhaust("language_tokens")      # chosen, could not remove a quantum: the turn passes on
    s.retire("language_params")
    assert [s.choose()[0] for _ in range(4)] == ["vision_params", "vision_tokens"] * 2


CHEAP_VISION_TOKENS = dict(vision_tokens=0.1, language_tokens=3.0, vision_params=1.0,
                           language_params=2.0)


def test_max_run_hands_the_stage_after_a_run_to_the_cheapest_other_mode():
    got = _choices(ModeScheduler(MODES, rho=0.0, max_run=3), CHEAP_VISION_TOKENS, 4 + 12)[4:]
    assert got == ([("vision_tokens", "exploit")] * 3 + [("vision_params", "capped")]) * 3
    uncapped = _run(ModeScheduler(MODES, rho=0.0), CHEAP_VISION_TOKENS, 4 + 12)[4:]
    assert uncapped == ["vision_tokens"] * 12


def test_max_run_also_keeps_exploration_off_the_capped_mode():
    traj = _run(ModeScheduler(MODES, rho=0.5, seed=1, max_run=1), CHEAP_VISION_TOKENS, 4 + 60)
    assert all(a != b for a, b in zip(traj[4:], traj[5:]))


def test_an_exhausted_choice_does_not_end_the_run_it_interrupted():
    s = ModeScheduler(MODES, rho=0.0, max_run=2)
    _run(s, CHEAP_VISION_TOKENS, 4 + 2)                      # warm-up, then two vision-token stages
    assert s.choose() == ("vision_params", "capped")
    s.exhaust("vision_params")                                # its plan was empty: no stage ran
    assert s.choose() == ("language_params", "capped")


def test_max_run_does_not_apply_to_the_last_mode_left():
    s = ModeScheduler(["vision_tokens", "vision_params"], rho=0.0, max_run=1)
    _run(s, CHEAP_VISION_TOKENS, 2 + 1)
    s.exhausted.add("vision_params")
    assert s.choose() == ("vision_tokens", "exploit")


def test_max_run_below_one_is_refused():
    with pytest.raises(ValueError, match="max_run is at least 1"):
        ModeScheduler(MODES, max_run=0)
