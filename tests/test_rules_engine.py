"""The engine: ordering, JSON, errors naming the rule, third-party rules by entry point, patch ops, and
the context read from a checkpoint and a model."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deadneuron
from deadneuron.ops import InsertDropout, Op, ReinitDead, SetHyperParameter, SwapActivation, op_from_dict
from deadneuron.report import Report
from deadneuron.rules import (
    Evidence,
    Fix,
    Hit,
    Rule,
    RuleContext,
    RuleError,
    RulesConfig,
    Severity,
    Threshold,
    attach_findings,
    builtin_rules,
    context_from,
    evaluate,
    load_rules,
)
from tests.suggested import all_without_out, without_out
from tests.test_rules_factory import make_report, make_site

FINDING_KEYS = {"rule", "severity", "title", "message", "sites", "channels", "evidence", "commands", "patch_ops",
                "withheld"}


def test_severity_order() -> None:
    assert Severity.ERROR > Severity.WARNING > Severity.INFO
    assert sorted([Severity.WARNING, Severity.ERROR, Severity.INFO]) == [Severity.INFO, Severity.WARNING, Severity.ERROR]
    with pytest.raises(TypeError):
        _ = Severity.ERROR < "warning"  # type: ignore[operator]


def test_findings_sorted_most_severe_first_ties_in_rule_order() -> None:
    report = make_report(make_site("a", sparsity=0.7), make_site("b", nonfinite=2), make_site("c", kind="leaky_relu", dormant=(1,)),
                         make_site("d", dead=(0,)), metrics={"valid_pixel_accuracy": 0.5, "baseline_valid_pixel_accuracy": 0.6})
    findings = evaluate(report, rules=builtin_rules())
    assert [f.rule for f in findings] == ["nonfinite", "dead-relu", "dormant-leaky", "below-baseline", "sparse-healthy"]


def test_to_dict_is_plain_json_and_round_trips_through_the_report() -> None:
    report = make_report(make_site("enc.bn.0>relu", dead=(1, 4)), meta={"source": "ck.pth"})
    findings = evaluate(report, RuleContext(learning_rate=3e-3, optimizer="adam"), rules=builtin_rules())
    dicts = [f.to_dict() for f in findings]
    for d in dicts:
        assert set(d) == FINDING_KEYS
        assert len(d["patch_ops"]) == len(d["commands"])
        for e in d["evidence"]:
            assert set(e) == {"metric", "site", "observed", "threshold", "comparison"}
    assert json.loads(json.dumps(dicts)) == dicts
    with_findings = report.with_findings(dicts)
    again = Report.from_json(with_findings.to_json())
    assert [dict(f) for f in again.findings] == dicts


def test_disabled_and_switched_off() -> None:
    report = make_report(make_site(dead=(1,)))
    assert not [f for f in evaluate(report, config=RulesConfig(disabled=frozenset({"dead-relu"}))) if f.rule == "dead-relu"]
    assert evaluate(report, config=RulesConfig(enabled=False)) == []


def _rule(rule_id: str = "custom", **kw: Any) -> Rule:
    def predicate(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
        n = len(report.sites)
        if n < t["min_sites"]:
            return []
        return [Hit((Evidence("sites", n, t["min_sites"], ">="),), {"n": n}, tuple(report.sites))]

    fields: dict[str, Any] = {
        "id": rule_id, "title": "Too many sites", "severity": Severity.INFO, "reads": ("report.sites",),
        "thresholds": (Threshold("min_sites", 1, "sites", integer=True),), "predicate": predicate,
        "message": "{n} sites.", "fixes": lambda hit, ctx, t: [Fix((ReinitDead.of({"a": (1,)}),))],
    }  # fmt: skip
    return Rule(**{**fields, **kw})


def test_a_custom_rule_renders_from_its_evidence() -> None:
    (f,) = evaluate(make_report(make_site("a"), make_site("b")), rules=builtin_rules().plus([_rule()]).without(builtin_rules().ids))
    assert (f.rule, f.message, f.sites, all_without_out(f.commands)) == ("custom", "2 sites.", ("a", "b"), ("deadneuron patch ck.pth --reinit-dead --select module:a",))


def test_a_rule_that_raises_is_named() -> None:
    def boom(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
        raise ZeroDivisionError("oops")

    with pytest.raises(RuleError, match="rule 'custom' raised ZeroDivisionError: oops"):
        evaluate(make_report(make_site()), rules=builtin_rules().plus([_rule(predicate=boom)]))
    with pytest.raises(RuleError, match="rule 'custom': cannot render"):
        evaluate(make_report(make_site()), rules=builtin_rules().plus([_rule(message="{missing}")]))


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(RuleError, match="dead-relu"):
        builtin_rules().plus([_rule("dead-relu")])


# -- entry points ------------------------------------------------------------------------------------------------


class FakeEntryPoint:
    def __init__(self, name: str, obj: Any) -> None:
        self.name, self.value, self._obj = name, f"fake_pkg:{name}", obj

    def load(self) -> Any:
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> list[FakeEntryPoint]:
    installed: list[FakeEntryPoint] = []
    original = importlib.metadata.entry_points

    def fake(**kwargs: Any) -> Any:
        if kwargs.get("group") == "deadneuron.rules":
            return list(installed)
        return original(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    return installed


@pytest.mark.parametrize("shape", ["rule", "list", "factory"])
def test_entry_point_rules_are_loaded_and_evaluated(plugins: list[FakeEntryPoint], shape: str) -> None:
    rules = [_rule("plugin-a"), _rule("plugin-b")]
    obj = {"rule": rules[0], "list": rules, "factory": lambda: rules}[shape]
    plugins.append(FakeEntryPoint("mine", obj))
    loaded = load_rules()
    assert loaded.ids[: len(builtin_rules())] == builtin_rules().ids
    expected = ["plugin-a"] if shape == "rule" else ["plugin-a", "plugin-b"]
    assert list(loaded.ids[len(builtin_rules()):]) == expected
    found = {f.rule for f in evaluate(make_report(make_site()))}  # rules=None: built-in + installed
    assert set(expected) <= found


@pytest.mark.parametrize(("obj", "match"), [
    pytest.param(ImportError("no module fake_pkg"), "failed to load: ImportError", id="import-error"),
    pytest.param([42], "yielded int, not deadneuron.rules.Rule", id="not-a-rule"),
    pytest.param(None, "yielded NoneType", id="none"),
])
def test_broken_entry_points_are_named(plugins: list[FakeEntryPoint], obj: Any, match: str) -> None:
    plugins.append(FakeEntryPoint("broken", obj))
    with pytest.raises(RuleError, match=match) as info:
        load_rules()
    assert "'broken'" in str(info.value)


def test_entry_point_cannot_shadow_a_builtin(plugins: list[FakeEntryPoint]) -> None:
    plugins.append(FakeEntryPoint("evil", _rule("dead-relu")))
    with pytest.raises(RuleError, match="'dead-relu', which is already defined"):
        load_rules()


# -- patch ops -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "flags"), [
    (SwapActivation("leaky", negative_slope=0.01), ("--activation", "leaky", "--negative-slope", "0.01")),
    (SwapActivation("gelu"), ("--activation", "gelu")),
    (SwapActivation("gelu", sites=("a>relu", "b")), ("--activation", "gelu", "--select", "a>relu", "--select", "module:b")),
    (SetHyperParameter("learning_rate", value=5e-5), ("--lr", "5e-5")),
    (SetHyperParameter("learning_rate", scale=0.5), ("--lr-scale", "0.5")),
    (SetHyperParameter("epochs", value=1000), ("--epochs", "1000")),
    (InsertDropout(0.1), ("--dropout-between-convs", "0.1")),
    (ReinitDead.of({"s": (1, 2)}), ("--reinit-dead", "--select", "module:s")),
    (SwapActivation("gelu", sites=("blocks[0]>relu",)), ("--activation", "gelu", "--select", "blocks[[]0]>relu")),
], ids=["leaky", "gelu", "gelu-at-sites", "lr", "lr-scale", "epochs", "dropout", "reinit", "glob-escaped"])
def test_patch_op_flags(op: Op, flags: tuple[str, ...]) -> None:
    assert op.flags() == flags
    assert op_from_dict(json.loads(json.dumps(op.to_dict()))) == op  # the JSON reads back as the same op


def test_command_quotes_the_source() -> None:
    fix = Fix((SwapActivation("gelu", sites=("enc.bn.2>relu",)), SetHyperParameter("learning_rate", value=5e-5)))
    command = fix.command("my runs/a.pth")
    assert without_out(command) == "deadneuron patch 'my runs/a.pth' --activation gelu --select 'enc.bn.2>relu' --lr 5e-5"
    assert shlex.split(command)[2:5] == ["my runs/a.pth", "--activation", "gelu"]
    out = shlex.split(command)[-1]  # its own output, beside the input, named after the fix
    assert re.fullmatch(r"my runs/a_gelu_lr5e-5_[0-9a-f]{6}\.pth", out), out


# -- context ---------------------------------------------------------------------------------------------------


def _arc_like_checkpoint(model: nn.Module) -> dict[str, Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return {
        "format": "deadneuron-checkpoint", "adapter": "arc-slot",
        "config": {"LEARNING_RATE": 1e-4, "NUM_EPOCHS": 100000, "ACTIVATION": "relu", "NEGATIVE_SLOPE": 0.01,
                   "DROPOUT_BETWEEN_CONVS": False, "BATCH_NORM": True, "NUM_GRIDS": 200, "BATCH_SIZE": 32},
        "state_dict": model.state_dict(), "optimizer_state": optimizer.state_dict(),
        "history": [{"epoch": 1, "step": 7, "loss": 1.0, "train_accuracy": 0.6, "heldout_accuracy": None}],
        "health_timeline": [{"epoch": 0, "step": 0, "sites": {}}], "step": 7, "epoch": 1,
    }  # fmt: skip


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_context_from_an_arc_checkpoint() -> None:
    model = _cnn()
    ctx = context_from(_arc_like_checkpoint(model), model)
    assert (ctx.learning_rate, ctx.optimizer, ctx.epochs, ctx.epochs_trained, ctx.steps) == (1e-4, "adam", 100000, 1, 7)
    assert (ctx.data_size, ctx.batch_size, ctx.activation, ctx.batch_norm, ctx.dropout_between_convs) == (
        200, 32, "relu", True, False)
    assert len(ctx.history) == 1 and len(ctx.timeline) == 1
    assert set(ctx.bn_scales) == {"1", "4"} and ctx.bn_scales["1"].abs_gamma == (1.0,) * 4


def test_context_without_model_reads_batchnorm_from_the_state_dict() -> None:
    model = _cnn()
    with torch.no_grad():
        model[4].weight[2] = -0.5
    ctx = context_from({"state_dict": model.state_dict()}, None)
    assert ctx.bn_scales["4"].abs_gamma == (1.0, 1.0, 0.5, 1.0)


@pytest.mark.parametrize("checkpoint", [None, {}, {"config": "oops", "history": "x", "optimizer_state": 3},
                                        {"config": {"LEARNING_RATE": True, "NUM_EPOCHS": 1.5}}],
                         ids=["none", "empty", "garbage", "wrong-types"])
def test_context_tolerates_missing_and_odd_keys(checkpoint: Any) -> None:
    ctx = context_from(checkpoint, None)
    assert ctx.learning_rate is None and ctx.epochs is None and ctx.history == () and ctx.bn_scales == {}


def test_optimizer_inferred_from_its_state() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    sgd = {"optimizer_state": torch.optim.SGD(params, lr=0.1, momentum=0.9).state_dict()}
    assert (context_from(sgd).optimizer, context_from(sgd).learning_rate) == ("sgd", 0.1)
    assert context_from({"optimizer_state": torch.optim.AdamW(params).state_dict()}).adam_family


def test_batchnorm_scale_maps_to_the_site_that_consumes_it() -> None:
    model = _cnn()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 12, 12))
        model[4].weight[1] = 0.0
        model[4].bias[1] = -0.1
    model.eval()
    report = deadneuron.audit(model, [torch.randn(8, 3, 12, 12) for _ in range(2)])
    found = attach_findings(report, {}, model=model, rules=builtin_rules()).findings
    bn = [f for f in found if f["rule"] == "bn-scale-collapse"]
    assert len(bn) == 1 and bn[0]["channels"] == {"5": [1]}
    dead = [f for f in found if f["rule"] == "dead-relu"]
    assert dead and dead[0]["channels"]["5"] == [1]


# -- property: findings are exactly what their predicates say ---------------------------------------------------


@st.composite
def synthetic_sites(draw: st.DrawFn) -> list[Any]:
    sites = []
    for i in range(draw(st.integers(1, 5))):
        channels = draw(st.integers(1, 12))
        flags = draw(st.lists(st.sampled_from(["ok", "dead", "dormant"]), min_size=channels, max_size=channels))
        sites.append(make_site(
            f"m{i % 2}.bn.{i}>act", module=f"m{i % 2}.act", kind=draw(st.sampled_from(["relu", "leaky_relu", "gelu"])),
            channels=channels, dead=[c for c, f in enumerate(flags) if f == "dead"],
            dormant=[c for c, f in enumerate(flags) if f == "dormant"], sparsity=draw(st.floats(0, 1)),
        ))  # fmt: skip
    return sites


@settings(max_examples=60, deadline=None)
@given(sites=synthetic_sites(), min_channels=st.integers(1, 4), min_fraction=st.sampled_from([0.0, 0.05, 0.2, 0.5]),
       min_sparsity=st.floats(0, 1))
def test_dead_and_sparse_rules_fire_exactly_when_their_predicates_hold(
    sites: list[Any], min_channels: int, min_fraction: float, min_sparsity: float
) -> None:
    config = RulesConfig({"dead-relu": {"min_channels": min_channels, "min_fraction": min_fraction},
                          "sparse-healthy": {"min_sparsity": min_sparsity}})
    findings = evaluate(make_report(*sites), rules=builtin_rules(), config=config)
    assert [f.severity.rank for f in findings] == sorted((f.severity.rank for f in findings), reverse=True)
    for f in findings:
        assert all(e.holds() for e in f.evidence)
    dead = {s for f in findings if f.rule == "dead-relu" for s in f.sites}
    assert dead == {s.name for s in sites if s.kind == "relu" and len(s.dead_channels) >= min_channels
                    and len(s.dead_channels) / s.channels >= min_fraction}
    sparse = {s for f in findings if f.rule == "sparse-healthy" for s in f.sites}
    assert sparse == {s.name for s in sites if s.kind == "relu" and s.sparsity >= min_sparsity
                      and not s.dead_channels and not s.dormant_channels}


def test_patch_ops_are_what_the_patch_planner_reads() -> None:
    plan = pytest.importorskip("deadneuron.patch.plan")
    report = make_report(make_site("enc.bn.0>relu", dead=(1,)), make_site("l", kind="leaky_relu", dormant=(2,)),
                         make_site("n", nonfinite=1))
    history = tuple({"epoch": e, "train_accuracy": t, "heldout_accuracy": h}
                    for e, t, h in [(10, 0.5, 0.5), (20, 0.5, 0.75), (30, 0.75, 0.5)])
    context = RuleContext(learning_rate=3e-3, optimizer="adam", history=history)
    findings = evaluate(report, context, rules=builtin_rules())
    ops = [op for f in findings for fix in f.to_dict()["patch_ops"] for op in fix]
    assert {op["op"] for op in ops} == {"swap_activation", "set_hparam", "insert_dropout", "reinit_dead"}
    for op in ops:
        assert plan.op_from_dict(op).to_dict() == op
    assert plan.plan_from_findings(findings).ops


def test_adapter_model_commands_name_their_sites_and_reinit_from_the_checkpoint() -> None:
    """For a checkpoint with an adapter a swap still names its sites (the config maps them, or the
    finding withholds it), and re-initialising dead channels needs the trained weights (--init checkpoint)."""
    swap = SwapActivation("leaky", negative_slope=0.01, sites=("encoder.bn_layers.1>relu",))
    reinit = ReinitDead.of({"encoder.bn_layers.1>relu": [0, 2]})
    assert "--select" in Fix((swap,)).command("a.pth")
    assert "--select" in Fix((swap,)).command("a.pth", adapter_model=True)
    assert without_out(Fix((reinit,)).command("a.pth")) == "deadneuron patch a.pth --reinit-dead --select 'encoder.bn_layers.1>relu'"
    assert without_out(Fix((reinit,)).command("a.pth", adapter_model=True)) == (
        "deadneuron patch a.pth --reinit-dead --select 'encoder.bn_layers.1>relu' --init checkpoint")
