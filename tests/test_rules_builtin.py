"""Each built-in rule on synthetic reports, at both sides of each threshold: it fires exactly when its
predicate holds, with the evidence that shows it, and its fixes are the commands that apply them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from deadneuron.report import Report
from deadneuron.rules import (
    BatchNormScale,
    Finding,
    RuleContext,
    RulesConfig,
    Severity,
    builtin_rules,
    evaluate,
)
from tests.test_rules_factory import make_report, make_site, make_slots, only

RULES = builtin_rules()


def run(report: Report, context: RuleContext | None = None, **thresholds: Mapping[str, float]) -> list[Finding]:
    findings = evaluate(report, context, rules=RULES, config=RulesConfig(thresholds))
    for f in findings:
        assert f.evidence, f"{f.rule} fired without evidence"
        assert all(e.holds() for e in f.evidence), f"{f.rule}: evidence that does not hold: {f.evidence}"
    return findings


def fired(report: Report, rule: str, context: RuleContext | None = None, **thresholds: Any) -> list[Finding]:
    return only(run(report, context, **thresholds), rule)


def metric(f: Finding, name: str, site: str | None = None) -> Any:
    matches = [e for e in f.evidence if e.metric == name and (site is None or e.site == site)]
    assert matches, f"no {name} evidence in {f.evidence}"
    return matches[0]


# -- dead-relu -------------------------------------------------------------------------------------------------


def test_dead_relu_fires_at_one_dead_channel_with_evidence_and_commands() -> None:
    report = make_report(make_site("bn.0>relu", dead=(3,)), meta={"source": "ck.pth"})
    (f,) = fired(report, "dead-relu")
    assert f.severity is Severity.WARNING
    assert f.channels == {"bn.0>relu": (3,)}
    e = metric(f, "dead_channels")
    assert (e.observed, e.threshold, e.comparison, e.site) == (1, 1, ">=", "bn.0>relu")
    assert "channels 3" in f.message and "1 of 8" in f.message
    assert f.commands == ("deadneuron patch ck.pth --activation leaky --negative-slope 0.01",
                          "deadneuron patch ck.pth --reinit-dead")
    ops = f.to_dict()["patch_ops"]
    assert ops[0] == [{"op": "swap_activation", "activation": "leaky_relu", "negative_slope": 0.01, "sites": ["bn.0>relu"]}]
    assert ops[1][0]["op"] == "reinit_dead" and ops[1][0]["channels"] == {"bn.0>relu": [3]}


def test_dead_relu_silent_without_dead_channels() -> None:
    assert not fired(make_report(make_site(dormant=(1, 2))), "dead-relu")


@pytest.mark.parametrize(("dead", "fires"), [((1,), False), ((1, 2), True)], ids=["1<2", "2>=2"])
def test_dead_relu_min_channels(dead: tuple[int, ...], fires: bool) -> None:
    report = make_report(make_site(dead=dead))
    assert bool(fired(report, "dead-relu", **{"dead-relu": {"min_channels": 2}})) is fires


@pytest.mark.parametrize(("dead", "fires"), [((1,), False), ((1, 2), True)], ids=["0.125<0.25", "0.25>=0.25"])
def test_dead_relu_min_fraction(dead: tuple[int, ...], fires: bool) -> None:
    report = make_report(make_site(channels=8, dead=dead))
    findings = fired(report, "dead-relu", **{"dead-relu": {"min_fraction": 0.25}})
    assert bool(findings) is fires
    if fires:
        assert metric(findings[0], "dead_fraction").observed == 0.25


def test_dead_relu_groups_the_sites_of_one_shared_module() -> None:
    report = make_report(
        make_site("enc.bn.0>relu", module="enc.relu", dead=(1,)),
        make_site("enc.bn.1>relu", module="enc.relu"),
        make_site("enc.bn.2>relu", module="enc.relu", dead=(2, 5)),
        make_site("head.act", module="head.act", dead=(0,)),
    )
    enc, head = fired(report, "dead-relu")
    assert enc.sites == ("enc.bn.0>relu", "enc.bn.2>relu")
    assert enc.channels == {"enc.bn.0>relu": (1,), "enc.bn.2>relu": (2, 5)}
    assert "3 of 16" in enc.message and "enc.relu" in enc.message
    assert head.sites == ("head.act",)


def test_dead_relu_ignores_leaky_and_smooth_sites() -> None:
    report = make_report(make_site("a", kind="leaky_relu", dead=(1,)), make_site("b", kind="gelu", dead=(1,)))
    assert not fired(report, "dead-relu")


def test_dead_relu_tells_dead_at_init_from_died_and_revived() -> None:
    timeline = (
        {"step": 0, "sites": {"s": {"dead": 2, "dead_channels": [1, 2]}}},
        {"step": 50, "sites": {"s": {"dead": 3, "dead_channels": [1, 3, 4]}}},
        {"step": 100, "sites": {"s": {"dead": 3, "dead_channels": [1, 3, 5]}}},
    )
    (f,) = fired(make_report(make_site("s", dead=(1, 3, 5))), "dead-relu", RuleContext(timeline=timeline))
    assert "1 dead at init, 2 died in training (first seen dead between steps 50 and 100), 2 revived" in f.message


# -- dormant-leaky ---------------------------------------------------------------------------------------------


def test_dormant_leaky_counts_dead_and_dormant_as_dormant() -> None:
    report = make_report(make_site("s", kind="leaky_relu", dead=(0,), dormant=(4,)), meta={"source": "c.pth"})
    (f,) = fired(report, "dormant-leaky", RuleContext(learning_rate=1e-4))
    assert f.channels == {"s": (0, 4)}
    assert metric(f, "dormant_channels").observed == 2
    assert "dormant, not dead" in f.message and "1 of them is negative on every element" in f.message
    assert f.commands == ("deadneuron patch c.pth --activation gelu", "deadneuron patch c.pth --reinit-dead",
                          "deadneuron patch c.pth --lr 5e-5")
    assert not fired(report, "dead-relu")


@pytest.mark.parametrize(("dormant", "fires"), [((), False), ((2,), True)], ids=["none", "one"])
def test_dormant_leaky_threshold(dormant: tuple[int, ...], fires: bool) -> None:
    report = make_report(make_site(kind="leaky_relu", dormant=dormant))
    assert bool(fired(report, "dormant-leaky")) is fires


def test_dormant_leaky_min_channels_both_sides() -> None:
    t = {"dormant-leaky": {"min_channels": 3}}
    assert not fired(make_report(make_site(kind="leaky_relu", dead=(0,), dormant=(1,))), "dormant-leaky", **t)
    assert fired(make_report(make_site(kind="leaky_relu", dead=(0,), dormant=(1, 2))), "dormant-leaky", **t)


def test_dormant_relu_channels_are_not_a_leaky_finding() -> None:
    assert not fired(make_report(make_site(kind="relu", dormant=(1,))), "dormant-leaky")


def test_dormant_leaky_without_known_lr_scales_it() -> None:
    (f,) = fired(make_report(make_site(kind="prelu", dormant=(1,))), "dormant-leaky")
    assert f.commands[-1] == "deadneuron patch --lr-scale 0.5"


# -- stuck-smooth ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dead", "fires"), [((), False), ((6,), True)], ids=["none", "one"])
def test_stuck_smooth(dead: tuple[int, ...], fires: bool) -> None:
    findings = fired(make_report(make_site("mlp.act", kind="gelu", dead=dead, dormant=(1,))), "stuck-smooth")
    assert bool(findings) is fires
    if fires:
        assert findings[0].channels == {"mlp.act": (6,)} and "z <= -2.28" in findings[0].message


# -- bn-scale-collapse -----------------------------------------------------------------------------------------


def _bn_context(gamma: Sequence[float], beta: Sequence[float], name: str = "enc.bn.0") -> RuleContext:
    return RuleContext(bn_scales={name: BatchNormScale(tuple(abs(g) for g in gamma), tuple(beta))})


@pytest.mark.parametrize(("gamma1", "fires"), [(0.0101, False), (0.01, True), (-0.005, True)],
                         ids=["above", "at", "negative-below"])
def test_bn_collapsed_gamma_both_sides(gamma1: float, fires: bool) -> None:
    ctx = _bn_context([1.0, gamma1, 1.0, 1.0], [0.0, -0.03, 0.0, 0.0])  # -0.03 / 0.0101 > -4: not shifted
    findings = fired(make_report(make_site("enc.bn.0>relu", channels=4)), "bn-scale-collapse", ctx)
    assert bool(findings) is fires
    if fires:
        (f,) = findings
        assert f.channels == {"enc.bn.0>relu": (1,)}
        assert metric(f, "bn_abs_gamma").observed == abs(gamma1)
        assert "dead whatever the data" in f.message


@pytest.mark.parametrize(("beta", "fires"), [(-3.9, False), (-4.0, True), (-50.0, True)], ids=["-3.9", "-4", "-50"])
def test_bn_shifted_beta_both_sides(beta: float, fires: bool) -> None:
    ctx = _bn_context([1.0, 1.0], [0.0, beta])
    findings = fired(make_report(make_site("enc.bn.0>relu", channels=2)), "bn-scale-collapse", ctx)
    assert bool(findings) is fires
    if fires:
        assert metric(findings[0], "bn_beta_over_abs_gamma").observed == beta


def test_bn_rule_maps_only_the_consumed_layer_with_matching_channels() -> None:
    ctx = _bn_context([0.0, 1.0], [0.0, 0.0], name="other.bn")
    assert not fired(make_report(make_site("enc.bn.0>relu", channels=2)), "bn-scale-collapse", ctx)
    ctx = _bn_context([0.0, 1.0, 1.0], [0.0, 0.0, 0.0])  # 3 gammas, 2 channels: not this site's layer
    assert not fired(make_report(make_site("enc.bn.0>relu", channels=2)), "bn-scale-collapse", ctx)


# -- nonfinite -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "fires"), [(4, False), (5, True)], ids=["4<5", "5>=5"])
def test_nonfinite_threshold(count: int, fires: bool) -> None:
    report = make_report(make_site("a"), make_site("b", nonfinite=count))
    findings = fired(report, "nonfinite", RuleContext(learning_rate=1e-3), nonfinite={"min_elements": 5})
    assert bool(findings) is fires
    if fires:
        (f,) = findings
        assert f.severity is Severity.ERROR and f.sites == ("b",)
        assert f.commands == ("deadneuron patch --lr 1e-4",) and "clip" in f.message


def test_nonfinite_is_the_most_severe_finding() -> None:
    report = make_report(make_site("a", dead=(1,)), make_site("b", nonfinite=3), make_site("c", sparsity=0.7))
    assert [f.severity for f in run(report)] == [Severity.ERROR, Severity.WARNING, Severity.INFO]
    assert not fired(make_report(make_site()), "nonfinite")


# -- sparse-healthy --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sparsity", "fires"), [(0.4999, False), (0.5, True), (0.62, True)], ids=["below", "at", "above"])
def test_sparse_healthy_threshold(sparsity: float, fires: bool) -> None:
    findings = fired(make_report(make_site("bn.0>relu", sparsity=sparsity)), "sparse-healthy")
    assert bool(findings) is fires
    if fires:
        (f,) = findings
        assert f.severity is Severity.INFO and not f.commands and "healthy" in f.message
        assert metric(f, "sparsity").observed == sparsity


@pytest.mark.parametrize("sick", [{"dead": (1,)}, {"dormant": (1,)}, {"kind": "gelu"}], ids=["dead", "dormant", "gelu"])
def test_sparse_healthy_needs_a_clean_relu_site(sick: dict[str, Any]) -> None:
    assert not fired(make_report(make_site(sparsity=0.6, **sick)), "sparse-healthy")


def test_sparse_healthy_says_batchnorm_when_it_sees_one() -> None:
    ctx = _bn_context([1.0] * 8, [0.0] * 8)
    (f,) = fired(make_report(make_site("enc.bn.0>relu", sparsity=0.6)), "sparse-healthy", ctx)
    assert "After BatchNorm" in f.message


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
        assert f.commands[0] == "deadneuron patch --lr-scale 0.5"
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
        assert f.commands[0] == "deadneuron patch ck.pth --lr 1.5e-3"
        assert "3e-3 -> 1.5e-3" in f.message


def test_lr_dying_halves_the_users_rate_exactly() -> None:
    report = make_report(make_site("s", dead=(1,)))
    (f,) = fired(report, "lr-dying", RuleContext(learning_rate=1e-4, optimizer="adam"), **{"lr-dying": {"adam_lr_max": 5e-5}})
    assert f.commands[0] == "deadneuron patch --lr 5e-5" and "1e-4 -> 5e-5" in f.message


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
        assert f.commands == ("deadneuron patch --epochs 20", "deadneuron patch --dropout-between-convs 0.1")
        assert "200 training samples" in f.message


def test_over_training_does_not_suggest_dropout_already_there() -> None:
    ctx = RuleContext(history=_history([0.5, 0.75, 0.5], [0.5, 0.5, 0.625]), dropout_between_convs=True)
    (f,) = fired(make_report(make_site()), "over-training", ctx, **OVER)
    assert f.commands == ("deadneuron patch --epochs 20",)


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
