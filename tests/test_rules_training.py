"""The built-in rules on training metadata, task metrics, slots and audit caveats, at both sides of each
threshold (synthetic reports and contexts)."""

from __future__ import annotations

from typing import Any

import pytest

from deadneuron.rules import RuleContext
from tests.suggested import all_without_out, without_out
from tests.test_rules_factory import fired, make_report, make_site, make_slots, metric

# -- lr-dying --------------------------------------------------------------------------------------------------


def _timeline(first: list[int], last: list[int], site: str = "s") -> tuple[dict[str, Any], ...]:
    return ({"step": 0, "sites": {site: {"dead": len(first), "dead_channels": first}}},
            {"step": 600, "sites": {site: {"dead": len(last), "dead_channels": last}}})


@pytest.mark.parametrize(("last", "fires"), [([0], False), ([0, 1], True)], ids=["flat", "grew"])
def test_lr_dying_on_timeline_growth(last: list[int], fires: bool) -> None:
    ctx = RuleContext(timeline=_timeline([0], last))
    findings = fired(make_report(make_site("s", dead=tuple(last))), "lr-dying", ctx)
    assert bool(findings) is fires
    if fires:
        (f,) = findings
        assert metric(f, "dead_growth_fraction").observed == 1 / 8
        assert without_out(f.commands[0]) == "deadneuron patch ck.pth --lr-scale 0.5"
        assert "--activation leaky" in f.commands[1]


@pytest.mark.parametrize(("min_growth", "fires"), [(0.125, True), (0.126, False)], ids=["at", "above"])
def test_lr_dying_growth_threshold(min_growth: float, fires: bool) -> None:
    ctx = RuleContext(timeline=_timeline([], [3]))
    report = make_report(make_site("s", dead=(3,)))
    assert bool(fired(report, "lr-dying", ctx, **{"lr-dying": {"min_growth": min_growth}})) is fires


@pytest.mark.parametrize(("lr", "optimizer", "dead", "fires"), [
    pytest.param(1e-3, "adam", (1,), False, id="adam-at-threshold"),
    pytest.param(3e-3, "adam", (1,), True, id="adam-above"),
    pytest.param(3e-3, "adamw", (1,), True, id="adamw-above"),
    pytest.param(3e-3, "adam", (), False, id="high-lr-but-nothing-died"),
    pytest.param(3e-3, "sgd", (1,), False, id="sgd"),
    pytest.param(1e-4, "adam", (1,), False, id="the-users-lr"),
])
def test_lr_dying_on_a_high_adam_rate(lr: float, optimizer: str, dead: tuple[int, ...], fires: bool) -> None:
    report = make_report(make_site("s", dead=dead), meta={"source": "ck.pth"})
    findings = fired(report, "lr-dying", RuleContext(learning_rate=lr, optimizer=optimizer))
    assert bool(findings) is fires
    if fires:
        (f,) = findings
        e = metric(f, "learning_rate")
        assert (e.observed, e.threshold, e.comparison) == (lr, 1e-3, ">")
        assert without_out(f.commands[0]) == "deadneuron patch ck.pth --lr 1.5e-3"
        assert "3e-3 -> 1.5e-3" in f.message


def test_lr_dying_halves_the_users_rate_exactly() -> None:
    report = make_report(make_site("s", dead=(1,)))
    (f,) = fired(report, "lr-dying", RuleContext(learning_rate=1e-4, optimizer="adam"), **{"lr-dying": {"adam_lr_max": 5e-5}})
    assert without_out(f.commands[0]) == "deadneuron patch ck.pth --lr 5e-5" and "1e-4 -> 5e-5" in f.message


# -- over-training ---------------------------------------------------------------------------------------------


def _history(heldout: list[float], train: list[float]) -> tuple[dict[str, Any], ...]:
    records: list[dict[str, Any]] = []
    for i, (h, t) in enumerate(zip(heldout, train, strict=True)):
        records.append({"epoch": 10 * i + 5, "train_accuracy": t - 0.1, "heldout_accuracy": None})
        records.append({"epoch": 10 * i + 10, "train_accuracy": t, "heldout_accuracy": h})
    return tuple(records)


OVER = {"over-training": {"heldout_drop": 0.25, "train_rise": 0.125}}


@pytest.mark.parametrize(("heldout", "train", "fires"), [
    pytest.param([0.5, 0.75, 0.5], [0.5, 0.5, 0.625], True, id="drop-and-rise-at-thresholds"),
    pytest.param([0.5, 0.75, 0.5625], [0.5, 0.5, 0.625], False, id="drop-below"),
    pytest.param([0.5, 0.75, 0.5], [0.5, 0.5, 0.5], False, id="train-flat"),
    pytest.param([0.5, 0.625, 0.75], [0.5, 0.625, 0.75], False, id="both-rising"),
    pytest.param([0.75, 0.5], [0.5, 0.75], False, id="too-few-points"),
])
def test_over_training(heldout: list[float], train: list[float], fires: bool) -> None:
    ctx = RuleContext(history=_history(heldout, train), data_size=200)
    findings = fired(make_report(make_site()), "over-training", ctx, **OVER)
    assert bool(findings) is fires
    if fires:
        (f,) = findings
        assert metric(f, "heldout_accuracy_drop").observed == 0.25
        assert metric(f, "train_accuracy_rise").observed == 0.125
        assert all_without_out(f.commands) == ("deadneuron patch ck.pth --epochs 20", "deadneuron patch ck.pth --dropout-between-convs 0.1")
        assert "200 training samples" in f.message


def test_over_training_does_not_suggest_dropout_already_there() -> None:
    ctx = RuleContext(history=_history([0.5, 0.75, 0.5], [0.5, 0.5, 0.625]), dropout_between_convs=True)
    (f,) = fired(make_report(make_site()), "over-training", ctx, **OVER)
    assert all_without_out(f.commands) == ("deadneuron patch ck.pth --epochs 20",)


# -- below-baseline --------------------------------------------------------------------------------------------


def _metrics(acc: float, base: float) -> dict[str, float]:
    return {"valid_pixel_accuracy": acc, "baseline_valid_pixel_accuracy": base,
            "exact_grid_accuracy": 0.0, "baseline_exact_grid_accuracy": 0.0625}


@pytest.mark.parametrize(("acc", "margin", "fires"), [
    pytest.param(0.5, 0.0, True, id="equal-is-not-above"),
    pytest.param(0.5000001, 0.0, False, id="just-above"),
    pytest.param(0.75, 0.25, True, id="within-margin"),
    pytest.param(0.7500001, 0.25, False, id="beyond-margin"),
])
def test_below_baseline(acc: float, margin: float, fires: bool) -> None:
    report = make_report(make_site(), metrics=_metrics(acc, 0.5))
    findings = fired(report, "below-baseline", **{"below-baseline": {"margin": margin}})
    assert bool(findings) is fires
    if fires:
        (f,) = findings
        e = metric(f, "valid_pixel_accuracy")
        assert (e.observed, e.threshold, e.comparison) == (acc, 0.5 + margin, "<=")
        assert "may not be the bottleneck" in f.message and not f.commands
        assert metric(f, "exact_grid_accuracy").observed == 0.0


def test_below_baseline_needs_a_baseline() -> None:
    assert not fired(make_report(make_site(), metrics={"valid_pixel_accuracy": 0.1}), "below-baseline")


# -- slots -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("share", "fires"), [(0.7999, False), (0.8, True)], ids=["below", "at"])
def test_slot_collapse(share: float, fires: bool) -> None:
    findings = fired(make_report(make_site(), slots=make_slots(largest_share=share)), "slot-collapse")
    assert bool(findings) is fires
    if fires:
        assert metric(findings[0], "largest_slot_share").observed == share


def test_slot_rules_need_slots() -> None:
    assert not fired(make_report(make_site()), "slot-collapse")
    assert not fired(make_report(make_site(), slots=make_slots(num_slots=1, largest_share=1.0)), "slot-collapse")


@pytest.mark.parametrize(("entropy", "unowned", "metrics"), [
    pytest.param(0.8999, 49, (), id="neither"),
    pytest.param(0.9, 49, ("mask_entropy",), id="entropy-at"),
    pytest.param(0.5, 50, ("images_without_confident_slot",), id="unowned-at"),
    pytest.param(0.95, 80, ("mask_entropy", "images_without_confident_slot"), id="both"),
])
def test_slots_diffuse(entropy: float, unowned: int, metrics: tuple[str, ...]) -> None:
    report = make_report(make_site(), slots=make_slots(entropy=entropy, unowned=unowned))
    findings = fired(report, "slots-diffuse")
    assert tuple(e.metric for f in findings for e in f.evidence) == metrics


# -- audit-caveats ---------------------------------------------------------------------------------------------


def test_audit_caveats_on_untracked_batchnorm_and_random_inputs() -> None:
    warning = "BatchNorm 'bn' has never been updated (num_batches_tracked == 0): ..."
    report = make_report(make_site(), meta={"warnings": [warning], "random_inputs": True})
    (f,) = fired(report, "audit-caveats")
    assert metric(f, "report_warnings").observed == 2
    assert "train mode" in f.message and "--data" in f.message
    assert not fired(make_report(make_site()), "audit-caveats")
