"""Every `deadneuron patch` command an audit suggests runs as printed, in any order: each writes its own
output (named after its fix, beside the checkpoint), so one command's output never stops another with
"already exists". The commands are taken from the audit's JSON and run for real (no --dry-run) from the
user's folder, whose name holds a space; the input is never modified."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from deadneuron.cli import app

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def build():
    torch.manual_seed(0)
    return Net()


def planted():
    model = build()
    with torch.no_grad():
        model.conv1.bias[1] = -1e3  # never fires
        model.conv2.bias[4] = -1e3
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
'''


def cli(*argv: str) -> Any:
    return CliRunner().invoke(app, list(argv))


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "my runs"
    folder.mkdir()
    (folder / "net.py").write_text(NET)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    import importlib

    module = importlib.import_module("net")
    torch.save(module.planted().state_dict(), folder / "net.pth")
    return folder


def outputs(command: str) -> list[str]:
    words = shlex.split(command)
    return [words[i + 1] for i, w in enumerate(words) if w in ("--out", "--markdown", "--figure")]


def test_every_suggested_command_runs_as_printed_in_any_order(user: Path) -> None:
    result = cli("audit", "net.pth", "--model", "net.py:build", "--data", "net.py:batches", "--format", "json",
                 "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert {s: d for s, d in ((s["name"], s["dead_channels"]) for s in report["sites"]) if d} == {"act1": [1], "act2": [4]}
    commands = list(dict.fromkeys(c for f in report["findings"] for c in f["commands"]))
    assert len(commands) >= 3, commands  # a swap and a re-initialisation per site, a BatchNorm for the stack
    written = [outputs(c) for c in commands]
    assert all(len(w) == 1 for w in written), commands  # each names its one output
    paths = [Path(w[0]) for w in written]
    assert len(set(paths)) == len(paths), "two suggested commands write the same file"
    assert all(p.parent == Path(".") and p.name.startswith("net_") and p.suffix == ".pth" for p in paths)
    assert not any(p.exists() for p in paths)
    before = (user / "net.pth").read_bytes()
    for command in reversed(commands):  # the order the report does not print them in
        words = shlex.split(command)
        assert words[:2] == ["deadneuron", "patch"]
        run = cli(*words[1:], "--no-progress")
        assert run.exit_code == 0, f"{command}\n{run.stderr}"
    assert all(p.exists() for p in paths)
    assert (user / "net.pth").read_bytes() == before, "the input is never modified"
    states = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    assert len({tuple(sorted(s)) for s in states}) >= 2, "different fixes, different patched models"
