"""report.md: what the fine-tuning selection says it did."""
from mmprune.report import _comp_section


def _finetune(within: list[bool]) -> dict:
    return {"finetune": [{"steps": 2, "selected_step": 1, "history": [
        {"step": i + 1, "quality": 50.0 - i, "within_target": ok} for i, ok in enumerate(within)]}]}


def test_the_selection_rule_named_is_the_one_that_applied():
    assert "(best validation within the FLOPs target)" in "\n".join(_comp_section(_finetune([True, False])))
    text = "\n".join(_comp_section(_finetune([False, False])))
    assert "no step within the FLOPs target: best validation among the fewest FLOPs" in text
