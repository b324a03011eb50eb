"""rescore.py's pairing of a method with its reference run (benchmarks/ is a script folder)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import rescore  # noqa: E402


def _runs():
    """CoMP at 0.8 and 0.76 and parameters only aimed at 0.8 but stopped at 0.760, two seeds."""
    rng = np.random.default_rng(0)
    achieved = {("comp", 0.8, 0): 0.800, ("comp", 0.8, 1): 0.801,
                ("comp", 0.76, 0): 0.762, ("comp", 0.76, 1): 0.758,
                ("upop", 0.8, 0): 0.760, ("upop", 0.8, 1): 0.760}
    scored = {k: (rng.random(400) < (0.6 if k[0] == "comp" else 0.4)).astype(float) for k in achieved}
    return scored, achieved


def test_a_run_is_paired_at_its_own_cut_before_its_own_target():
    scored, achieved = _runs()
    assert rescore.reference(("comp", 0.76, 0), scored, achieved, "upop", False) == ("upop", 0.8, 0)
    # at 0.8 the reference stopped short: only --across-cuts pairs them
    assert rescore.reference(("comp", 0.8, 1), scored, achieved, "upop", False) is None
    assert rescore.reference(("comp", 0.8, 1), scored, achieved, "upop", True) == ("upop", 0.8, 1)
    # no run of that seed: nothing to pair with
    assert rescore.reference(("comp", 0.76, 2), {**scored, ("comp", 0.76, 2): scored[("comp", 0.76, 0)]},
                             {**achieved, ("comp", 0.76, 2): 0.76}, "upop", True) is None


def test_a_reference_at_its_own_target_and_cut_comes_first():
    scored, achieved = _runs()
    scored[("upop", 0.76, 0)] = scored[("upop", 0.8, 0)][::-1].copy()
    achieved[("upop", 0.76, 0)] = 0.766     # further from comp's 0.762 than upop@0.8's 0.760
    assert rescore.reference(("comp", 0.76, 0), scored, achieved, "upop", False) == ("upop", 0.76, 0)


def test_a_reference_that_reached_the_cut_elsewhere_comes_before_one_that_stopped_short():
    scored, achieved = _runs()
    scored[("upop", 0.85, 1)] = scored[("upop", 0.8, 1)][::-1].copy()
    achieved[("upop", 0.85, 1)] = 0.800
    for across_cuts in (False, True):
        assert rescore.reference(("comp", 0.8, 1), scored, achieved, "upop", across_cuts) == ("upop", 0.85, 1)
    assert rescore.reference(("upop", 0.8, 1), scored, achieved, "upop", True) is None
    # the 0.01 bar holds at its edge despite float subtraction
    assert rescore.same_cut({"a": 0.77, "b": 0.76}, "a", "b")


def test_seed_means_average_each_examples_hits_over_the_paired_seeds():
    scored, achieved = _runs()
    out = rescore.seed_means(scored, achieved, "upop", across_cuts=False)
    lines = [line for line in out.splitlines() if line.startswith("| comp")]
    assert len(lines) == 1 and lines[0].startswith("| comp | 0.76 | 0, 1 |")
    a = (scored[("comp", 0.76, 0)] + scored[("comp", 0.76, 1)]) / 2
    b = (scored[("upop", 0.8, 0)] + scored[("upop", 0.8, 1)]) / 2
    cells = [c.strip() for c in lines[0].split("|")]
    assert cells[4] == f"{100 * a.mean():.2f}"
    assert cells[5].startswith(f"{100 * (a.mean() - b.mean()):+.2f} (")
    assert cells[6] == "0.760 (aimed at 0.8), 0.760 (aimed at 0.8)"
    both = rescore.seed_means(scored, achieved, "upop", across_cuts=True)
    assert "| comp | 0.8 | 0, 1 |" in both


def test_the_paired_bootstrap_interval_holds_the_difference():
    scored, _ = _runs()
    a, b = scored[("comp", 0.8, 0)], scored[("upop", 0.8, 0)]
    lo, hi = rescore.paired_bootstrap(a, b, n=2000)
    assert lo < 100 * (a.mean() - b.mean()) < hi
    assert rescore.paired_bootstrap(a, a, n=200) == (0.0, 0.0)


def test_every_generated_question_and_statement_has_a_kind():
    """The kind patterns follow the MiniVL templates: a template they miss would be 'other'."""
    from mmprune.data.minivl import language
    from mmprune.data.minivl.scenes import sample_scene

    class Split(dict):
        column_names = property(lambda self: list(self))

    rng = np.random.default_rng(0)
    questions = [language.question(sample_scene(rng), rng) for _ in range(600)]
    statements = [language.statement(sample_scene(rng), sample_scene(rng), rng)[0] for _ in range(300)]
    q_kinds = rescore.statement_kinds(Split(question=[q for q, _ in questions]))
    s_kinds = rescore.statement_kinds(Split(statement=statements))
    assert set(q_kinds) == {"count", "exists", "size", "where", "colour", "shape"}
    assert set(s_kinds) == {"count", "colour count", "both", "one image"}
    answers = {k: {a for (_, a), kind in zip(questions, q_kinds) if kind == k} for k in set(q_kinds)}
    assert answers["exists"] == {"yes", "no"} and answers["size"] <= {"small", "large"}
    assert answers["colour"] <= set(language.COLORS) and answers["shape"] <= set(language.SHAPES)
    assert answers["count"] <= set(language.NUMBERS)
    assert answers["where"] <= {p.replace(" ", "_") for p in language.POSITIONS}
    assert rescore.statement_kinds(Split(caption=["a red circle"])) is None
