"""Patch plans: flags and findings give the same frozen ops; the JSON is the rule engine's; merging rules."""

from __future__ import annotations

import pytest
import torch

from deadneuron.activations import spec_for_module
from deadneuron.errors import UsageError
from deadneuron.ops import Op
from deadneuron.patch import (
    InsertDropout,
    Plan,
    ReinitDead,
    SetHyperParameter,
    SwapActivation,
    op_from_dict,
    plan_from_findings,
    plan_from_flags,
)
from deadneuron.patch.config import apply_to_config
from deadneuron.replacements import REPLACEMENTS, SWAP_NAMES, kind_of, replacement
from deadneuron.rules import Finding, Fix, Severity

SITES = ("encoder.bn_layers.0>relu", "encoder.bn_layers.3>relu")


def finding(rule: str, *fixes: tuple[Op, ...]) -> Finding:
    return Finding(rule=rule, severity=Severity.WARNING, title=rule, message="m", fixes=tuple(Fix(f) for f in fixes))


def test_flags_build_one_op_each() -> None:
    plan = plan_from_flags(activation="leaky", negative_slope=0.02, lr=5e-5, dropout_between_convs=0.1, epochs=1000,
                           reinit_dead=True)  # fmt: skip
    assert plan.get(SwapActivation) == SwapActivation("leaky", 0.02)
    assert plan.hyper_parameter("learning_rate") == SetHyperParameter("learning_rate", value=5e-5)
    assert plan.hyper_parameter("epochs") == SetHyperParameter("epochs", value=1000)
    assert plan.get(InsertDropout) == InsertDropout(0.1)
    assert plan.get(ReinitDead) == ReinitDead()
    assert plan.describe()[0] == "swap activation -> leaky(negative_slope=0.02) at every relu site  [flag]"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 1e-4, "lr_scale": 0.5}, "either --lr or --lr-scale"),
        ({"activation": "tanh"}, "not one of"),
        ({"negative_slope": 0.1}, "--activation leaky only"),
        ({"activation": "gelu", "negative_slope": 0.1}, "--activation leaky only"),
        ({"activation": "leaky", "negative_slope": 1.5}, "[0, 1)"),
        ({"dropout_between_convs": 1.0}, "(0, 1)"),
        ({"lr": -1.0}, "> 0"),
        ({"epochs": 0}, ">= 1"),
        ({"sites": ("a",)}, "--select chooses the sites of --activation, --reinit-dead or --add-batchnorm: add one"),
    ],
    ids=["lr-and-scale", "unknown-activation", "slope-alone", "slope-with-gelu", "slope-range", "dropout-1",
         "negative-lr", "zero-epochs", "select-alone"],  # fmt: skip
)
def test_bad_flags_are_usage_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        plan_from_flags(**kwargs)


def test_rule_engine_ops_read_back_as_the_same_plan_as_their_flags() -> None:
    ops = (
        SwapActivation("leaky", negative_slope=0.01, sites=SITES),
        SetHyperParameter("learning_rate", value=5e-5),
        SetHyperParameter("epochs", value=1000),
        InsertDropout(0.1),
    )
    from_finding = plan_from_findings([finding("r", ops)])
    from_flags = plan_from_flags(activation="leaky", negative_slope=0.01, sites=SITES, lr=5e-5, epochs=1000,
                                 dropout_between_convs=0.1)  # fmt: skip
    assert set(from_finding.ops) == set(from_flags.ops)
    assert [op.to_dict() for op in from_finding.ops] == [op.to_dict() for op in ops]


def test_findings_as_dicts_or_objects_give_the_same_plan() -> None:
    f = finding("dead-relu", (SwapActivation("gelu", sites=SITES),), (ReinitDead.of({"s": [1]}),))
    assert plan_from_findings([f]) == plan_from_findings([f.to_dict()])
    assert plan_from_findings([f]).ops == (SwapActivation("gelu", sites=SITES),)  # the preferred fix only


def test_findings_merge_swaps_and_channels_and_note_conflicts() -> None:
    findings = [
        finding("a", (SwapActivation("leaky", negative_slope=0.01, sites=SITES[:1]),
                      SetHyperParameter("learning_rate", scale=0.5))),
        finding("b", (SwapActivation("leaky", negative_slope=0.01, sites=SITES[1:]),)),
        finding("c", (SwapActivation("gelu"), SetHyperParameter("learning_rate", value=1e-5))),
        finding("d", (ReinitDead.of({"x": [1, 2]}),)),
        finding("e", (ReinitDead.of({"x": [2, 3], "y": [0]}),)),
        finding("f"),  # no fix: nothing planned
    ]  # fmt: skip
    plan = plan_from_findings(findings)
    assert plan.get(SwapActivation).sites == SITES
    assert plan.get(SwapActivation).reason == "rule a, rule b"
    assert plan.hyper_parameter("learning_rate") == SetHyperParameter("learning_rate", scale=0.5)
    assert plan.get(ReinitDead).channels == (("x", (1, 2, 3)), ("y", (0,)))
    assert len(plan.notes) == 2 and all("dropped" in n for n in plan.notes)


def test_flags_override_suggestions_of_the_same_kind() -> None:
    suggested = plan_from_findings([finding("a", (SwapActivation("gelu"), SetHyperParameter("epochs", value=10)))])
    plan = suggested.overridden_by(plan_from_flags(activation="leaky"))
    assert plan.get(SwapActivation).to == "leaky"
    assert plan.hyper_parameter("epochs").value == 10


def test_plan_round_trips_through_json_and_rejects_duplicates() -> None:
    plan = plan_from_flags(activation="prelu", lr_scale=0.5, dropout_between_convs=0.2, reinit_dead=True)
    assert Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match="at most one"):
        Plan((SwapActivation("gelu"), SwapActivation("elu")))


@pytest.mark.parametrize(
    "raw",
    [{"op": "explode"}, {"op": "swap_activation"}, {"op": "set_hparam", "name": "momentum", "value": 1},
     {"op": "set_hparam", "name": "learning_rate", "value": 1e-3, "scale": 2}],
    ids=["unknown-op", "missing-activation", "unknown-hparam", "value-and-scale"],
)
def test_malformed_ops_are_usage_errors(raw: dict) -> None:
    with pytest.raises(UsageError):
        op_from_dict(raw)


def test_config_changes_use_the_users_names() -> None:
    config = {"ACTIVATION": "relu", "NEGATIVE_SLOPE": 0.01, "LEARNING_RATE": 1e-4, "NUM_EPOCHS": 100000,
              "DROPOUT": 0.1, "DROPOUT_BETWEEN_CONVS": False, "SEED": 0}  # fmt: skip
    plan = plan_from_flags(activation="leaky", negative_slope=0.02, lr_scale=0.5, epochs=1000, dropout_between_convs=0.2)
    new, record = apply_to_config(config, plan)
    assert new == {**config, "ACTIVATION": "leaky", "NEGATIVE_SLOPE": 0.02, "LEARNING_RATE": 5e-5, "NUM_EPOCHS": 1000,
                   "DROPOUT": 0.2, "DROPOUT_BETWEEN_CONVS": True}  # fmt: skip
    assert config["ACTIVATION"] == "relu"  # not modified
    assert "LEARNING_RATE: 1e-4 -> 5e-5 (x 0.5)" in record.lines()
    assert not record.not_patched


def test_config_without_a_key_reports_it_and_reinit_from_scratch_is_a_note() -> None:
    new, record = apply_to_config({"lr": 0.1}, plan_from_flags(activation="gelu", lr=0.01, reinit_dead=True))
    assert new == {"lr": 0.01}
    assert record.not_patched == ("swap activation -> gelu at every relu site: the config has no ACTIVATION/activation key",)
    assert any("--init scratch" in n for n in record.notes)


@pytest.mark.parametrize("name", SWAP_NAMES)
def test_every_replacement_is_measured_as_the_kind_it_claims(name: str) -> None:
    """The registry's kind, module and function agree with what the probe recognises and computes."""
    target = REPLACEMENTS[name]
    module = target.module(negative_slope=0.2)
    spec = spec_for_module(module)
    assert spec is not None and spec.kind is target.kind
    assert kind_of(name) == target.kind.value
    if target.function is not None:
        fn, kwargs = target.call(negative_slope=0.2)
        z = torch.linspace(-4, 4, 101)
        assert torch.equal(fn(z, **kwargs), module(z))


def test_replacement_names_and_aliases() -> None:
    assert [replacement(t).name for t in ("LeakyReLU", "leaky_relu", "leaky", " GELU ", "swish", "silu")] == [
        "leaky", "leaky", "leaky", "gelu", "silu", "silu"]  # fmt: skip
    with pytest.raises(UsageError, match="not one of relu, leaky, gelu, elu, silu, prelu"):
        replacement("tanh")
