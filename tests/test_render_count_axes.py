"""Axes that count channels show whole numbers from 0: no 0.2-channel ticks and no negative counts when
nothing is dead (the monitor's timeline figure, the audit's per-site health figure)."""

from __future__ import annotations

import torch
from torch import nn

import deadneuron
from deadneuron.render.plots import plot_site_health
from deadneuron.render.timeline_plots import plot_monitor_timeline


def _whole_from_zero(axis_ticks: list[float], low: float) -> bool:
    """Whole, non-negative ticks; the axis may start just below 0 (a line at 0 kept clear of the frame)."""
    return low > -0.5 and all(float(t).is_integer() and t >= 0 for t in axis_ticks)


def test_the_timeline_s_dead_channel_panel_counts_whole_channels_from_zero() -> None:
    site = {"kind": "relu", "channels": 16, "n": 80, "dead": 0, "dead_channels": [], "flat_fraction": 0.5,
            "tau_dormant": 0, "grad_nonzero": 0.5}  # fmt: skip
    entries = [{"step": s, "first_step": s - 10, "sites": {"a": dict(site), "b": dict(site)}} for s in (10, 20)]
    dead_ax, _, tau_ax, _ = plot_monitor_timeline(entries).axes[:4]
    ticks = [t for t in dead_ax.get_yticks() if dead_ax.get_ylim()[0] <= t <= dead_ax.get_ylim()[1]]
    assert _whole_from_zero(ticks, dead_ax.get_ylim()[0]), (ticks, dead_ax.get_ylim())
    low, high = tau_ax.get_ylim()  # a share of channels: no negative percentages either
    assert all(t >= 0 for t in tau_ax.get_yticks() if low <= t <= high) and low > -0.05 * high


def test_the_site_health_channel_axis_counts_whole_channels() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    with torch.no_grad():  # each channel fires on one of the inputs: none dead, none dormant
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        model[0].bias.zero_()
    report = deadneuron.audit(model, [torch.tensor([[1.0, 1.0], [-1.0, -1.0]])])
    assert report.summary.dead == 0 and report.summary.dormant == 0
    right = plot_site_health(report).axes[1]
    ticks = [t for t in right.get_xticks() if right.get_xlim()[0] <= t <= right.get_xlim()[1]]
    assert _whole_from_zero(ticks, right.get_xlim()[0]), ticks
