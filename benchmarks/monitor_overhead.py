"""Training-step overhead of deadneuron.Monitor, as a ratio to the same steps without it, in one process.

    python -m benchmarks.monitor_overhead [--threads 1] [--rounds 5] [--batch 16] [--device cpu|cuda]
                                          [--clock wall|cpu] [--setting "every step" ...]

The model is the ARC-like CNN (4 x conv 3x3 64 + ReLU, then a 1x1 conv to 10 classes per cell) on
(batch, 10, 30, 30) one-hot-like inputs, trained with Adam and a per-cell cross-entropy. Two copies with
the same initial weights train side by side on the same batches, one step each in turn (which goes first
alternates between rounds): one plainly, the other inside ``with Monitor(...)`` calling ``mon.step()``
after each optimizer step. A round is N steps of each (one snapshot window at every=100). Each step is
timed on its own; a round's figure per side is its median step time (for the monitor: the medians of
its measured and of its other steps, weighted by their counts, plus the mean time of the ``mon.step()``
calls, which take the snapshots), so that bursts of other processes on a shared machine do not decide
the ratio. Reported per setting: each side's median over rounds and the median of the per-round ratios
(with their range). Settings: a snapshot every step; every 100 steps measuring every
step; every 100 steps measuring every 10th step (``sample_every=10``). The snapshots' cost is in the
``mon.step()`` times, amortised over the steps. Allocator settings as in benchmarks/overhead.py.
``--clock cpu`` times each step by the calling thread's CPU time instead of the wall clock (with one
thread on the CPU every op of the step, backward included, runs on that thread): on a shared machine
the wall clock mostly measures the other processes, the CPU time far less so.
Nothing here is asserted: it prints figures for the README.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import deadneuron

_STEADY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
SETTINGS = (("every step", 1, 1, 20), ("every 100", 100, 1, 100), ("every 100, sample 10", 100, 10, 100))


class ArcCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(10 if i == 0 else 64, 64, 3, padding=1) for i in range(4))
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(64, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.relu(conv(x))
        return self.head(x)


def steady_exec() -> None:
    """Run this command again with the steady allocator settings, importing this checkout's deadneuron
    (the repository root first on the path: run as a script, the path would start at benchmarks/ and an
    installed deadneuron, maybe another checkout's, would be measured instead)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_STEADY, "PYTHONPATH": path})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Side:
    """One model and its optimizer, trained on the shared batches; ``clock`` times its steps."""

    def __init__(self, model: nn.Module, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model.to(device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.device = device
        self.clock = clock

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        _sync(self.device)
        start = self.clock()
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        _sync(self.device)
        return self.clock() - start


def _plain_step(side: Side, x: torch.Tensor, y: torch.Tensor) -> float:
    # The monitored side's functional probe (a TorchFunctionMode) is on the stack between its steps; the
    # plain side must not pay for it, so torch-function handling is off for its steps.
    with torch._C.DisableTorchFunction():
        return side.step(x, y)


def _round(plain: Side, monitored: Side, mon: deadneuron.Monitor, batches: list[tuple[torch.Tensor, torch.Tensor]],
           sample: int, flip: bool) -> tuple[float, float]:  # fmt: skip
    """Seconds per step of each side over one round, steps interleaved one by one. Robust to other
    processes' bursts: the median training-step time (for the monitor, of its measured and other steps
    separately, weighted by their counts) plus, for the monitor, the mean time of ``mon.step()``."""
    tp: list[float] = []
    measured: list[float] = []
    other: list[float] = []
    calls: list[float] = []
    for x, y in batches:
        if flip:
            tp.append(_plain_step(plain, x, y))
        sampled = mon.steps % sample == 0
        (measured if sampled else other).append(monitored.step(x, y))
        start = monitored.clock()
        mon.step()
        calls.append(monitored.clock() - start)
        if not flip:
            tp.append(_plain_step(plain, x, y))
    parts = [statistics.median(t) * len(t) for t in (measured, other) if t]
    return statistics.median(tp), sum(parts) / len(batches) + statistics.fmean(calls)


def measure(base: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], rounds: int, every: int,
            sample: int, device: torch.device, clock: Callable[[], float]) -> dict[str, float]:  # fmt: skip
    plain, monitored = Side(copy.deepcopy(base), device, clock), Side(copy.deepcopy(base), device, clock)
    tp, tm, ratios = [], [], []
    with deadneuron.Monitor(monitored.model, every=every, sample_every=sample, optimizer=monitored.opt) as mon:
        _round(plain, monitored, mon, batches[: every if every > 1 else 2], sample, False)  # warm-up
        for r in range(rounds):
            p, m = _round(plain, monitored, mon, batches, sample, r % 2 == 1)
            tp.append(p)
            tm.append(m)
            ratios.append(m / p)
    return {"plain": statistics.median(tp), "monitor": statistics.median(tm), "ratio": statistics.median(ratios),
            "lo": min(ratios), "hi": max(ratios), "snapshots": len(mon.snapshots)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--malloc", choices=("steady", "system"), default="steady")
    ap.add_argument("--setting", action="append", choices=[name for name, *_ in SETTINGS],
                    help="run only this setting (repeatable; default: all)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this thread's CPU time (CPU device, one thread: steadier on a shared machine)")
    args = ap.parse_args()
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        ap.error("--clock cpu measures the calling thread: use it with --device cpu --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.malloc == "steady" and any(os.environ.get(k) != v for k, v in _STEADY.items()):
        steady_exec()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = ArcCNN()
    gen = torch.Generator().manual_seed(0)
    pool = [(torch.randn(args.batch, 10, 30, 30, generator=gen), torch.randint(0, 10, (args.batch, 30, 30), generator=gen))
            for _ in range(100)]  # fmt: skip
    pool = [(x.to(device), y.to(device)) for x, y in pool]
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, batch {args.batch}x10x30x30, "
          f"{args.rounds} rounds, allocator {args.malloc}, clock {args.clock}, deadneuron from "
          f"{Path(deadneuron.__file__).parent}")
    print(f"{'setting':<22} {'steps/round':>11} {'plain ms':>9} {'monitor ms':>10} {'ratio':>6} {'range':>13}")
    for name, every, sample, steps in SETTINGS:
        if args.setting and name not in args.setting:
            continue
        r = measure(base, pool[:steps], args.rounds, every, sample, device, clock)
        print(f"{name:<22} {steps:>11} {1e3 * r['plain']:9.1f} {1e3 * r['monitor']:10.1f} {r['ratio']:6.3f} "
              f"{r['lo']:6.3f}-{r['hi']:.3f}", flush=True)


if __name__ == "__main__":
    main()
