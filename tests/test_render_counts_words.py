"""Counts read as words: one site is "1 site" in the Markdown and terminal summaries, never "1 sites"."""

from __future__ import annotations

import io

import torch
from rich.console import Console
from torch import nn

import deadneuron
from deadneuron.render.markdown import render_markdown
from deadneuron.render.terminal import render


def _report(dead: bool) -> deadneuron.Report:
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(-1.0 if dead else 1.0)
    return deadneuron.audit(nn.Sequential(layer, nn.ReLU()), [torch.randn(8, 4)], rules=False)


def test_one_site_is_one_site() -> None:
    for dead in (False, True):
        report = _report(dead)
        out = io.StringIO()
        render(report, Console(file=out, width=200))
        for text in (render_markdown(report), out.getvalue()):
            assert "1 sites" not in text
            assert ("in 1 of 1 site" if dead else "(of 1 site)") in text
            assert "8 samples in 1 batch;" in text



def test_one_more_command_is_one_command() -> None:
    """A finding group with commands beyond the one shown: "and 1 more command", "and 2 more commands"."""
    from deadneuron.render.findings_view import FindingGroup
    from deadneuron.render.terminal import group_block
    from deadneuron.rules.model import Severity

    for count, words in ((2, "and 1 more command (--verbose)"), (3, "and 2 more commands (--verbose)")):
        group = FindingGroup("dead-relu", Severity.WARNING, "Dead ReLU channels", (),
                             tuple(f"deadneuron patch m.pth --fix {k}" for k in range(count)), (), ("s",))  # fmt: skip
        out = io.StringIO()
        Console(file=out, width=200).print(group_block(group, seen=set()))
        assert words in out.getvalue()
