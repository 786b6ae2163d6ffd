"""A/B of two builds of the C statistics kernel inside one process, on the suite's models.

    python -m benchmarks.kernel_ab OTHER_stats.c [--models bert,transformer] [--pairs 14] [--threads 1] [--audit]
        (from the repository root; OTHER_stats.c: e.g. `git show COMMIT:deadneuron/_stats.c > /tmp/old.c`)

Separate runs of `benchmarks/overhead.py` differ by several points on a shared machine, more than a kernel
change moves the ratio. Here the current `deadneuron/_stats.c` and OTHER are built the same way and
self-checked, each given to its own Recorder on the same model, and the model's batches are run plain, with
A and with B, the order of A and B alternating from pair to pair; printed: the median over pairs of each
side's time over the plain time of its pair (wall clock). ``--audit``: each side is a whole
`deadneuron.audit` call over the batches as the suite audits them (the slot model through its adapter, with
its masks and metrics; BERT with its attention mask), set-up and report included, with that kernel. Both sources must take the Python side's call
layout (`deadneuron._native`); nothing is asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import deadneuron
from benchmarks.suite_models import CASE_KEYS, Case, build_case
from deadneuron import _native
from deadneuron.probe import Recorder


def build(source: Path) -> _native.NativeStats:
    cc = _native._compiler()
    flags = (*_native._FLAGS, *_native._ATTEMPTS[0][1])
    built = _native._compile(cc, flags, source.read_bytes(), Path(tempfile.mkdtemp(prefix="kernel-ab-")))
    native = _native.NativeStats(ctypes.CDLL(str(built)), built)
    failed = _native.self_check(native)
    if failed is not None:
        raise SystemExit(f"{source}: the kernel's self-check failed: {failed}")
    return native


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def audited(case: Case, native: _native.NativeStats) -> Callable[[], None]:
    """One `deadneuron.audit` of the case's batches whose kernel is ``native`` (what `_native.load` gives the
    audit's Recorder while it runs)."""

    def run() -> None:
        load = _native.load
        _native.load = lambda: native
        try:
            deadneuron.audit(case.model, case.batches, progress=None, rules=False, **case.audit_kwargs)
        finally:
            _native.load = load

    return run


def compare(key: str, kernels: dict[str, _native.NativeStats], pairs: int, *, audit: bool = False) -> dict[str, float]:
    case = build_case(key, quick=False)
    model, batches = case.model, case.batches

    def plain() -> None:
        with torch.inference_mode():
            for b in batches:
                case.forward(model, b)

    def recorded(rec: Recorder) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), rec:
                for b in batches:
                    rec.start_batch()
                    case.forward(model, b)

        return run

    sides = {}
    for name, native in kernels.items():
        if audit:
            sides[name] = audited(case, native)
            continue
        rec = Recorder(model)
        rec.kernels.native = native
        sides[name] = recorded(rec)
    plain()
    for run in sides.values():
        run()  # warm-up: plans prepared, caches filled
    ratios: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for i in range(pairs):
        base = timed(plain)
        for name in order if i % 2 == 0 else order[::-1]:
            ratios[name].append(timed(sides[name]) / base)
    return {name: statistics.median(r) for name, r in ratios.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("other", type=Path, help="the other _stats.c")
    ap.add_argument("--models", default=",".join(CASE_KEYS))
    ap.add_argument("--pairs", type=int, default=14)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--audit", action="store_true", help="whole deadneuron.audit calls (adapter, masks, report)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    here = Path(__file__).resolve().parents[1] / "deadneuron" / "_stats.c"
    kernels = {"current": build(here), str(args.other): build(args.other)}
    for key in args.models.split(","):
        result = compare(key, kernels, args.pairs, audit=args.audit)
        print(f"{key}: " + ", ".join(f"{name} {ratio:.3f}x" for name, ratio in result.items()), flush=True)


if __name__ == "__main__":
    main()
