"""The rule that picks the default algorithm (bench/loop_table.py --decide), on gains written here."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("loop_table", Path(__file__).parents[2] / "bench" / "loop_table.py")
loop_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop_table)


def test_a_contender_replaces_the_incumbent_only_when_clearly_better_and_never_clearly_worse():
    gains = {("cheerful", "ppo"): [0.05, 0.07, 0.09], ("cheerful", "rloo"): [0.30, 0.34, 0.28]}
    assert "Verdict: **rloo**" in loop_table.decide(gains)
    assert "Verdict: **rloo stays**" in loop_table.decide(gains, incumbent="rloo")
    # ahead in every seed, but the spread leaves the difference under twice its standard error
    wide = {("cheerful", "ppo"): [0.05, 0.07, 0.09], ("cheerful", "rloo"): [0.46, 0.25, 0.07]}
    assert "Verdict: **ppo stays**" in loop_table.decide(wide)
    # clearly better on one taste, clearly worse on the other: not the default
    split = {**gains, ("short", "ppo"): [0.40, 0.42, 0.44], ("short", "rloo"): [0.10, 0.12, 0.14]}
    assert "Verdict: **ppo stays**" in loop_table.decide(split)


def test_a_screen_run_is_shown_but_not_weighed():
    gains = {("cheerful", "ppo"): [0.05, 0.07, 0.09], ("cheerful", "rloo"): [0.30, 0.34, 0.28],
             ("cheerful", "grpo"): [0.90]}
    out = loop_table.decide(gains, incumbent="rloo")
    assert "| cheerful | grpo | 1 | +0.90 |" in out
    assert "- grpo: outside the rule, with 1 on cheerful (it needs 3 on every taste)" in out
    assert "Verdict: **rloo stays**" in out
    assert "No verdict: rloo lacks 3 seeds" in loop_table.decide({("cheerful", "rloo"): [0.3, 0.34]}, incumbent="rloo")
