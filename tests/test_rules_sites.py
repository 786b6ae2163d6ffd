"""The built-in site rules on synthetic reports, at both sides of each threshold: each fires exactly when its
predicate holds, with the evidence that shows it, and its fixes are the commands that apply them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from deadneuron.rules import BatchNormScale, RuleContext, Severity
from tests.suggested import all_without_out, without_out
from tests.test_rules_factory import fired, make_report, make_site, metric, run

# -- dead-relu -------------------------------------------------------------------------------------------------


def test_dead_relu_fires_at_one_dead_channel_with_evidence_and_commands() -> None:
    report = make_report(make_site("bn.0>relu", dead=(3,)), meta={"source": "ck.pth"})
    (f,) = fired(report, "dead-relu")
    assert f.severity is Severity.WARNING
    assert f.channels == {"bn.0>relu": (3,)}
    e = metric(f, "dead_channels")
    assert (e.observed, e.threshold, e.comparison, e.site) == (1, 1, ">=", "bn.0>relu")
    assert "channels 3" in f.message and "1 of 8" in f.message
    assert all_without_out(f.commands) == ("deadneuron patch ck.pth --activation leaky --negative-slope 0.01 --select 'bn.0>relu'",
                          "deadneuron patch ck.pth --reinit-dead --select 'bn.0>relu'")
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


@pytest.mark.parametrize(("channels", "fires"), [(21, False), (20, True)], ids=["1/21<5%", "1/20=5%"])
def test_dead_relu_default_fraction_keeps_a_stray_channel_in_the_table_only(channels: int, fires: bool) -> None:
    assert bool(fired(make_report(make_site(channels=channels, dead=(0,))), "dead-relu")) is fires


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
    assert metric(f, "dead_or_dormant_channels").observed == 2
    assert "dormant, not dead" in f.message and "1 of them is negative on every element" in f.message
    assert all_without_out(f.commands) == ("deadneuron patch c.pth --activation gelu --select module:s",
                          "deadneuron patch c.pth --reinit-dead --select module:s",
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
    assert without_out(f.commands[-1]) == "deadneuron patch ck.pth --lr-scale 0.5"


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
        assert all_without_out(f.commands) == ("deadneuron patch ck.pth --lr 1e-4",) and "clip" in f.message


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
