"""What each part of an audit costs, found by taking it out: per-batch pairs of a plain forward and the same
batch inside the audit's Recorder, once as it is and once with each part switched off, on the models of the
overhead suite.

    python -m benchmarks.ablation [--models resnet18,slot] [--pairs 100] [--clock cpu] [--threads 1]
        (from the repository root)

Every pair runs one batch plain and then inside each variant's Recorder (entered and left around the batch,
as the monitor does, under the padding mask the audit would take; set-up and reports are left out), the order reversed every other pair, the first two
pairs left out; each figure is the median over pairs of (variant's time / the plain forward's, same pair).
By default the clock is this process's CPU time: on a shared virtual machine the wall clock also counts the
time other tenants held the core, which moves a figure by more than a part costs. The variants:

* ``audit``: the Recorder as `deadneuron.audit` runs it;
* ``no kernel``: the statistics' C kernel calls return at once (the Python that prepares them still runs);
* ``no statistics``: the hooks measure nothing (`Recorder._before` / `_after` return at once); the module
  stack, the producers, the channel axes and the functional probe still run;
* ``no functional probe``: the Recorder built with ``functional=False`` and measuring nothing (its
  hooks' bookkeeping alone);
* ``torch's hook calls``: every hook of the Recorder's does nothing and no functional probe: what torch's
  own dispatch of forward hooks costs;
* ``model's ReLU skipped``: the audit with every ``nn.ReLU`` returning its input unchanged: not a result
  (the model computes something else), the most that computing the model's relu in the statistics pass
  could save, where it is not done yet (in-place ReLUs).

The differences between neighbours are what each part costs: the kernel (``audit`` - ``no kernel``), the
Python that measures (``no kernel`` - ``no statistics``), the functional probe (``no statistics`` - ``no
functional probe``), the hooks' bookkeeping (``no functional probe`` - ``torch's hook calls``) and torch's
hook dispatch (``torch's hook calls`` - 1). A variant switches its part off by replacing a method for the
time of its own batch; nothing here is asserted, it prints figures for docs/performance.md. What the audit
loop adds around the forward (the padding mask, a slot adapter's occupancy and metrics) is not in these
pairs: `python -m benchmarks.audit_breakdown` times those.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import deadneuron
from benchmarks.suite_models import CASE_KEYS, Case, build_case
from deadneuron._inputs import batch_size
from deadneuron.probe.masks import choose_mask
from deadneuron.probe.recorder import Recorder
from deadneuron.stats import ChannelStats

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
HOOKS = ("_enter_hook", "_exit_hook", "_leaf_enter_hook", "_leaf_exit_hook", "_activation_pre_hook",
         "_activation_hook")  # fmt: skip


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _relu_not_run(self: ChannelStats, z: torch.Tensor, axis: int, eps: float, flat: Any, out: Any = None) -> bool:
    return out is None  # "taken" without reading z; a call that would write relu's values declines


def _identity(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


# variant -> (Recorder keyword arguments, [(owner, attribute, replacement)]); the replacements hold while
# the variant's Recorder is entered (hooks are bound when it registers them)
NO_STATISTICS = [(Recorder, "_before", _nothing), (Recorder, "_after", _nothing)]
VARIANTS: dict[str, tuple[dict[str, Any], list[tuple[Any, str, Any]]]] = {
    "audit": ({}, []),
    "no kernel": ({}, [(ChannelStats, "update_relu_along", _relu_not_run),
                       (ChannelStats, "update_output_along", _nothing)]),  # fmt: skip
    "no statistics": ({}, NO_STATISTICS),
    "no functional probe": ({"functional": False}, NO_STATISTICS),
    "torch's hook calls": ({"functional": False}, [(Recorder, name, _nothing) for name in HOOKS]),
    "model's ReLU skipped": ({}, [(nn.ReLU, "forward", _identity)]),
}


@contextmanager
def replaced(changes: list[tuple[Any, str, Any]]) -> Iterator[None]:
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in changes]
    try:
        for owner, attr, new in changes:
            setattr(owner, attr, new)
        yield
    finally:
        for owner, attr, old in reversed(saved):
            setattr(owner, attr, old)


def ablate(case: Case, pairs: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median over ``pairs`` pairs of each variant's time per batch over the plain forward's."""
    recorders = {name: Recorder(case.model, **kwargs) for name, (kwargs, _) in VARIANTS.items()}
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    adapter = case.audit_kwargs.get("adapter")  # the batch's padding mask as the audit takes it (mask="auto")
    masks = [choose_mask("auto", b, batch_size=batch_size(b), device=torch.device("cpu"), adapter=adapter).mask
             for b in case.batches]  # fmt: skip

    def timed(name: str, batch: Any, mask: torch.Tensor | None) -> float:
        """One forward of ``batch``, plain (``name`` "plain") or inside variant ``name``'s Recorder."""
        if name == "plain":
            start = clock()
            case.forward(case.model, batch)
            return clock() - start
        rec = recorders[name]
        with replaced(VARIANTS[name][1]), rec:
            rec.start_batch(mask)
            start = clock()
            case.forward(case.model, batch)
            return clock() - start

    with torch.inference_mode():
        for i in range(pairs + 2):
            batch, mask = case.batches[i % len(case.batches)], masks[i % len(case.batches)]
            sides = ["plain", *VARIANTS]
            times = {name: timed(name, batch, mask) for name in (sides if i % 2 == 0 else reversed(sides))}
            if i >= 2 and times["plain"] > 0:
                for name in VARIANTS:
                    ratios[name].append(times[name] / times["plain"])
    return {name: statistics.median(r) for name, r in ratios.items()}


def elements_counted(case: Case, name: str) -> int:
    """Elements the statistics of every site counted over one batch of ``case`` under variant ``name`` (the
    smoke test checks that a variant that switches the statistics off counts none, and the audit some)."""
    kwargs, changes = VARIANTS[name]
    rec = Recorder(case.model, **kwargs)
    with torch.inference_mode(), replaced(changes), rec:
        rec.start_batch()
        case.forward(case.model, case.batches[0])
    return int(sum(float(site.stats.n) for _, site in rec.named_sites()))


def parts(figures: dict[str, float]) -> dict[str, float]:
    """What each part costs, in points of the plain forward (differences of neighbouring variants)."""
    f = figures
    return {
        "C kernel": f["audit"] - f["no kernel"],
        "Python that measures": f["no kernel"] - f["no statistics"],
        "functional probe": f["no statistics"] - f["no functional probe"],
        "hooks' bookkeeping": f["no functional probe"] - f["torch's hook calls"],
        "torch's hook dispatch": f["torch's hook calls"] - 1.0,
        "model's ReLU (bound)": f["audit"] - f["model's ReLU skipped"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CASE_KEYS), help=f"comma-separated, of: {', '.join(CASE_KEYS)}")
    ap.add_argument("--pairs", type=int, default=100, help="pairs measured per model (two more warm up)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny batches: a smoke run, not a measurement")
    args = ap.parse_args(argv)
    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in CASE_KEYS]
    if unknown or args.threads < 1 or args.pairs < 1:
        ap.error(f"unknown model {unknown[0]!r}" if unknown else "--threads and --pairs take positive integers")
    torch.set_num_threads(args.threads)
    print(f"deadneuron from {deadneuron.__file__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.clock} clock, {args.pairs} pairs per model; figures: time per batch / plain forward's")  # fmt: skip
    for key in keys:
        case = build_case(key, quick=args.quick)
        figures = ablate(case, args.pairs, CLOCKS[args.clock])
        print(f"\n{case.name} ({case.shape})")
        for name, value in figures.items():
            print(f"  {value:6.3f}x  {name}")
        print("  parts, in points of the plain forward: " + ", ".join(
            f"{label} {100 * v:+.1f}" for label, v in parts(figures).items()))  # fmt: skip


if __name__ == "__main__":
    main()
