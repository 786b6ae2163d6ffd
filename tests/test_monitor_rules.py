"""The timeline rules on hand-built timelines: the monitor's entries and a checkpoint-style timeline."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deadneuron
from deadneuron.report import Report
from deadneuron.rules import RuleContext, evaluate
from deadneuron.rules.model import RuleSet
from deadneuron.rules.timeline_rules import TIMELINE_RULES, monitor_context

RULES = RuleSet(TIMELINE_RULES)
EMPTY = Report.build([])


def _entry(step: int, **sites: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "first_step": step - 10, "sites": sites}


def _findings(entries: list[dict[str, Any]]) -> dict[str, Any]:
    context = monitor_context(entries, learning_rate=1e-2, optimizer="adam", steps=entries[-1]["step"])
    return {f.rule: f for f in evaluate(EMPTY, context, rules=RULES)}


def test_dying_since_the_first_step_that_saw_each_channel_dead() -> None:
    entries = [
        _entry(10, a={"channels": 8, "dead_channels": [7]}),
        _entry(20, a={"channels": 8, "dead_channels": [1, 7]}),
        _entry(30, a={"channels": 8, "dead_channels": [1, 2, 3]}),
    ]
    found = _findings(entries)
    assert dict(found["channels-dying"].channels) == {"a": (1, 2, 3)}
    assert "dying since step 20" in found["channels-dying"].message
    assert dict(found["channels-revived"].channels) == {"a": (7,)}
    assert "dead-from-start" not in found  # channel 7 revived: not dead at the last entry


def test_dead_from_start_and_no_dying_when_nothing_changes() -> None:
    entries = [_entry(s, a={"channels": 4, "dead_channels": [0]}) for s in (10, 20)]
    found = _findings(entries)
    assert set(found) == {"dead-from-start"}
    assert "step 10" in found["dead-from-start"].message


@pytest.mark.parametrize(("first", "last", "fires"), [(0.1, 5.0, True), (0.1, 0.5, False), (2.0, 10.0, False)])
def test_activation_growth(first: float, last: float, fires: bool) -> None:
    entries = [_entry(10, a={"abs_mean": first, "abs_max": 1.0}), _entry(20, a={"abs_mean": last, "abs_max": 80.0})]
    assert ("activation-growth" in _findings(entries)) is fires


def test_not_learning_leaves_out_dead_channels_and_sites_without_gradient() -> None:
    entries = [
        _entry(10, a={"channels": 10, "grad_elements": 5, "not_learning_channels": [1, 2], "dead_channels": [2]},
               b={"channels": 10, "grad_elements": 0, "not_learning_channels": [4]}),
    ]  # fmt: skip
    assert dict(_findings(entries)["not-learning"].channels) == {"a": (1,)}


def test_rules_read_a_checkpoint_style_timeline_with_the_report_s_channel_counts() -> None:
    """The ARC trainer's entries have no channel count: the report's is used."""
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU())
    report = deadneuron.audit(model, [torch.randn(4, 3)], progress=False)
    site = next(iter(report.sites))
    timeline = ({"epoch": 0, "step": 0, "sites": {site: {"dead": 0, "dead_channels": []}}},
                {"epoch": 5, "step": 50, "sites": {site: {"dead": 2, "dead_channels": [0, 4]}}})  # fmt: skip
    found = {f.rule: f for f in evaluate(report, RuleContext(timeline=timeline), rules=RULES)}
    assert dict(found["channels-dying"].channels) == {site: (0, 4)}
    assert "since step 50" in found["channels-dying"].message


def test_a_monitor_that_measures_nothing_warns_once() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.warns(RuntimeWarning, match="measured no activation site"), \
            deadneuron.Monitor(model, every=1, select=["nothing*"]) as mon:
        for _ in range(3):
            model(torch.randn(2, 3))
            mon.step()
    assert mon.snapshots == [] and len(mon.warnings) == 1
