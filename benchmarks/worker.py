"""One measuring process of the overhead suite: one thread count, one allocator setting, some sides.

Per model: every side runs once untimed (warm-up: kernels built, caches filled), then ``rounds`` rounds in
which every side runs over the same batches; the order of the sides rotates from round to round and is
reversed every other cycle, so that no side always runs first or right after another. Each side's
figure is the median over the rounds of its per-round ratio to the plain forward of the same round.
"""

from __future__ import annotations

import os
import platform
import statistics
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from sides import CLOCKS, PEERS, Clock, Deadneuron, Plain, Side, Timing, site_modules
from suite_models import CASE_KEYS, Case, build_case

import deadneuron


def order(sides: Sequence[Side], round_index: int) -> list[Side]:
    """The sides rotated by the round index, reversed every other full rotation."""
    k = len(sides)
    shift = round_index % k
    rotated = [*sides[shift:], *sides[:shift]]
    return rotated[::-1] if (round_index // k) % 2 else rotated


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:200]


def summarise(plain: list[Timing], side: list[Timing], batches: int) -> dict[str, Any]:
    ratios = [s["span"] / p["span"] for s, p in zip(side, plain, strict=True)]
    whole = [s["whole"] / p["whole"] for s, p in zip(side, plain, strict=True)]
    med = statistics.median
    return {"ratio": med(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "whole_ratio": med(whole),
            "ms_per_batch": 1e3 * med(s["span"] for s in side) / batches,
            "faults_per_batch": med(s["faults"] for s in side) / batches}  # fmt: skip


def prepare(case: Case, device: torch.device) -> Deadneuron:
    """The model on the device, and one untimed audit (warm-up) whose report names the sites."""
    case.model.to(device)
    Plain().run(case, case.batches, device)
    audit = Deadneuron()
    audit.run(case, case.batches, device)
    return audit


def measure_case(case: Case, audit: Deadneuron, peers: Sequence[str], *, rounds: int, device: torch.device,
                 deadneuron_side: bool, max_batches: int | None, clock: Clock) -> dict[str, Any]:  # fmt: skip
    batches = case.batches[:max_batches]
    assert audit.report is not None
    modules = site_modules(audit.report)
    plain = Plain()
    sides: list[Side] = [plain, audit] if deadneuron_side else [plain]
    errors: dict[str, str] = {}
    for name in peers:
        try:
            peer = PEERS[name](modules)
            peer.run(case, batches, device)  # warm-up
        except Exception as exc:
            errors[name] = _one_line(exc)
            continue
        sides.append(peer)
    times: dict[str, list[Timing]] = {s.name: [] for s in sides}
    for r in range(rounds):
        for side in order(sides, r):
            times[side.name].append(side.run(case, batches, device, clock))
    out: dict[str, Any] = {
        "key": case.key, "name": case.name, "shape": case.shape, "batches": len(batches),
        "sites": len(audit.report.sites), "site_modules": len(modules), "kernels": audit.report.meta["kernels"],
        "plain_ms_per_batch": 1e3 * statistics.median(t["span"] for t in times["plain"]) / len(batches),
        "plain_faults_per_batch": statistics.median(t["faults"] for t in times["plain"]) / len(batches),
        "sides": {n: summarise(times["plain"], t, len(batches)) for n, t in times.items() if n != "plain"},
    }  # fmt: skip
    if errors:
        out["errors"] = errors
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec``: threads, allocator, peers, deadneuron (bool), rounds, quick, models (keys or None), device,
    max_batches (None: all), clock ("wall" or "cpu", see `sides.CLOCKS`; default wall). Every model is prepared (warm-up audit) before any is measured: a peer that
    changes torch for the rest of the process (torchlens) must not run before deadneuron has found the sites."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    prepared: list[tuple[str, Case | None, Deadneuron | str]] = []
    for key in spec.get("models") or CASE_KEYS:
        case = None
        try:
            case = build_case(key, quick=spec["quick"])
            prepared.append((key, case, prepare(case, device)))
        except Exception as exc:
            traceback.print_exc()
            prepared.append((key, case, _one_line(exc)))
    models = []
    for key, case, audit in prepared:
        if case is None or isinstance(audit, str):
            models.append(_failed(key, case, str(audit)))
        else:
            try:
                models.append(measure_case(case, audit, spec["peers"], rounds=spec["rounds"], device=device,
                                           deadneuron_side=spec["deadneuron"], max_batches=spec.get("max_batches"),
                                           clock=CLOCKS[spec.get("clock", "wall")]))  # fmt: skip
            except Exception as exc:
                traceback.print_exc()
                models.append(_failed(key, case, _one_line(exc)))
        print(f"  [{spec['threads']} thread(s), {spec['allocator']}] {_progress_line(models[-1])}", flush=True)
    return {
        "threads": spec["threads"], "allocator": spec["allocator"], "rounds": spec["rounds"],
        "clock": spec.get("clock", "wall"),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "torch": torch.__version__, "deadneuron": deadneuron.__version__, "cpu": cpu_model(),
        "device": str(device), "models": models,
    }  # fmt: skip


def _failed(key: str, case: Case | None, reason: str) -> dict[str, Any]:
    return {"key": key, "name": case.name if case else key, "shape": case.shape if case else "", "failed": reason}


def _progress_line(m: dict[str, Any]) -> str:
    if "failed" in m:
        return f"{m['name']}: failed ({m['failed']})"
    ratios = ", ".join(f"{n} {s['ratio']:.3f}x" for n, s in m["sides"].items())
    return f"{m['name']}: plain {m['plain_ms_per_batch']:.1f} ms/batch; {ratios}"
