"""A suggested ``deadneuron patch`` command must name the model it patches. A monitor's findings over the
user's own model suggested ``deadneuron patch --activation leaky ... --out checkpoints/slot_attention_...``: run
as printed it patches the bundled demo model, not theirs; so did `deadneuron.evaluate` of a report that names no
checkpoint. Now a monitor's fixes are checked against the model, as a Python audit's are, a report without a
source gets no command, and a report that names its checkpoint gets commands naming it."""

from __future__ import annotations

import torch
from torch import nn

import deadneuron
from deadneuron.rules import evaluate


def _dead_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].bias[:6] = -100.0  # channels 0-5 dead on any input of this scale
    return model


def test_a_monitor_of_your_own_model_suggests_no_command_for_another() -> None:
    model = _dead_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with deadneuron.Monitor(model, optimizer=opt, every=5) as mon:
        for _ in range(10):
            loss = model(torch.randn(32, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    findings = mon.findings()
    dead = [f for f in findings if f.rule == "dead-relu"]
    assert dead and dead[0].fixes  # the fixes are still there to read
    assert all(not f.commands for f in findings)


def test_a_python_audit_gets_no_command_and_a_report_naming_its_checkpoint_gets_it() -> None:
    """`deadneuron.evaluate` of a report that names no checkpoint (``rules=False``, then the rule engine)
    wrote the demo's commands too."""
    batches = [torch.randn(32, 8)]
    assert all(not f.commands for f in deadneuron.audit(_dead_mlp().eval(), batches, progress=False).findings)
    bare = deadneuron.audit(_dead_mlp().eval(), batches, progress=False, rules=False)
    found = evaluate(bare)
    assert any(f.fixes for f in found) and all(not f.commands for f in found)
    named = deadneuron.audit(_dead_mlp().eval(), batches, progress=False, rules=False, meta={"source": "runs/mine.pth"})
    commands = [c for f in evaluate(named) for c in f.commands]
    assert commands and all(c.startswith("deadneuron patch runs/mine.pth ") and "slot_attention" not in c for c in commands)
