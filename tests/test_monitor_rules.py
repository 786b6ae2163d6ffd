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
    assert "dying since step 10" in found["channels-dying"].message  # the entry of step 20 covers steps 10-19
    assert "alive over steps 0-9, dead over steps 20-29" in found["channels-dying"].message
    assert dict(found["channels-revived"].channels) == {"a": (7,)}
    assert "dead-from-start" not in found  # channel 7 revived: not dead at the last entry


def test_dead_from_start_and_no_dying_when_nothing_changes() -> None:
    entries = [_entry(s, a={"channels": 4, "dead_channels": [0]}) for s in (10, 20)]
    found = _findings(entries)
    assert set(found) == {"dead-from-start"}
    assert "(over steps 0-9) and still are over steps 10-19" in found["dead-from-start"].message


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


def _planted_death_run(every: int, die_at: int, steps: int) -> deadneuron.Monitor:
    """A BatchNorm + ReLU MLP whose channels 2 and 5 are killed (BatchNorm bias -100) before step ``die_at``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with deadneuron.Monitor(model, every=every, optimizer=opt) as mon:
        for step in range(steps):
            if step == die_at:
                with torch.no_grad():
                    model[1].bias[[2, 5]] = -100.0
            x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            mon.step()
    return mon


def test_the_steps_quoted_are_those_of_the_windows_that_saw_the_channels() -> None:
    """Each snapshot is labelled by its end (``step``: steps done) and covers steps first_step..step-1. Channels
    killed before step 10 are dead over the window of steps 10-14 (the snapshot labelled 15): they have been
    dying since step 10, not 15; the timeline covers steps 0-19, its first window steps 0-4, its last 15-19."""
    mon = _planted_death_run(every=5, die_at=10, steps=20)
    assert [(s.first_step, s.step) for s in mon.snapshots] == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert [s.sites["2"].dead_channels for s in mon.snapshots] == [(), (), (2, 5), (2, 5)]
    found = {f.rule: f for f in mon.findings()}
    dying = found["channels-dying"].message
    assert "dying since step 10:" in dying
    assert "alive over steps 0-4, dead over steps 15-19" in dying
    assert "first seen dead over steps 10-14" in dying
    history = found["dead-relu"].message
    assert "Over the health timeline (steps 0-19, on the training batches)" in history
    assert "first seen dead over steps 10-14" in history
