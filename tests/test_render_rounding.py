"""Percentages that round to 0.0% or 100.0% must not hide a measured count: a site 99.98% flat with one
channel still firing is not "100.0%" flat, and 1 dead channel of 2500 is not "(0.0%)" dead."""

from __future__ import annotations

import re

import torch
from torch import nn

import deadneuron
from deadneuron.render.html import render_html
from deadneuron.render.markdown import render_markdown


def _near_all_flat() -> deadneuron.Report:
    """Linear(2, 2) as the identity into a ReLU: channel 0 fires on 1 of 2500 rows, channel 1 never."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
        lin.bias.zero_()
    x = -torch.ones(2500, 2)
    x[0, 0] = 1.0
    return deadneuron.audit(nn.Sequential(lin, nn.ReLU()), [x], compile=False)


def _one_dead_of_many() -> deadneuron.Report:
    """Linear(1, 2500) into a ReLU: channel 7 planted dead (weight 0, bias -1), the rest fire on x = 1."""
    lin = nn.Linear(1, 2500)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.zero_()
        lin.weight[7] = 0.0
        lin.bias[7] = -1.0
    return deadneuron.audit(nn.Sequential(lin, nn.ReLU()), [torch.ones(4, 1)], compile=False)


def test_near_all_flat_site_is_not_shown_as_100_percent() -> None:
    report = _near_all_flat()
    (site,) = report.sites.values()
    assert site.dead_channels == (1,) and site.dormant_channels == (0,)  # oracle: planted above
    assert 0 < 1 - site.flat_fraction < 0.0005  # 4999 of 5000 elements flat
    for text in (render_markdown(report), render_html(report)):
        assert "100.0%" not in text


def test_one_dead_channel_of_thousands_is_not_shown_as_0_percent() -> None:
    report = _one_dead_of_many()
    (site,) = report.sites.values()
    assert site.dead_channels == (7,)
    for text in (render_markdown(report), render_html(report)):
        assert not re.search(r"\b0\.0%", text), re.findall(r".{60}\b0\.0%.{20}", text)
