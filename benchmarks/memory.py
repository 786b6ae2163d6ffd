"""Memory of an audit's statistics, measured (not computed from tensor sizes), in a fresh process per point.

One point: a small model (the ARC-like CNN on 8x10x16x16 batches) runs over N batches, either plainly or
inside ``deadneuron.audit`` (rules off: the statistics and the Report, nothing else). Before the measured
run, the same run (same side, same N) warms the process up: imports, the statistics kernel, caches and
glibc's heap reach the size such a run needs, so what remains is what the run itself adds; anything kept per
batch would still grow with N. Then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``, where writable) and ``tracemalloc``
starts. Reported: the peak RSS (``VmHWM``) above the RSS before the run, the peak and the retained
growth of the memory Python allocated (``tracemalloc``; retained: with the audit's Report still held),
the RSS growth when batches 10, 100, 250 and the last are asked for, and ``ru_maxrss`` for reference. A
flat statistics memory shows as the same figures at 10 and at 500 batches.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from typing import Any

import torch
from suite_models import ArcCNN

import deadneuron

MODEL = "ARC-like CNN, 8x10x16x16 batches"


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _run(model: torch.nn.Module, x: torch.Tensor, count: int, side: str, trace: dict[int, int] | None = None) -> Any:
    """``side`` over ``count`` batches; ``trace`` gets the RSS (KB) when batches 10, 100, 250 and the last are
    asked for (as far as the run goes)."""
    marks = {i for i in (10, 100, 250, count - 1) if i < count} if trace is not None else set()

    def batches() -> Iterator[torch.Tensor]:
        for i in range(count):
            if i in marks and trace is not None:
                trace[i] = _status_kb("VmRSS") or 0
            yield x

    if side == "deadneuron":
        return deadneuron.audit(model, batches(), progress=False, rules=False)
    with torch.inference_mode():
        for b in batches():
            model(b)
    return None


def measure_point(side: str, count: int) -> dict[str, Any]:
    import resource

    torch.manual_seed(0)
    model = ArcCNN().eval()
    x = torch.randn(8, 10, 16, 16)
    _run(model, x, count, side)  # warm-up: the same run
    reset = _reset_peak()
    rss0 = _status_kb("VmRSS") or 0
    trace: dict[int, int] = {}
    tracemalloc.start()
    t0, _ = tracemalloc.get_traced_memory()
    result = _run(model, x, count, side, trace)
    gc.collect()  # retained: what is still reachable, not garbage the cycle collector has not reached yet
    t1, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = _status_kb("VmHWM")
    del result
    return {
        "side": side, "batches": count, "peak_reset": reset,
        "peak_rss_growth_kb": (hwm - rss0) if hwm is not None and rss0 else None,
        "rss_growth_kb_at_batch": {str(i): kb - rss0 for i, kb in sorted(trace.items())},
        "tracemalloc_peak_kb": (peak - t0) / 1024, "tracemalloc_retained_kb": (t1 - t0) / 1024,
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }  # fmt: skip
