"""The `axis-guessed` finding tells how to set the axis with a command that runs as printed: the audit's
own command line (the user's model, its arguments and data, the flags that chose what was measured) with
``--channel-axis 'SITE=AXIS'`` added, AXIS the one word to fill in from the dims the text lists; from
Python, the `deadneuron.audit` keyword. The command is taken from the audit's JSON output, AXIS replaced
by the channel dim, and run: the site's axis is then the user's, the finding is gone, and the dead
channels are those a plain-torch oracle finds along that dim (planted by a large shift)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.rules import attach_findings

# A layer of unknown layout (Shift) feeds F.relu, so the site is named `shift>relu` (quoted in a shell)
# and its channel axis is guessed: the last dim of the 3-D input (L = 10), not the channels (C).
USER_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class Shift(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(channels, 1))

    def forward(self, x):
        return x - self.shift


class Net(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.shift = Shift(channels)

    def forward(self, x):
        return F.relu(self.shift(x))


def build(channels: int = 4):
    return Net(channels)


def batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(3, 6, 10, generator=g) for _ in range(2)]
'''
DEAD = [1, 4]
SITE = "shift>relu"


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("axis_user_model", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    folder = tmp_path_factory.mktemp("axis user")  # a space in the path: the command must quote it
    source = folder / "net.py"
    source.write_text(USER_MODEL)
    module = load(source)
    model = module.build(6)
    with torch.no_grad():
        model.shift.shift[DEAD] = 100.0
    torch.save(model.state_dict(), folder / "net.pth")
    return folder / "net.pth", source, module


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def guessed(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["rule"] == "axis-guessed"]


def test_the_printed_channel_axis_command_runs_and_sets_the_axis(user: tuple[Path, Path, Any]) -> None:
    ckpt, source, module = user
    subject = [str(ckpt), "--model", f"{source}:build", "--model-arg", "channels=6", "--data", f"{source}:batches"]
    measured = ["--select", "relu", "--channel-axis", "nothing.*=-1", "--eps", "1e-07"]  # what the audit measured
    code, out, err = cli("audit", *subject, *measured, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    (site,) = report["sites"]
    assert (site["name"], site["axis_source"], site["channel_axis"], site["shape"]) == (SITE, "guessed", 2, [3, 6, 10])
    (finding,) = guessed(report)
    assert "AXIS: one of 0..2 for input (3, 6, 10)" in finding["message"]
    found = re.search(r"(deadneuron audit .*?--channel-axis '[^']*=AXIS')", finding["message"])
    assert found is not None, finding["message"]
    words = shlex.split(found.group(1))
    assert "..." not in words
    assert words == ["deadneuron", "audit", *subject, *measured, "--channel-axis", f"{SITE}=AXIS"]

    code, out, err = cli(*[w.replace("=AXIS", "=1") for w in words[1:]], "--format", "json")
    assert code == 0, err
    fixed = json.loads(out)
    (site,) = fixed["sites"]
    assert (site["axis_source"], site["channel_axis"], site["channels"]) == ("user", 1, 6)
    assert guessed(fixed) == [] and fixed["meta"]["eps"] == 1e-07
    x = torch.cat([b.transpose(0, 1).reshape(6, -1) for b in module.batches()], dim=1)  # (C, N*L)
    shift = torch.zeros(6, 1)
    shift[DEAD] = 100.0
    oracle = [c for c in range(6) if bool((x[c] - shift[c] <= 0).all())]
    assert oracle == DEAD and site["dead_channels"] == oracle


def test_an_audit_from_python_gets_the_python_keyword(user: tuple[Path, Path, Any]) -> None:
    ckpt, _, module = user
    model = module.build(6)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    report = attach_findings(deadneuron.audit(model, module.batches(), progress=False))
    (finding,) = [f for f in report.findings if f["rule"] == "axis-guessed"]
    assert f"deadneuron.audit(..., channel_axis={{'{SITE}': AXIS}})" in finding["message"]
    assert "AXIS: one of 0..2 for input (3, 6, 10)" in finding["message"]
    assert "deadneuron audit" not in finding["message"], "no command line to repeat"
    fixed = deadneuron.audit(model, module.batches(), progress=False, channel_axis={SITE: 1})
    assert fixed.sites[SITE].axis_source == "user" and list(fixed.sites[SITE].dead_channels) == DEAD
