"""Speed of the C statistics kernel (`deadneuron/_stats.c`) on typical activations, one thread by default.

    python -m benchmarks.kernel_speed [--reps 41] [--threads 1] [--compare OLD_stats.c ...]   (from the repository root)

Times one `NativeStats.update` call into a used accumulator (the whole per-batch pass: counts, flat region, moments, range) on
an ARC-like conv activation (64, 64, 30, 30) read along channel axis 1 (the row kernel), a
transformer activation (8, 64, 256) read along its last axis (the column kernel), short rows (a ResNet's
later layers) and a narrow channels-last map (64 channels, as the slot decoder's), float32, with the flat
region read on the output, on a separate pre-activation (two tensors read), and as an exact ReLU is
measured: relu's statistics taken from the pre-activation alone (one tensor read). Each source given with
``--compare`` is built the same way and timed interleaved with the current one, so that load on a
shared machine hits them alike (a source must export the entry points `deadneuron._native` loads); the median over ``--reps`` calls is printed, with the plain
``torch.relu`` of the same tensor as a yardstick. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deadneuron import _native
from deadneuron.stats import channel_view

CASES = {
    "conv (64,64,30,30) axis 1": ((64, 64, 30, 30), 1),
    "transformer (8,64,256) axis -1": ((8, 64, 256), -1),
    "short rows (16,128,8,8) axis 1": ((16, 128, 8, 8), 1),
    "short rows (16,64,12,12) axis 1": ((16, 64, 12, 12), 1),
    "narrow channels-last (100800,64) axis 1": ((100800, 64), 1),
}


def build(source: Path) -> _native.NativeStats:
    cc = _native._compiler()
    flags = (*_native._FLAGS, *_native._ATTEMPTS[0][1])
    built = _native._compile(cc, flags, source.read_bytes(), Path(tempfile.mkdtemp(prefix="kbench-")))
    return _native.NativeStats(ctypes.CDLL(str(built)), built)


def timer(kernel: _native.NativeStats, a3: torch.Tensor, f3: torch.Tensor | None, *, relu: bool = False) -> float:
    """One call into an accumulator that has seen a batch already (as in an audit's later batches); with
    ``relu``, ``a3`` is z and the call takes relu(z)'s statistics from it (an exact ReLU's one read)."""
    acc = _native.fresh_accumulator(a3.shape[1])
    counts = torch.zeros(2, dtype=torch.float64)
    run = kernel.plan(a3, 0.0, 0.0, math.inf, True, acc, counts, relu=relu) if relu else None
    for _ in range(2):
        start = time.perf_counter()
        if run is not None:
            run(a3.data_ptr(), None)
        else:
            kernel.update(a3, f3, 0.0, 0.0, math.inf, True, acc, counts)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=41)
    parser.add_argument("--compare", type=Path, nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=1, help="torch's threads (the kernel splits large batches over them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    here = Path(__file__).resolve().parents[1] / "deadneuron" / "_stats.c"
    kernels = {"current": build(here), **{str(p): build(p) for p in args.compare}}
    g = torch.Generator().manual_seed(0)
    for label, (shape, axis) in CASES.items():
        z = torch.randn(shape, generator=g) + 0.3
        a = torch.relu(z)
        a3, z3 = (channel_view(t, axis) for t in (a, z))
        for flat in ("output", "pre-activation", "pre-activation, relu taken from z alone"):
            f3 = None if flat == "output" else z3
            from_z = flat.endswith("alone")  # the current kernel only: older sources have no relu pass
            times: dict[str, list[float]] = {k: [] for k in (["current"] if from_z else kernels)}
            relu: list[float] = []
            for _ in range(args.reps):
                for name in times:
                    times[name].append(timer(kernels[name], z3 if from_z else a3, f3, relu=from_z))
                start = time.perf_counter()
                torch.relu(z)
                relu.append(time.perf_counter() - start)
            cells = ", ".join(
                f"{k}: {statistics.median(v) * 1e3:.3f} ms (min {min(v) * 1e3:.3f})" for k, v in times.items()
            )
            print(f"{label}, flat on the {flat}: {cells} (torch.relu {statistics.median(relu) * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
