"""The work of each spawned rank in tests/test_monitor_distributed.py: a small CNN trained under
DistributedDataParallel (gloo, CPU) with a deadneuron.Monitor. Each rank saves the inputs it trained on,
the weights of every step and what its monitor reported, for the test to check against plain torch."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import deadneuron

STEPS, EVERY, BATCH, SIDE = 6, 2, 4, 6
SITES = ("relu", "conv2>gelu")


class Net(nn.Module):
    """conv 3->8 -> ReLU (channel 1 planted dead: bias -50) -> conv 8->12 -> GELU -> mean -> linear 12->4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.head = nn.Linear(12, 4)
        with torch.no_grad():
            self.conv1.bias[1] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.conv2(self.relu(self.conv1(x)))).mean((2, 3)))


def oracle_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Plain torch with the weights ``state``: (z1, a1, z2, a2, logits), z1 and z2 requiring grad."""
    z1 = F.conv2d(x, state["conv1.weight"], state["conv1.bias"], padding=1).requires_grad_()
    a1 = torch.relu(z1)
    z2 = F.conv2d(a1, state["conv2.weight"], state["conv2.bias"], padding=1)
    a2 = F.gelu(z2)
    return z1, a1, z2, a2, F.linear(a2.mean((2, 3)), state["head.weight"], state["head.bias"])


def _details(mon: deadneuron.Monitor) -> dict[str, Any]:
    """The last window's per-channel figures, as lists."""
    out = {}
    for site in SITES:
        h, c = mon.last_health[site], mon.last_channels[site]
        assert c.grad_nonzero is not None and c.grad_abs_mean is not None
        out[site] = {
            "n": h.n, "zero": list(h.channel_zero), "mean": list(h.channel_mean), "std": list(h.channel_std),
            "min": list(h.channel_min), "max": list(h.channel_max), "dead": list(h.dead_channels),
            "abs_mean": c.abs_mean.tolist(), "grad_nonzero": c.grad_nonzero.tolist(),
            "grad_abs_mean": c.grad_abs_mean.tolist(),
        }  # fmt: skip
    return out


def _train(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(100 + rank)
    inputs, states, details = [], [], []
    with deadneuron.Monitor(ddp, every=EVERY, optimizer=opt) as mon:
        for _ in range(STEPS):
            x, y = torch.randn(BATCH, 3, SIDE, SIDE, generator=gen), torch.randint(0, 4, (BATCH,), generator=gen)
            inputs.append((x, y))
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mon.step() is not None:
                details.append(_details(mon))
    with deadneuron.Monitor(ddp, every=EVERY, distributed=False) as alone:
        for x, y in inputs[:EVERY]:
            F.cross_entropy(ddp(x), y).backward()
            alone.step()
    return {"inputs": inputs, "states": states, "entries": mon.entries, "details": details,
            "alone_n": alone.snapshots[0].sites["relu"].n}  # fmt: skip


def worker(rank: int, world: int, init: str, out: str) -> None:
    """One rank (gloo, CPU): its results to ``out/monitor{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = _train(rank)
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out, f"monitor{rank}.pt"))
