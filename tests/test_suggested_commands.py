"""Every `deadneuron patch` command an audit suggests runs as printed and changes exactly the sites its
finding names: the sick and healthy demo checkpoints, a user's CNN without BatchNorm with planted dead
channels (audited from its own folder with --model/--data), and a model fed NaN data.

Each command is parsed with shlex and run with --dry-run added (exit 0). What it changes is measured
independently of the rule engine: the command's flags are read with argparse into the patch planner's
plan, the plan is applied to the subject (module surgery on the user's model; the changed config,
rebuilt, for a demo checkpoint), and the result is audited again on the same batch. An activation swap
must change the activation kind at exactly the finding's sites. An added BatchNorm must sit after exactly
the layers feeding the finding's sites (each site's producer, as the report names it): on the user's CNN
its input, caught by a hook, is that layer's output recomputed with plain torch, and the model's output is
unchanged at surgery (eval mode); in the demo model the modules that become BatchNorm are exactly those
producers. A demo command's dry run lists by name exactly the finding's sites. A dead-channel re-initialisation must
revive channels at the named sites; on the user's CNN it must change the statistics there and nowhere else
(its outgoing weights are zeroed, so nothing downstream moves); in the demo model, where a LayerNorm
mixes channels downstream, it must re-initialise exactly the named sites and move nothing upstream.
"""

from __future__ import annotations

import argparse
import json
import shlex
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from deadneuron.audit import audit
from deadneuron.cli import app
from deadneuron.patch import (
    AddBatchNorm,
    Plan,
    ReinitDead,
    SwapActivation,
    apply_plan,
    apply_to_config,
    plan_from_flags,
)
from deadneuron.patch.parts import config_map, full_config, site_infos

ROOT = Path(__file__).resolve().parent.parent
SICK = ROOT / "checkpoints" / "slot_attention.pth"
HEALTHY = ROOT / "checkpoints" / "slot_attention_healthy.pth"

NET = '''
import torch
from torch import nn
from {helpers} import conv


class Net(nn.Module):
    """No BatchNorm; ``act`` is shared by conv1 and conv2; conv3 is followed by a functional ReLU."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.conv4 = conv(3, width), conv(width, width), conv(width, width), conv(width, width)
        self.act = nn.ReLU()
        self.relu4 = nn.ReLU()
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = self.relu4(self.conv4(x))
        return self.head(x.mean(dim=(2, 3)))


def build(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return Net(width)


def planted(width: int = 8) -> nn.Module:
    """Dead channels: 0 and 1 of conv2 (only one of act's two sites), 2 of conv3, 5 and 6 of conv4."""
    model = build(width)
    with torch.no_grad():
        model.conv2.bias[:2] = -1e3
        model.conv3.bias[2] = -1e3
        model.conv4.bias[5:7] = -1e3
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3)]


def nan_batches():
    return [torch.full((4, 3, 8, 8), float("nan")) for _ in range(2)]


def train(model, steps, seed):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for x in batches()[:steps]:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
'''


def cli(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(argv))
    return result.exit_code, result.stdout, result.stderr


def audit_json(*argv: str) -> dict[str, Any]:
    code, out, err = cli("audit", *argv, "--format", "json", "--no-progress")
    assert code == 0, err
    return json.loads(out)


VALUE_FLAGS = {"--activation": str, "--model": str, "--data": str, "--input-shape": str, "--train": str,
               "--metric": str, "--init": str, "--negative-slope": float, "--lr": float, "--lr-scale": float,
               "--dropout-between-convs": float, "--epochs": int, "--max-steps": int, "--seeds": int,
               "--batches": int, "--audit-grids": int, "--out": str}  # fmt: skip
LIST_FLAGS = ("--select", "--model-arg", "--allow-global")
SWITCHES = ("--reinit-dead", "--add-batchnorm", "--trust-code", "--apply-suggestions")


def patch_args(argv: list[str]) -> argparse.Namespace:
    """The `deadneuron patch` flags of a command, read independently of the CLI (argparse, strict)."""
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("checkpoint")
    for flag, kind in VALUE_FLAGS.items():
        p.add_argument(flag, type=kind)
    for flag in LIST_FLAGS:
        p.add_argument(flag, action="append", default=[])
    for flag in SWITCHES:
        p.add_argument(flag, action="store_true")
    assert argv[:2] == ["deadneuron", "patch"], argv
    return p.parse_args(argv[2:])


def test_the_reader_knows_only_flags_that_deadneuron_patch_takes() -> None:
    _, usage, _ = cli("patch", "--help")
    for flag in (*VALUE_FLAGS, *LIST_FLAGS, *SWITCHES):
        assert f"{flag} " in usage or f"{flag}\n" in usage, flag


def plan_of(args: argparse.Namespace) -> Plan:
    return plan_from_flags(activation=args.activation, negative_slope=args.negative_slope, sites=tuple(args.select),
                           lr=args.lr, lr_scale=args.lr_scale, dropout_between_convs=args.dropout_between_convs,
                           epochs=args.epochs, reinit_dead=args.reinit_dead, add_batchnorm=args.add_batchnorm)  # fmt: skip


def suggested(report: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], str]]:
    return [(f, c) for f in report["findings"] for c in f["commands"]]


def assert_dry_run_exits_0(command: str) -> str:
    code, _, err = cli(*shlex.split(command)[1:], "--dry-run", "--no-progress")
    assert code == 0, f"{command}\n{err}"
    return err


def listed_sites(dry_run: str) -> set[str]:
    """The sites a demo command's dry run says will change ("sites that will change (N): a, b")."""
    (line,) = [ln for ln in dry_run.splitlines() if ln.startswith("sites that will change")]
    return set(line.partition(": ")[2].split(", "))


def producers(report: Mapping[str, Any], sites: set[str]) -> set[str]:
    """The layers the report says feed ``sites`` (each site's ``producer``)."""
    by_name = {s["name"]: s["producer"] for s in report["sites"]}
    assert all(by_name[site] for site in sites), sites
    return {by_name[site] for site in sites}


def batchnormed_layers(model: nn.Module, x: torch.Tensor) -> set[str]:
    """The conv/linear layers whose output, recomputed from their input with plain torch, is exactly what
    some BatchNorm of ``model`` normalises in one forward pass; every BatchNorm must match one."""
    inputs: dict[str, torch.Tensor] = {}
    normed: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: normed.__setitem__(n, a[0].detach())))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0].detach())))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    found: set[str] = set()
    for bn_input in normed.values():
        hits = {layer for layer, inp in inputs.items() if _same(_raw_output(model.get_submodule(layer), inp), bn_input)}
        assert len(hits) == 1, hits
        found |= hits
    return found


def _raw_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, layer.bias)
    assert isinstance(layer, nn.Conv2d)
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def reinitialised(record_lines: list[str]) -> set[str]:
    """The sites whose channels a re-initialisation gave fresh incoming weights, as its record names them
    ("encoder.conv_layers.1: dead channels -> fresh incoming weights for channels 0, 2 of SITE")."""
    return {line.rpartition(" of ")[2] for line in record_lines if "fresh incoming weights" in line}


def changed_sites(before: Any, after: Any) -> set[str]:
    """Sites whose activation kind or any per-channel figure differs between two audits of one batch."""
    out = {name for name in before.sites.keys() ^ after.sites.keys()}
    for name in before.sites.keys() & after.sites.keys():
        a, b = before.sites[name], after.sites[name]
        same = a.label == b.label and np.allclose(a.channel_flat, b.channel_flat) and np.allclose(
            a.channel_mean, b.channel_mean, rtol=1e-4, atol=1e-5)
        if not same:
            out.add(name)
    return out


def kinds_changed(before: Any, after: Any) -> set[str]:
    """Sites (named as in ``before``) whose activation differs in ``after``; a site named after its
    producer is also named after its kind (conv3>relu becomes conv3>leaky_relu, slot_attention.mlp.0>relu#1
    slot_attention.mlp.0>leaky_relu#1), so sites are matched by where they run: producer, module, call."""
    def where(site: Any) -> tuple[Any, ...]:
        return (site.producer, site.module, site.functional, site.name.partition("#")[2])

    old = {where(s): s for s in before.sites.values()}
    new = {where(s): s for s in after.sites.values()}
    assert len(old) == len(before.sites) and len(new) == len(after.sites)
    return {old[k].name if k in old else new[k].name for k in old.keys() | new.keys()
            if k not in old or k not in new or old[k].label != new[k].label}


# -- the user's own CNN ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("own")
    helpers = f"own_layers_{folder.name.replace('-', '_')}"  # a neighbour module the file imports
    (folder / f"{helpers}.py").write_text("from torch import nn\n\n\ndef conv(i, o):\n    return nn.Conv2d(i, o, 3, padding=1)\n")
    (folder / "net.py").write_text(textwrap.dedent(NET).format(helpers=helpers))
    return folder


def own_fn(folder: Path, name: str) -> Any:
    from deadneuron.cli._subject import import_object

    return import_object(f"{folder / 'net.py'}:{name}", option="--model")


def test_own_cnn_commands_run_and_change_exactly_the_named_sites(own: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(own)
    torch.save(own_fn(own, "planted")().state_dict(), own / "net.pth")
    report = audit_json("net.pth", "--model", "net.py:build", "--data", "net.py:batches")
    pairs = suggested(report)
    dead = {s for f in report["findings"] if f["rule"] == "dead-relu" for s in f["sites"]}
    assert dead == {"conv2>act", "conv3>relu", "relu4"}  # the planted channels, nothing else
    swaps = {tuple(f["sites"]) for f, c in pairs if "--activation" in c}
    assert swaps == {("conv3>relu",), ("relu4",)}  # not conv2>act: act also runs at conv1>act
    (shared,) = [f for f in report["findings"] if f["sites"] == ["conv2>act"]]
    assert "act also runs at conv1>act" in shared["message"] and shared["withheld"]
    assert any("--reinit-dead" in c for c in shared["commands"])
    norms = {tuple(f["sites"]) for f, c in pairs if "--add-batchnorm" in c}
    assert norms == {("conv1>act", "conv2>act", "conv3>relu", "relu4")}  # the whole conv stack, no BatchNorm

    model, data = own_fn(own, "planted")(), own_fn(own, "batches")()
    base = audit(model, data[:1], progress=False, compile=False, rules=False)
    for finding, command in pairs:
        argv = shlex.split(command)
        args = patch_args(argv)
        assert (args.checkpoint, args.model, args.data) == ("net.pth", "net.py:build", "net.py:batches"), command
        assert_dry_run_exits_0(command)
        plan = plan_of(args)
        result = apply_plan(model, plan, report=base, example=data[0])
        after = audit(result.model, data[:1], progress=False, compile=False, rules=False)
        named = set(finding["sites"])
        if plan.get(SwapActivation) is not None:
            assert kinds_changed(base, after) == named, command
        if plan.get(ReinitDead) is not None:
            assert changed_sites(base, after) == named, command
            for site in named:
                assert len(after.sites[site].dead_channels) < len(base.sites[site].dead_channels), command
        if plan.get(AddBatchNorm) is not None:
            patched = result.model.eval()
            assert batchnormed_layers(patched, data[0]) == producers(report, named), command
            assert batchnormed_layers(model, data[0]) == set(), "the input model is never modified"
            with torch.no_grad():
                for x in data:  # an identity at surgery: the function is unchanged on the data
                    torch.testing.assert_close(patched(x), model.eval()(x), rtol=0, atol=0)


def test_own_cnn_commands_carry_train_and_run(own: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --train the commands retrain both arms with the user's function on the audit's budget
    (patch --train --max-steps); a re-initialisation keeps the trained weights (--init checkpoint)."""
    _, usage, _ = cli("patch", "--help")
    if "--train" not in usage:
        pytest.skip("deadneuron patch takes no --train in this build")
    monkeypatch.chdir(own)
    torch.save(own_fn(own, "planted")().state_dict(), own / "net.pth")
    subject = ("net.pth", "--model", "net.py:build", "--data", "net.py:batches", "--train", "net.py:train")
    code, _, err = cli("audit", *subject, "--format", "json", "--no-progress")
    assert code == 2 and "--max-steps" in err.strip() and len(err.strip().splitlines()) == 1, err
    report = audit_json(*subject, "--max-steps", "2")
    pairs = suggested(report)
    assert {"--activation", "--reinit-dead", "--add-batchnorm"} <= {w for _, c in pairs for w in shlex.split(c)}
    for _, command in pairs:
        args = patch_args(shlex.split(command))
        assert (args.train, args.max_steps) == ("net.py:train", 2), command
        assert args.init == ("checkpoint" if args.reinit_dead else None), command
        assert_dry_run_exits_0(command)


def test_nan_data_suggests_no_command_it_cannot_apply(own: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(own)
    torch.save(own_fn(own, "build")().state_dict(), own / "clean.pth")
    report = audit_json("clean.pth", "--model", "net.py:build", "--data", "net.py:nan_batches")
    (nan,) = [f for f in report["findings"] if f["rule"] == "nonfinite"]
    assert not nan["commands"] and not nan["patch_ops"]  # lowering the learning rate is out of a state_dict's reach
    assert "training script" in nan["withheld"][0] and "training script" in nan["message"]
    for _, command in suggested(report):
        assert_dry_run_exits_0(command)


def test_a_learning_rate_fix_applies_where_the_train_function_takes_lr() -> None:
    """With --train a learning rate is the patched arm's ``lr=``: suggested only where train takes one."""
    from deadneuron.ops import SetHyperParameter
    from deadneuron.reach import ModelPreview

    def takes_lr(model: Any, steps: int, seed: int, lr: float = 1e-2) -> None: ...

    def no_lr(model: Any, steps: int, seed: int) -> None: ...

    model, x = nn.Sequential(nn.Linear(3, 4), nn.ReLU()), torch.randn(5, 3)
    report = audit(model, [x], progress=False, compile=False, rules=False)
    halve = (SetHyperParameter("learning_rate", scale=0.5),)
    assert ModelPreview(model, x, train=takes_lr)(report, halve).problems == ()
    assert "no lr= keyword" in ModelPreview(model, x, train=no_lr)(report, halve).problems[0]
    assert "training script" in ModelPreview(model, x)(report, halve).problems[0]


# -- the demo checkpoints ----------------------------------------------------------------------------------


class ArcSubject:
    """A demo checkpoint rebuilt: its config, model and one held-out batch."""

    def __init__(self, path: Path) -> None:
        from deadneuron.adapters import get_adapter
        from deadneuron.checkpoint import load_checkpoint

        self.ckpt = load_checkpoint(path)
        self.adapter = get_adapter(str(self.ckpt["adapter"]))
        self.config = dict(self.ckpt["config"])
        self.batch = next(iter(self.adapter.batches("heldout", self.config)))

    def audit(self, model: Any) -> Any:
        return audit(model, [self.batch], adapter=self.adapter, progress=False, compile=False, rules=False)


@pytest.mark.parametrize("path", [SICK, HEALTHY], ids=["sick", "healthy"])
def test_demo_commands_run_and_change_exactly_the_named_sites(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is made by `make checkpoints`")
    report = audit_json(str(path), "--batches", "2")
    pairs = suggested(report)
    assert pairs, "the demo audit suggests something to try"
    swaps = {tuple(f["sites"]) for f, c in pairs if "--activation" in c}
    named = {tuple(f["sites"]) for f in report["findings"] if f["rule"] == "dead-relu"}
    assert ("encoder.mlp.1",) in named or path == HEALTHY  # the healthy demo's dead-ReLU findings are in the decoder
    assert (("encoder.mlp.1",) in swaps) == (("encoder.mlp.1",) in named), "a part the config sets alone gets its swap"
    norms = [f for f in report["findings"] if f["rule"] == "no-normalisation"]
    assert [c for f in norms for c in f["commands"] if "--add-batchnorm" in c] == [c for f in norms for c in f["commands"]]
    assert bool(norms) == (path == SICK)  # the sick demo trains without BatchNorm, the healthy one with it
    arc = ArcSubject(path)
    base = arc.audit(arc.adapter.load(arc.ckpt))
    config = full_config(arc.adapter, arc.config)  # the adapter's defaults for keys the checkpoint predates
    assert kinds_changed(base, arc.audit(arc.adapter.build(config))) == set()
    parts = config_map(arc.adapter, config, site_infos(arc.adapter, config, base))
    for finding, command in pairs:
        args = patch_args(shlex.split(command))
        assert args.checkpoint == str(path) and args.audit_grids == report["meta"]["samples"], command
        dry_run = assert_dry_run_exits_0(command)
        plan = plan_of(args)
        named = set(finding["sites"])
        if plan.get(SwapActivation) is not None or plan.get(AddBatchNorm) is not None:
            assert listed_sites(dry_run) == named, command
            patched = arc.adapter.build(apply_to_config(config, plan, parts=parts)[0])
        if plan.get(SwapActivation) is not None:
            assert kinds_changed(base, arc.audit(patched)) == named, command
        if plan.get(AddBatchNorm) is not None:
            old = {n for n, m in arc.adapter.build(config).named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
            new = {n for n, m in patched.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
            assert new - old == producers(report, named) and old <= new, command
        if plan.get(ReinitDead) is not None:
            assert args.init == "checkpoint", command
            result = apply_plan(arc.adapter.load(arc.ckpt), plan, report=base, example=arc.batch,
                                forward=arc.adapter.forward, strict=False)  # fmt: skip
            touched = {site for site in named if base.sites[site].dead_channels}
            assert touched and reinitialised(result.record.lines()) == touched, command
            after = arc.audit(result.model)
            for site in touched:  # revived there ...
                assert len(after.sites[site].dead_channels) < len(base.sites[site].dead_channels), command
            order = list(base.sites)
            upstream = order[: min(order.index(s) for s in touched)]
            assert not changed_sites(base, after) & set(upstream), command  # ... and nothing before them moved
        if plan.hyper_parameter("learning_rate") is not None:
            _, record = apply_to_config(arc.config, plan)
            assert [c.target for c in record.changes] == ["LEARNING_RATE"], command
    for finding in report["findings"]:  # every fix kept has its command; what is not suggested says why
        assert len(finding["commands"]) == len(finding["patch_ops"])
        for reason in finding["withheld"]:
            assert reason in finding["message"], reason
            assert "config" in reason or "cannot be re-initialised" in reason, reason


def test_a_demo_batchnorm_fix_naming_part_of_the_switch_is_withheld_with_why() -> None:
    """BATCH_NORM switches BatchNorm on for the four encoder sites together: a fix naming some of them
    would change the others too, and a site no switch reaches cannot get one."""
    if not SICK.exists():
        pytest.skip(f"{SICK} is made by `make checkpoints`")
    from deadneuron.ops import AddBatchNorm
    from deadneuron.reach import ConfigPreview
    from deadneuron.rules import Fix, PatchTarget

    arc = ArcSubject(SICK)
    report = arc.audit(arc.adapter.load(arc.ckpt))
    target = PatchTarget((str(SICK),), config=True, preview=ConfigPreview(arc.adapter, arc.ckpt))
    encoder = tuple(f"encoder.bn_layers.{i}>relu" for i in range(4))
    assert target.check(report, Fix((AddBatchNorm(encoder),))) is None
    some = str(target.check(report, Fix((AddBatchNorm(encoder[1:]),))))
    assert "switches BatchNorm on for" in some and "would also change encoder.bn_layers.0>relu" in some, some
    decoder = str(target.check(report, Fix((AddBatchNorm(("decoder.layers.1",)),))))
    assert "decoder.layers.1's normalisation is not set by the config" in decoder, decoder
