"""Where deadneuron.Monitor's time goes in a training step: thread CPU time per part, per step.

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.monitor_profile [--steps 60] [--every 1]

The model, batches and optimizer of benchmarks/monitor_overhead.py (the ARC-like CNN, 16x10x30x30, Adam,
one thread). A plain copy and a monitored copy train side by side, one step each in turn; each part of the
monitor is timed by wrapping it with the thread's CPU clock: the Recorder's activation hooks (with the
native statistics kernel inside them, also shown alone, and the monitor's observer), the Recorder's hooks
on the other modules, the gradient-flow sums (the tensor hooks on z), the monitor's gates on the model,
and ``mon.step()`` (which takes the snapshots). Printed: the medians over the steps, in ms and as a share
of the plain step. Parts overlap where one runs inside another (as said in their names); what no part
covers (autograd calling the hooks, caches the monitor's passes evict) is the rest of the difference.
Run it from the repository root to measure this checkout's deadneuron. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import deadneuron
from benchmarks.monitor_overhead import _STEADY, ArcCNN, Side, _plain_step, steady_exec

CLOCK = time.thread_time
# (module, class name, method, part): private names of their modules, skipped where a version lacks one
PARTS = (
    ("deadneuron._native", "NativeStats", "update", "native statistics kernel (in the activation hooks)"),
    ("deadneuron.probe.recorder", "Recorder", "_activation_pre_hook", "activation hooks"),
    ("deadneuron.probe.recorder", "Recorder", "_activation_hook", "activation hooks"),
    ("deadneuron.gradflow", "FlowObserver", "before", "observer (in the activation hooks)"),
    ("deadneuron.gradflow", "FlowObserver", "after", "observer (in the activation hooks)"),
    ("deadneuron.probe.recorder", "Recorder", "_enter_hook", "hooks on the other modules"),
    ("deadneuron.probe.recorder", "Recorder", "_exit_hook", "hooks on the other modules"),
    ("deadneuron.probe.recorder", "Recorder", "_leaf_enter_hook", "hooks on the other modules"),
    ("deadneuron.probe.recorder", "Recorder", "_leaf_exit_hook", "hooks on the other modules"),
    ("deadneuron.gradflow", "SiteFlow", "add_grad", "gradient-flow sums"),
    ("deadneuron.monitor", "Monitor", "_gate_enter", "monitor gates"),
    ("deadneuron.monitor", "Monitor", "_gate_exit", "monitor gates"),
)


def _timed(owner: type, method: str, part: str, spent: dict[str, float]) -> None:
    original = getattr(owner, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = CLOCK()
        try:
            return original(*args, **kwargs)
        finally:
            spent[part] = spent.get(part, 0.0) + CLOCK() - start

    setattr(owner, method, wrapper)


def _wrap_parts(spent: dict[str, float]) -> None:
    import importlib

    for module, name, method, part in PARTS:
        owner = getattr(importlib.import_module(module), name, None)
        if owner is not None and hasattr(owner, method):
            _timed(owner, method, part, spent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=1, help="snapshot every N steps (1: after every step)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    if any(os.environ.get(k) != v for k, v in _STEADY.items()):
        steady_exec()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spent: dict[str, float] = {}
    _wrap_parts(spent)
    base = ArcCNN()
    gen = torch.Generator().manual_seed(0)
    pool = [(torch.randn(args.batch, 10, 30, 30, generator=gen), torch.randint(0, 10, (args.batch, 30, 30), generator=gen))
            for _ in range(20)]  # fmt: skip
    cpu = torch.device("cpu")
    plain, monitored = Side(copy.deepcopy(base), cpu, CLOCK), Side(copy.deepcopy(base), cpu, CLOCK)
    per_part: dict[str, list[float]] = {}
    tp: list[float] = []
    tm: list[float] = []
    with deadneuron.Monitor(monitored.model, every=args.every, optimizer=monitored.opt) as mon:
        for i in range(args.steps + 3):
            x, y = pool[i % len(pool)]
            p = _plain_step(plain, x, y)
            spent.clear()
            m = monitored.step(x, y)
            start = CLOCK()
            mon.step()
            spent["mon.step() (the snapshots)"] = CLOCK() - start
            if i < 3:  # warm-up
                continue
            tp.append(p)
            tm.append(m + spent["mon.step() (the snapshots)"])
            for part, seconds in spent.items():
                per_part.setdefault(part, []).append(seconds)
    plain_ms, monitored_ms = 1e3 * statistics.median(tp), 1e3 * statistics.median(tm)
    print(f"deadneuron from {os.path.dirname(deadneuron.__file__)}")
    print(f"torch {torch.__version__}, one thread, batch {args.batch}x10x30x30, {args.steps} steps, snapshot every "
          f"{args.every}: plain step {plain_ms:.1f} ms, monitored {monitored_ms:.1f} ms "
          f"({monitored_ms / plain_ms:.3f}x)")  # fmt: skip
    _print(per_part, plain_ms)


def _print(per_part: dict[str, list[float]], plain_ms: float, out: Callable[[str], None] = print) -> None:
    for part, seconds in sorted(per_part.items(), key=lambda kv: -statistics.median(kv[1])):
        ms = 1e3 * statistics.median(seconds)
        out(f"  {part:<52} {ms:6.2f} ms  {100 * ms / plain_ms:4.1f}%")


if __name__ == "__main__":
    main()
