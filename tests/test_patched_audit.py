"""A checkpoint `deadneuron patch --model` wrote for a model of the user's own is audited as the patched
model (its recorded plan re-applied to the factory's model), or refused with exit 2; never as the unpatched
architecture. Figures are checked against a plain-torch forward over the saved weights."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.patch import PatchError
from deadneuron.patch.apply import DropoutHook

USER_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


class Renamed(Net):
    def __init__(self, width: int = 8) -> None:
        super().__init__(width)
        del self.act1
        self.nonlin = nn.ReLU()

    def forward(self, x):
        x = self.nonlin(self.bn1(self.conv1(x)))
        return self.head(F.relu(self.conv2(x)).mean(dim=(2, 3)))


def build(width: int = 8) -> nn.Module:
    return Net(width)


def build_renamed(width: int = 8) -> nn.Module:
    return Renamed(width)


def batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3)]
'''
WIDTH = "6"  # not the factory's default: the recorded --model-arg must be used when rebuilding


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def load_user(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"user_model_{path.parent.name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's folder: usernet.py (factory and data) and own.pth (a state_dict with warm BatchNorm)."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "usernet.py").write_text(USER_MODEL)
    module = load_user(folder / "usernet.py")
    torch.manual_seed(0)
    model = module.build(int(WIDTH)).train()
    with torch.no_grad():
        for x in module.batches():
            model(x)
    torch.save(model.state_dict(), folder / "own.pth")
    return folder


@pytest.fixture(scope="module")
def patched(user: Path) -> Path:
    out = user / "p.pth"
    code, _, stderr = run("patch", user / "own.pth", "--model", f"{user / 'usernet.py'}:build", "--model-arg",
                          f"width={WIDTH}", "--input-shape", "2,3,8,8", "--activation", "leaky", "--out", out)  # fmt: skip
    assert code == 0, stderr
    return out


def audit_json(checkpoint: Path, user: Path, factory: str = "build") -> tuple[int, dict[str, Any], str]:
    code, stdout, stderr = run("audit", checkpoint, "--model", f"{user / 'usernet.py'}:{factory}",
                               "--data", f"{user / 'usernet.py'}:batches", "--format", "json", "--no-rules")  # fmt: skip
    return code, (json.loads(stdout) if code == 0 else {}), stderr


def pre_activations(state: dict[str, torch.Tensor], x: torch.Tensor, slope: float) -> list[torch.Tensor]:
    """The two pre-activations of Net in eval mode, by hand from the saved weights."""
    z1 = F.batch_norm(F.conv2d(x, state["conv1.weight"], state["conv1.bias"], padding=1), state["bn1.running_mean"],
                      state["bn1.running_var"], state["bn1.weight"], state["bn1.bias"], training=False, eps=1e-5)  # fmt: skip
    z2 = F.conv2d(F.leaky_relu(z1, slope), state["conv2.weight"], state["conv2.bias"], padding=1)
    return [z1, z2]


def test_audit_of_a_patched_checkpoint_measures_the_patched_model(user: Path, patched: Path) -> None:
    code, report, stderr = audit_json(patched, user)
    assert code == 0, stderr
    sites = {s["name"]: s for s in report["sites"]}
    assert {n: s["kind"] for n, s in sites.items()} == {"act1": "leaky_relu", "conv2>leaky_relu": "leaky_relu"}
    assert "re-applied" in stderr and report["meta"]["patched_plans"]
    state = torch.load(user / "own.pth", weights_only=True)  # no retraining: the same weights
    batches = load_user(user / "usernet.py").batches()
    zs = [torch.cat(t) for t in zip(*(pre_activations(state, x, 0.01) for x in batches), strict=True)]
    for site, z in zip(("act1", "conv2>leaky_relu"), zs, strict=True):
        flat = (z <= 0).double().mean(dim=(0, 2, 3))
        assert sites[site]["channel_flat"] == pytest.approx(flat.tolist(), abs=1e-12)
        lowest = F.leaky_relu(z, 0.01).amin(dim=(0, 2, 3))  # a negative minimum: the slope is there
        assert sites[site]["channel_min"] == pytest.approx(lowest.tolist(), rel=1e-5)
        assert sites[site]["sparsity"] == 0.0 and min(sites[site]["channel_min"]) < 0


def test_the_unpatched_checkpoint_still_audits_as_relu(user: Path) -> None:
    code, stdout, stderr = run("audit", user / "own.pth", "--model", f"{user / 'usernet.py'}:build", "--model-arg",
                          f"width={WIDTH}", "--data", f"{user / 'usernet.py'}:batches", "--format", "json", "--no-rules")  # fmt: skip
    assert code == 0, stderr
    kinds = {s["name"]: s["kind"] for s in json.loads(stdout)["sites"]}
    assert kinds == {"act1": "relu", "conv2>relu": "relu"} and "re-applied" not in stderr


def test_a_patched_checkpoint_without_model_is_told_to_pass_one(patched: Path) -> None:
    code, _, stderr = run("audit", patched, "--input-shape", "2,3,8,8")
    assert code == 2 and "--model MODULE:FACTORY" in stderr and "usernet.py:build" in stderr
    assert len(stderr.strip().splitlines()) == 1


def _tampered(patched: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    obj = torch.load(patched, weights_only=True)
    change(obj)
    torch.save(obj, tmp_path / "tampered.pth")
    return tmp_path / "tampered.pth"


@pytest.mark.parametrize(
    ("factory", "change", "reason"),
    [
        ("build_renamed", None, "'module:act1' matched no activation module"),
        ("build", lambda o: o["plan"]["ops"][0].update(sites=["module:gone"]), "'module:gone' matched no"),
        ("build", lambda o: o["plan"].update(ops=[{"op": "teleport"}]), "recorded plan is malformed"),
        ("build", lambda o: o.pop("plan"), "records no readable plan"),
        ("build", lambda o: o.update(version=99), "format version 99"),
    ],
    ids=["other-architecture", "site-gone", "malformed-op", "no-plan", "future-version"],
)
def test_a_plan_that_cannot_be_reapplied_exits_2_with_one_line(
    user: Path, patched: Path, tmp_path: Path, factory: str, change: Any, reason: str
) -> None:
    checkpoint = patched if change is None else _tampered(patched, tmp_path, change)
    code, _, stderr = audit_json(checkpoint, user, factory)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "load_patched cannot re-apply" in lines[0] and reason in lines[0]
    assert f"--model {user / 'usernet.py'}:build --model-arg width={WIDTH}" in lines[0]  # what to pass


def test_patching_a_patched_checkpoint_keeps_the_earlier_plan(user: Path, patched: Path, tmp_path: Path) -> None:
    again = tmp_path / "p2.pth"
    code, _, stderr = run("patch", patched, "--model", f"{user / 'usernet.py'}:build", "--input-shape", "2,3,8,8",
                          "--dropout-between-convs", "0.2", "--out", again)  # fmt: skip
    assert code == 0, stderr
    code, report, stderr = audit_json(again, user)
    assert code == 0, stderr
    assert {s["name"]: s["kind"] for s in report["sites"]} == {"act1": "leaky_relu", "conv2>leaky_relu": "leaky_relu"}
    model = deadneuron.load_patched(again, load_user(user / "usernet.py").build)
    assert isinstance(model.act1, torch.nn.LeakyReLU)
    assert [type(h) for h in model.act1._forward_hooks.values()] == [DropoutHook]


def test_load_patched_rebuilds_the_patched_model(user: Path, patched: Path) -> None:
    saved = torch.load(patched, weights_only=True)  # plain types only
    assert saved["model_args"] == {"width": int(WIDTH)} and saved["version"] == 2
    module = load_user(user / "usernet.py")
    model = deadneuron.load_patched(patched, module.build).eval()
    assert isinstance(model.act1, torch.nn.LeakyReLU) and model.act1.negative_slope == 0.01
    state = torch.load(user / "own.pth", weights_only=True)
    x = module.batches()[0]
    _, z2 = pre_activations(state, x, 0.01)
    expected = F.linear(F.leaky_relu(z2, 0.01).mean(dim=(2, 3)), state["head.weight"], state["head.bias"])
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_load_patched_reads_version_1_files(user: Path, patched: Path, tmp_path: Path) -> None:
    def as_version_1(obj: dict[str, Any]) -> None:
        obj.pop("earlier_plans")
        obj["version"] = 1

    model = deadneuron.load_patched(_tampered(patched, tmp_path, as_version_1), load_user(user / "usernet.py").build)
    assert isinstance(model.act1, torch.nn.LeakyReLU)


def test_load_patched_refuses_a_factory_its_plan_does_not_fit(user: Path, patched: Path) -> None:
    with pytest.raises(PatchError, match=r"cannot re-apply .*'module:act1' matched no activation module"):
        deadneuron.load_patched(patched, load_user(user / "usernet.py").build_renamed)


def test_the_audit_command_patch_prints_runs_as_printed(user: Path, tmp_path: Path) -> None:
    out = tmp_path / "printed.pth"
    code, stdout, stderr = run("patch", user / "own.pth", "--model", f"{user / 'usernet.py'}:build", "--model-arg",
                               f"width={WIDTH}", "--input-shape", "2,3,8,8", "--activation", "leaky", "--out", out)  # fmt: skip
    assert code == 0, stderr
    printed = re.search(r"audit it with `([^`]+)`", stdout + stderr)
    assert printed is not None, stdout + stderr
    words = shlex.split(printed.group(1))
    assert words[:3] == ["deadneuron", "audit", str(out)] and "..." not in words
    code, report_json, stderr = run(*words[1:], "--format", "json", "--no-rules")
    assert code == 0, stderr
    kinds = {s["name"]: s["kind"] for s in json.loads(report_json)["sites"]}
    assert kinds == {"act1": "leaky_relu", "conv2>leaky_relu": "leaky_relu"}
