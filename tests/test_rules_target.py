"""PatchTarget: fixes checked against the subject (pure). A swap of a shared module or of a functional
call reaches every site of that module or code; a name that reads as a kind selects its module; an audit
limited by --select or a model without a training config keep a fix from being suggested, with why; the
subject's words are quoted into every command."""

from __future__ import annotations

import dataclasses
import shlex

from deadneuron.ops import AddBatchNorm, Op, ReinitDead, SetHyperParameter, SwapActivation
from deadneuron.report import SiteHealth
from deadneuron.rules import Fix, PatchTarget, Preview, builtin_rules, evaluate, surgery_preview
from tests.suggested import without_out
from tests.test_rules_factory import make_report, make_site


def functional(name: str, owner: str, **kw: object) -> SiteHealth:
    return dataclasses.replace(make_site(name, **kw), module=owner, functional=True)  # type: ignore[arg-type]


def swap(*sites: str) -> tuple[Op, ...]:
    return (SwapActivation("leaky", negative_slope=0.01, sites=sites),)


REPORT = make_report(
    make_site("conv1>act", module="act"), make_site("conv2>act", module="act", dead=(1,)),
    make_site("relu", module="relu", dead=(0, 2)), make_site("head.relu", module="head.relu"),
    functional("block.conv>relu", "block", dead=(3,)), functional("block.conv>gelu", "block", kind="gelu"),
)  # fmt: skip


def test_surgery_reach_follows_modules_and_the_code_that_calls_functions() -> None:
    assert surgery_preview(REPORT, swap("conv2>act")).sites == {"conv1>act", "conv2>act"}  # one module, two sites
    assert surgery_preview(REPORT, swap("relu")).sites == {"relu"}  # module:relu, not every ReLU
    assert surgery_preview(REPORT, swap("block.conv>relu")).sites == {"block.conv>relu", "block.conv>gelu"}
    assert surgery_preview(REPORT, swap()).sites == {"conv1>act", "conv2>act", "relu", "head.relu", "block.conv>relu"}


def test_check_withholds_what_would_change_more_and_says_why() -> None:
    target = PatchTarget(("m.pth",))
    reason = target.check(REPORT, Fix(swap("conv2>act")))
    assert reason is not None and "act also runs at conv1>act" in reason and reason.startswith("`--activation leaky")
    assert target.check(REPORT, Fix(swap("relu"))) is None
    assert "block also runs at block.conv>gelu" in str(target.check(REPORT, Fix(swap("block.conv>relu"))))
    lr = target.check(REPORT, Fix((SetHyperParameter("learning_rate", scale=0.5),)))
    assert lr is not None and "no training config" in lr and "training script" in lr
    limited = dataclasses.replace(REPORT, meta={**REPORT.meta, "select": ["relu"]})
    assert "--select" in str(target.check(limited, Fix(swap("relu"))))
    masked = PatchTarget(("m.pth",), limits=("--channel-axis relu=1",))
    assert "--channel-axis relu=1" in str(masked.check(REPORT, Fix((ReinitDead.of({"relu": (0,)}),))))
    assert "cannot" in str(PatchTarget(None, unreachable="cannot patch this").check(REPORT, Fix(swap("relu"))))


def test_a_config_target_uses_its_measured_preview() -> None:
    def encoder_only(report: object, ops: tuple[Op, ...]) -> Preview:
        return Preview(frozenset({"conv1>act", "conv2>act"}))

    target = PatchTarget(("ck.pth",), config=True, preview=encoder_only)
    assert target.check(REPORT, Fix(swap("conv1>act", "conv2>act"))) is None
    assert "sets the activation of conv1>act, conv2>act only, not of relu" in str(target.check(REPORT, Fix(swap("relu"))))
    assert "would also change conv1>act" in str(target.check(REPORT, Fix(swap("conv2>act"))))


def test_findings_keep_what_applies_with_commands_naming_the_whole_subject() -> None:
    words = ("my runs/m.pth", "--model", "nets.py:build", "--data", "nets.py:batches", "--batches", "2")
    findings = evaluate(REPORT, rules=builtin_rules(), target=PatchTarget(words))
    shared = next(f for f in findings if f.sites == ("conv2>act",))
    assert len(shared.fixes) == len(shared.commands) == 1 and "--reinit-dead" in shared.commands[0]
    assert shared.withheld and shared.withheld[0] in shared.message
    top = next(f for f in findings if f.sites == ("relu",))
    argv = shlex.split(without_out(top.commands[0]))
    assert argv[:2 + len(words)] == ["deadneuron", "patch", *words]
    assert argv[-2:] == ["--select", "module:relu"]
    quiet = evaluate(REPORT, rules=builtin_rules(), target=PatchTarget(None))
    assert all(not f.commands for f in quiet) and [f.fixes for f in quiet] == [f.fixes for f in findings]


def batchnorm(*sites: str) -> tuple[Op, ...]:
    return (AddBatchNorm(sites),)


FED = make_report(
    make_site("c1>relu", module="act"), make_site("c1>gelu", module="gelu", kind="gelu"),
    make_site("c2>relu", module="relu2", dead=(1,)), make_site("free", producer=None),
)  # fmt: skip


def test_a_batchnorm_reaches_every_site_its_layer_feeds() -> None:
    assert surgery_preview(FED, batchnorm("c2>relu")).sites == {"c2>relu"}
    assert surgery_preview(FED, batchnorm("c1>relu")).sites == {"c1>relu", "c1>gelu"}  # c1 feeds both
    (problem,) = surgery_preview(FED, batchnorm("free")).problems
    assert problem.startswith("free: fed by no layer deadneuron can see")
    target = PatchTarget(("m.pth",))
    assert target.check(FED, Fix(batchnorm("c2>relu"))) is None
    reason = str(target.check(FED, Fix(batchnorm("c1>relu"))))
    assert reason.startswith("`--add-batchnorm` at c1>relu: c1 also feeds c1>gelu, which this finding does not name")
    limited = dataclasses.replace(FED, meta={**FED.meta, "select": ["c2*"]})
    assert "--select" in str(target.check(limited, Fix(batchnorm("c2>relu"))))
    assert without_out(Fix(batchnorm("c1>relu", "c2>relu")).command("m.pth", adapter_model=True)) == (
        "deadneuron patch m.pth --add-batchnorm --select 'c1>relu' --select 'c2>relu'")


def test_a_config_batchnorm_switch_covering_more_sites_is_withheld() -> None:
    def switch(report: object, ops: tuple[Op, ...]) -> Preview:
        return Preview(frozenset({"c1>relu", "c1>gelu", "c2>relu"}))

    target = PatchTarget(("ck.pth",), config=True, preview=switch)
    assert target.check(FED, Fix(batchnorm("c1>relu", "c1>gelu", "c2>relu"))) is None
    reason = str(target.check(FED, Fix(batchnorm("c2>relu"))))
    assert "switches BatchNorm on for c1>gelu, c1>relu, c2>relu together: it would also change c1>gelu, c1>relu" in reason
    assert "for c1>gelu, c1>relu, c2>relu only, not for free" in str(target.check(FED, Fix(batchnorm("free"))))


def test_a_model_retrained_with_train_reinitialises_from_its_checkpoint() -> None:
    reinit = Fix((ReinitDead.of({"relu": (0, 2)}),))
    words = ("m.pth", "--model", "n.py:build", "--data", "n.py:batches", "--train", "n.py:train", "--max-steps", "5")
    assert without_out(str(PatchTarget(words, retrains=True).command(reinit))).endswith("--reinit-dead --select module:relu --init checkpoint")
    assert without_out(str(PatchTarget(words[:5]).command(reinit))).endswith("--reinit-dead --select module:relu")
