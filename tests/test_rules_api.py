"""Rules in the Python API: `deadneuron.audit(..., rules=True)` fills `report.findings` with typed
Findings identical to the CLI's (but for the command lines, which only a command line has), the README's
`plan_from_findings(report.findings)` fixes what was planted, and Findings read back typed from JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.cli._subject import import_object
from deadneuron.patch import SwapActivation, apply_plan, plan_from_findings
from deadneuron.report import Report
from deadneuron.rules import Finding, Severity

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU()      # shared: conv1>act and conv2>act
        self.fc = nn.Linear(6, 5)
        self.relu = nn.ReLU()
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.out(self.relu(self.fc(x.mean(dim=(2, 3)))))


def build():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.conv2.bias[4] = -1e3   # dead at conv2>act only
        model.fc.bias[1:3] = -1e3    # dead at relu
    return model


def batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 6, 6, generator=gen) for _ in range(2)]
'''


@pytest.fixture
def user_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "net.py").write_text(textwrap.dedent(MODEL))
    monkeypatch.chdir(tmp_path)  # no pyproject.toml above: default thresholds for both paths
    return tmp_path / "net.py"


def planted_dead(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, set[int]]:
    """The oracle: channels never above 0, from the model's own tensors (forward hooks, plain torch)."""
    seen: dict[str, list[torch.Tensor]] = {"conv1": [], "conv2": [], "fc": []}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: seen[n].append(o.detach())) for n in seen]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    out = {}
    for name, outs in seen.items():
        z = torch.cat([o.movedim(1, -1).reshape(-1, o.shape[1]) for o in outs])
        out[name] = set(np.flatnonzero((z <= 0).all(dim=0).numpy()).tolist())
    return out


def test_audit_fills_typed_findings_and_plan_from_findings_fixes_the_planted_site(user_model: Path) -> None:
    build, batches = import_object(f"{user_model}:build", option="--model"), import_object(f"{user_model}:batches", option="--data")
    model, data = build(), batches()
    oracle = planted_dead(model, data)
    assert not oracle["conv1"] and {4} <= oracle["conv2"] and {1, 2} <= oracle["fc"]  # the planted ones at least
    report = deadneuron.audit(model, data, progress=False)
    assert report.findings and all(isinstance(f, Finding) for f in report.findings)
    dead = {s: set(ids) for f in report.findings if f.rule == "dead-relu" for s, ids in f.channels.items()}
    assert dead == {"conv2>act": oracle["conv2"], "relu": oracle["fc"]}
    assert all(not f.commands for f in report.findings)  # no command line in Python; the fixes are there
    shared = next(f for f in report.findings if f.sites == ("conv2>act",))
    assert not any(isinstance(op, SwapActivation) for fix in shared.fixes for op in fix.ops)
    assert "act also runs at conv1>act" in shared.withheld[0]

    plan = plan_from_findings(report.findings)  # the README's line
    assert plan.get(SwapActivation) is not None and plan.get(SwapActivation).sites == ("module:relu",)
    patched = apply_plan(model, plan, report=report, example=data[0]).model
    assert isinstance(patched.relu, torch.nn.LeakyReLU) and isinstance(patched.act, torch.nn.ReLU)


def test_rules_false_leaves_findings_empty(user_model: Path) -> None:
    model = import_object(f"{user_model}:build", option="--model")()
    data = import_object(f"{user_model}:batches", option="--data")()
    assert deadneuron.audit(model, data, progress=False, rules=False).findings == ()


def test_api_findings_are_the_clis_but_for_the_command_lines(user_model: Path) -> None:
    model = import_object(f"{user_model}:build", option="--model")()
    data = import_object(f"{user_model}:batches", option="--data")()
    torch.save(model.state_dict(), user_model.parent / "net.pth")
    result = CliRunner().invoke(app, ["audit", "net.pth", "--model", "net.py:build", "--data", "net.py:batches",
                                      "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    cli = [Finding.from_dict(f) for f in json.loads(result.stdout)["findings"]]
    api = list(deadneuron.audit(model, data, progress=False).findings)
    assert [f.rule for f in cli] == [f.rule for f in api] and len(cli) >= 3
    assert [dataclasses.replace(f, commands=()) for f in cli] == api
    assert all(len(f.commands) == len(f.fixes) for f in cli)
    assert any(c.startswith("deadneuron patch net.pth --model net.py:build --data net.py:batches ") for f in cli for c in f.commands)


def test_findings_round_trip_typed_through_json(user_model: Path) -> None:
    model = import_object(f"{user_model}:build", option="--model")()
    report = deadneuron.audit(model, import_object(f"{user_model}:batches", option="--data")(), progress=False)
    again = Report.from_json(report.to_json())
    assert again.findings == report.findings
    assert all(isinstance(f, Finding) and isinstance(f.severity, Severity) for f in again.findings)
    assert [f.to_dict() for f in again.findings] == json.loads(report.to_json())["findings"]
    assert plan_from_findings(again.findings) == plan_from_findings(report.findings)
    as_dicts = report.with_findings([f.to_dict() for f in report.findings])  # dicts read back as Findings
    assert as_dicts.findings == report.findings and as_dicts.findings[0]["rule"] == report.findings[0].rule


def test_older_and_partial_findings_read_with_what_they_hold() -> None:
    old = {"id": "dead-channels", "severity": "error", "title": "5 dead", "message": "m", "commands": ["deadneuron patch x"]}
    f = Finding.from_dict(old)
    assert (f.rule, f.severity, f.title, f.commands, f.fixes) == ("dead-channels", Severity.ERROR, "5 dead", ("deadneuron patch x",), ())
    nan = Finding.from_dict({"rule": "r", "evidence": [{"metric": "x", "observed": None, "threshold": 1, "comparison": ">="}]})
    assert math.isnan(nan.evidence[0].observed)
    with pytest.raises(ValueError, match="malformed finding 'r'"):
        Finding.from_dict({"rule": "r", "severity": "catastrophic"})
