"""Where an audit's time goes per batch, by part: the C kernel, each kind of hook, the padding mask, the
adapter's slot occupancy and metrics, on the models of the overhead suite.

    python -m benchmarks.audit_breakdown [--models slot,resnet18] [--threads 1]   (from the repository root)

Each part is timed by wrapping its function with a wall clock for one audit, after a warm-up audit of the
same batches: the figures are milliseconds per batch and calls per batch, beside the plain forward's time
per batch. Parts nest (a hook's time includes the kernel calls it makes), so they do not add up; a wrapper
costs about a microsecond per call. Python in hooks runs between large tensor ops, with cold caches: its
cost per call here is several times a microbenchmark's. Nothing is asserted: it prints figures for
docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import deadneuron
import deadneuron.measure as measure_mod
import deadneuron.probe.measure as probe_measure
from benchmarks.suite_models import CASE_KEYS, build_case
from deadneuron import _native
from deadneuron.probe.functional import FunctionalProbe
from deadneuron.probe.recorder import Recorder

# (object, attribute, label): what is timed
PARTS: tuple[tuple[Any, str, str], ...] = (
    (_native.Planned, "__call__", "C kernel"),
    (_native.Planned, "rows", "C kernel, valid rows"),
    (Recorder, "_activation_pre_hook", "activation pre-hooks (z read)"),
    (Recorder, "_activation_hook", "activation hooks (output read)"),
    (Recorder, "_leaf_enter_hook", "torch leaf-layer hooks, entry"),
    (Recorder, "_leaf_exit_hook", "torch leaf-layer hooks, exit"),
    (Recorder, "_enter_hook", "other module hooks, entry"),
    (Recorder, "_exit_hook", "other module hooks, exit"),
    (FunctionalProbe, "_activation", "functional activation calls (op included)"),
    (probe_measure, "_masked_relu", "masked ReLU (valid positions)"),
    (measure_mod, "choose_mask", "choosing the batch's mask"),
    (measure_mod, "_update_slots", "slot occupancy"),
    # not deadneuron's: the model's own relu, the most a kernel computing relu while it measures could save
    (nn.ReLU, "forward", "the model's nn.ReLU calls (relu itself, not the audit)"),
)


@contextmanager
def timed_parts(extra: dict[str, tuple[Any, str]]) -> Iterator[tuple[dict[str, float], Counter[str]]]:
    """While entered, every part of `PARTS` (and ``extra``: label -> (object, attribute)) adds its wall
    time and calls to the yielded dicts; the originals are put back on exit."""
    seconds: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    saved = []
    for owner, attr, label in (*PARTS, *((o, a, label) for label, (o, a) in extra.items())):
        original = getattr(owner, attr)
        saved.append((owner, attr, original))

        def wrap(fn: Callable[..., Any], label: str = label) -> Callable[..., Any]:
            @functools.wraps(fn)
            def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    seconds[label] += time.perf_counter() - start
                    calls[label] += 1

            return timed

        setattr(owner, attr, wrap(original))
    try:
        yield seconds, calls
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def breakdown(key: str) -> None:
    case = build_case(key, quick=False)
    count = len(case.batches)
    adapter = case.audit_kwargs.get("adapter")

    def audit() -> float:
        start = time.perf_counter()
        deadneuron.audit(case.model, case.batches, progress=False, rules=False, **case.audit_kwargs)
        return time.perf_counter() - start

    audit()
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in case.batches:
            case.forward(case.model, batch)
    plain = (time.perf_counter() - start) / count
    extra = {"adapter metrics": (adapter, "metric_sums")} if adapter is not None else {}
    with timed_parts(extra) as (seconds, calls):
        whole = audit() / count
    print(f"\n{case.name}: plain forward {plain * 1e3:.2f} ms/batch, whole audit call {whole * 1e3:.2f} ms/batch "
          f"(with the timers), {count} batches")  # fmt: skip
    for label, spent in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {spent / count * 1e3:8.3f} ms/batch  {calls[label] / count:6.1f} calls/batch  {label}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CASE_KEYS), help=f"comma-separated, of: {', '.join(CASE_KEYS)}")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in CASE_KEYS]
    if unknown or args.threads < 1:
        ap.error(f"unknown model {unknown[0]!r}" if unknown else "--threads takes a positive integer")
    torch.set_num_threads(args.threads)
    print(f"deadneuron from {deadneuron.__file__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for key in keys:
        breakdown(key)


if __name__ == "__main__":
    main()
