"""Every `deadneuron patch` command an audit suggests runs as printed and changes exactly the sites its
finding names: the sick and healthy demo checkpoints, a user's CNN without BatchNorm with planted dead
channels (audited from its own folder with --model/--data), and a model fed NaN data.

Each command is parsed with shlex and run with --dry-run added (exit 0). What it changes is measured
independently of the rule engine: the command's flags are read with argparse into the patch planner's
plan, the plan is applied to the subject (module surgery on the user's model; the changed config,
rebuilt, for a demo checkpoint), and the result is audited again on the same batch. An activation swap
must change the activation kind at exactly the finding's sites. A dead-channel re-initialisation must
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
from typer.testing import CliRunner

from deadneuron.audit import audit
from deadneuron.cli import app
from deadneuron.patch import Plan, ReinitDead, SwapActivation, apply_plan, apply_to_config, plan_from_flags

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


def patch_args(argv: list[str]) -> argparse.Namespace:
    """The `deadneuron patch` flags of a command, read independently of the CLI (argparse, strict)."""
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("checkpoint")
    for flag in ("--activation", "--model", "--data", "--input-shape", "--train", "--init"):
        p.add_argument(flag)
    for flag in ("--negative-slope", "--lr", "--lr-scale", "--dropout-between-convs"):
        p.add_argument(flag, type=float)
    for flag in ("--epochs", "--batches", "--audit-grids"):
        p.add_argument(flag, type=int)
    for flag in ("--select", "--model-arg", "--allow-global"):
        p.add_argument(flag, action="append", default=[])
    p.add_argument("--reinit-dead", action="store_true")
    p.add_argument("--trust-code", action="store_true")
    assert argv[:2] == ["deadneuron", "patch"], argv
    return p.parse_args(argv[2:])


def plan_of(args: argparse.Namespace) -> Plan:
    return plan_from_flags(activation=args.activation, negative_slope=args.negative_slope, sites=tuple(args.select),
                           lr=args.lr, lr_scale=args.lr_scale, dropout_between_convs=args.dropout_between_convs,
                           epochs=args.epochs, reinit_dead=args.reinit_dead)  # fmt: skip


def suggested(report: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], str]]:
    return [(f, c) for f in report["findings"] for c in f["commands"]]


def assert_dry_run_exits_0(command: str) -> None:
    code, _, err = cli(*shlex.split(command)[1:], "--dry-run", "--no-progress")
    assert code == 0, f"{command}\n{err}"


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
    """Sites (named as in ``before``) whose activation differs in ``after``; a functional site is named
    after its function (conv3>relu becomes conv3>leaky_relu), so sites are matched by where they run."""
    def where(site: Any) -> tuple[Any, ...]:
        return (site.producer, site.module, site.name.partition("#")[2]) if site.functional else (site.name,)

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


def test_own_cnn_commands_carry_train_and_run(own: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --train the commands retrain both arms with the user's function (patch --train)."""
    _, usage, _ = cli("patch", "--help")
    if "--train" not in usage:
        pytest.skip("deadneuron patch takes no --train in this build")
    monkeypatch.chdir(own)
    torch.save(own_fn(own, "planted")().state_dict(), own / "net.pth")
    report = audit_json("net.pth", "--model", "net.py:build", "--data", "net.py:batches", "--train", "net.py:train")
    pairs = suggested(report)
    assert pairs and all(patch_args(shlex.split(c)).train == "net.py:train" for _, c in pairs)
    for _, command in pairs:
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
    arc = ArcSubject(path)
    base = arc.audit(arc.adapter.load(arc.ckpt))
    for finding, command in pairs:
        args = patch_args(shlex.split(command))
        assert args.checkpoint == str(path) and args.audit_grids == report["meta"]["samples"], command
        assert_dry_run_exits_0(command)
        plan = plan_of(args)
        named = set(finding["sites"])
        if plan.get(SwapActivation) is not None:
            config, _ = apply_to_config(arc.config, plan)
            assert kinds_changed(base, arc.audit(arc.adapter.build(config))) == named, command
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
