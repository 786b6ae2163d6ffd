"""A figure the monitor could not measure is reported as not measured, never as 0. Under reentrant
activation checkpointing (`torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`) the forward pass
runs without autograd and is recomputed inside backward, where the monitor does not measure: no gradient
reaches the sites it measured, so their gradient flow and their channels not learning are n/a (None in
the snapshots and their JSONL, empty in CSV, NaN in the timeline frame, n/a in `deadneuron timeline`
and the figure, left out of the logged metrics), and the not-learning rule neither fires nor passes on
them. Without checkpointing the same run measures them, equal to a plain-torch oracle over the gradients
of the pre-activations the model stored itself. Planted: channel 3 of b1 is alive but nothing downstream
reads it (its outgoing weights are 0), so it gets exactly zero gradient."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from typer.testing import CliRunner

import deadneuron
from deadneuron.cli import app
from deadneuron.integrations import CsvWriter, JsonlWriter, read_log, snapshot_metrics
from deadneuron.render.timeline_plots import plot_monitor_timeline

matplotlib.use("Agg")
UNUSED = 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(12, 12), nn.ReLU()
        self.z: list[torch.Tensor] = []  # the pre-activations of the forward passes that train (not recomputed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        if z.requires_grad:
            z.retain_grad()
            self.z.append(z)
        return self.act(z)


class Net(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.b1, self.b2, self.out = Block(), Block(), nn.Linear(12, 1)
        with torch.no_grad():
            self.b1.fc.bias[UNUSED] = 5.0  # alive
            self.b2.fc.weight[:, UNUSED] = 0.0  # nothing reads it
            self.b2.fc.weight.register_hook(lambda g: g.index_fill(1, torch.tensor([UNUSED]), 0.0))  # stays unread

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.b1, self.b2):
            plain = self.mode == "none" or (self.mode == "b1-reentrant" and block is self.b2)
            x = block(x) if plain else checkpoint(block, x, use_reentrant=self.mode != "non-reentrant")
        return self.out(x)


def train(mode: str, folder: Path) -> tuple[deadneuron.Monitor, Net]:
    torch.manual_seed(0)
    model = Net(mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [torch.randn(8, 12) for _ in range(6)]
    writers = [JsonlWriter(folder / "log.jsonl"), CsvWriter(folder / "log.csv")]
    with pytest.warns(RuntimeWarning) if mode == "reentrant" else contextlib.nullcontext(), \
            deadneuron.Monitor(model, every=3, writers=writers) as mon:  # fmt: skip
        for x in data:
            x = x.requires_grad_(mode == "reentrant")  # reentrant checkpointing needs an input that requires grad
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    return mon, model


def oracle_not_learning(block: Block, window: slice) -> list[int]:
    """Channels whose stored pre-activation got exactly zero gradient on every element of the window."""
    grads = torch.cat([z.grad.reshape(-1, 12) for z in block.z[window]])  # type: ignore[union-attr]
    return np.flatnonzero((grads == 0).all(0).numpy()).tolist()


def not_learning_finding(mon: deadneuron.Monitor) -> list[Any]:
    return [f for f in mon.findings() if f.rule == "not-learning"]


def test_without_checkpointing_not_learning_is_measured(tmp_path: Path) -> None:
    mon, model = train("none", tmp_path)
    for entry, window in zip(mon.entries, (slice(0, 3), slice(3, 6)), strict=True):
        site = entry["sites"]["b1.act"]
        assert site["grad_elements"] == 3 * 8
        assert site["not_learning_channels"] == oracle_not_learning(model.b1, window) == [UNUSED]
        assert site["not_learning"] == 1
    (finding,) = not_learning_finding(mon)
    assert dict(finding.channels)["b1.act"] == (UNUSED,)
    assert not [w for w in mon.warnings if "no gradient reached" in w]


def test_under_reentrant_checkpointing_not_learning_is_not_measured(tmp_path: Path) -> None:
    mon, _ = train("reentrant", tmp_path)
    sites = {name for entry in mon.entries for name in entry["sites"]}
    assert sites == {"b1.act", "b2.act"}
    for entry in mon.entries:
        for site in entry["sites"].values():
            assert site["n"] == 3 * 8 and site["grad_elements"] == 0  # measured forward, no gradient
            assert site["not_learning"] is None and site["not_learning_channels"] is None
            assert site["grad_nonzero"] is None and site["grad_abs_mean"] is None
    assert all(s.not_learning is None for snap in mon.snapshots for s in snap.sites.values())
    assert not_learning_finding(mon) == [], "an unmeasured figure fires no rule"
    (note,) = [w for w in mon.warnings if "no gradient reached" in w]
    assert "not measured (n/a, not 0)" in note and "use_reentrant=False" in note

    # JSONL: null; CSV: empty; read back: not measured, not 0
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(s["not_learning"] is None for line in lines for s in line["sites"].values())
    for log in ("log.jsonl", "log.csv"):
        entries = read_log(tmp_path / log)
        assert all(s.get("not_learning") is None for e in entries for s in e["sites"].values()), log
    assert mon.timeline["not_learning"].isna().all() and mon.timeline["grad_nonzero"].isna().all()
    metrics = snapshot_metrics(mon.snapshots[-1])
    assert not [k for k in metrics if "/not_learning/" in k or "/grad_" in k], "nothing logged as a measured 0"
    assert metrics["deadneuron/dead/all"] == sum(s["dead"] for s in mon.entries[-1]["sites"].values())  # measured

    result = CliRunner().invoke(app, ["timeline", str(tmp_path / "log.jsonl")])
    assert result.exit_code == 0, result.stderr
    header, *rows = result.stdout.splitlines()[1:]
    assert "not_learning" in header.split() and all(row.split()[header.split().index("not_learning")] == "n/a" for row in rows)
    fig = plot_monitor_timeline(mon.entries)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "grad nonzero: n/a (not measured)" in texts


def test_a_partly_measured_window_names_the_sites_without_gradient() -> None:
    """Checkpointing one block only: the other's figures are measured, the checkpointed block's are n/a."""
    torch.manual_seed(0)
    model = Net("b1-reentrant")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="no gradient reached b1.act in a window"), \
            deadneuron.Monitor(model, every=None) as mon:  # fmt: skip
        for _ in range(2):
            loss = model(torch.randn(8, 12, requires_grad=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
        mon.snapshot()
    (entry,) = mon.entries
    assert entry["sites"]["b1.act"]["not_learning"] is None
    b2 = entry["sites"]["b2.act"]
    assert b2["grad_elements"] == 16 and b2["not_learning_channels"] == oracle_not_learning(model.b2, slice(0, 2))
    metrics = snapshot_metrics(mon.snapshots[-1])
    assert "deadneuron/not_learning/b2.act" in metrics and "deadneuron/not_learning/b1.act" not in metrics
    assert "deadneuron/not_learning/all" not in metrics, "a total over sites some of which were not measured"
    fig = plot_monitor_timeline(mon.entries)
    assert any(t.get_text().startswith("n/a (not measured): b1.act") for ax in fig.axes for t in ax.texts)
