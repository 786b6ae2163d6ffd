"""Audit overhead beside a plain forward and beside the peers, on the same models and batches, in one run.

    python benchmarks/overhead.py [--threads 1 2] [--rounds 9] [--models resnet18,bert] [--clock cpu] [--note TEXT]
    python benchmarks/overhead.py --quick --out /tmp/bench.json     # a smoke run: tiny batches, 1 round
    python benchmarks/render_table.py --write                        # README/docs tables from the newest JSON

For each thread count, separate processes measure (benchmarks/worker.py says how a process measures):

1. glibc malloc with its default settings (the headline column): plain forward, ``deadneuron.audit``,
   captum's ``LayerActivation`` and a fastai-style ``ActivationStats`` hook (benchmarks/sides.py);
2. a tuned allocator (``MALLOC_MMAP_THRESHOLD_=32 MiB``, ``MALLOC_TRIM_THRESHOLD_=1 GiB``): plain and
   deadneuron. glibc hands large freed blocks back to the kernel and faults them in again; how often
   depends on the order of allocations, which hooks change, so the two settings can differ either way;
3. torchlens (it wraps every torch function for the rest of its process): it is slow, so 3 rounds over
   the first 2 batches of each model.

The figure per model and side is the median over rounds of (side's per-batch time / plain's, same round),
the per-batch time running from the first batch asked for to the loop asking past the last (set-up and
report building excluded; ``whole_ratio`` includes them). Then, in fresh processes, the memory of the
statistics over 10 and 500 batches (benchmarks/memory.py). Everything goes to
``benchmarks/results/<date>-<machine>.json``; nothing is asserted. ``make bench`` runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TUNED = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
MODEL_KEYS = ("resnet18", "arc_cnn", "convnext", "transformer", "bert", "slot")  # suite_models.CASE_KEYS
MAIN_PEERS = ("captum", "fastai-style")


def _env(threads: int, allocator: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
    if allocator == "tuned":
        env.update(TUNED)
    return env


def _child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run this script as a child that writes its JSON to a temporary file; a failure is recorded, not raised."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--child-out", str(out)],
                              env=env, cwd=HERE.parent, check=False)  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            return {"failed": f"the measuring process exited with {proc.returncode}"}
        return json.loads(out.read_text())


def specs(threads: int, *, rounds: int, quick: bool, models: list[str] | None, device: str, torchlens: bool,
          clock: str = "wall") -> list[dict[str, Any]]:  # fmt: skip
    base = {"threads": threads, "quick": quick, "models": models, "device": device, "clock": clock}
    out = [
        {**base, "allocator": "glibc", "peers": list(MAIN_PEERS), "deadneuron": True, "rounds": rounds},
        {**base, "allocator": "tuned", "peers": [], "deadneuron": True, "rounds": rounds},
    ]
    if torchlens:
        out.append({**base, "allocator": "glibc", "peers": ["torchlens"], "deadneuron": False,
                    "rounds": max(1, min(rounds, 3)), "max_batches": 2})  # fmt: skip
    return out


def machine_slug() -> str:
    cpu = "cpu"
    try:
        cpu = next(line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.machine()
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")
    return f"{slug}-{os.cpu_count()}c"


def _git() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "deadneuron"], cwd=HERE.parent, capture_output=True,
                               text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + (" (deadneuron/ modified)" if dirty.stdout.strip() else "")


def _peers() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"fastai-style": "written in benchmarks/sides.py after fastai's ActivationStats"}
    for package in ("captum", "torchlens"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    peers = _peers()
    load_start = os.getloadavg()
    models = args.models.split(",") if args.models else None
    runs = []
    for threads in args.threads:
        for spec in specs(threads, rounds=args.rounds, quick=args.quick, models=models, device=args.device,
                          torchlens=peers["torchlens"] is not None and not args.no_torchlens, clock=args.clock):  # fmt: skip
            print(f"measuring: {threads} thread(s), {spec['allocator']} allocator, "
                  f"sides {['deadneuron'] * spec['deadneuron'] + spec['peers']}", flush=True)  # fmt: skip
            run = _child(["--child", json.dumps(spec)], _env(threads, spec["allocator"]))
            runs.append({**{k: spec[k] for k in ("threads", "allocator", "peers", "rounds")}, **run})
    counts = (10, 50) if args.quick else (10, 500)
    memory = [_child(["--memory", f"{side}:{n}"], _env(1, "glibc")) for side in ("plain", "deadneuron") for n in counts]
    first = next((r for r in runs if "cpu" in r), {})
    return {
        "schema": "deadneuron.bench", "version": 1,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": args.machine or machine_slug(),
        "cpu": first.get("cpu"), "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": first.get("torch"), "deadneuron": first.get("deadneuron"), "git": _git(), "device": args.device,
        "threads": args.threads, "quick": args.quick, "note": args.note, "peers": peers, "clock": args.clock,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "runs": runs, "memory": {"model": "ARC-like CNN, 8x10x16x16 batches", "points": memory},
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def _out_path(args: argparse.Namespace, data: dict[str, Any]) -> Path:
    if args.out:
        return Path(args.out)
    suffix = "-quick" if args.quick else ""
    return RESULTS / f"{data['date'][:10]}-{data['machine']}{suffix}.json"


def _child_main(args: argparse.Namespace) -> None:
    sys.path[:0] = [str(HERE), str(HERE.parent)]  # this checkout's deadneuron, not an installed one
    if args.child:
        from worker import run_worker

        result = run_worker(json.loads(args.child))
    else:
        from memory import measure_point

        side, count = args.memory.split(":")
        result = measure_point(side, int(count))
    Path(args.child_out).write_text(json.dumps(result))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, in order (default: 1 2)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per model (torchlens: at most 3)")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(MODEL_KEYS)}")
    ap.add_argument("--quick", action="store_true", help="tiny batches, 1 round, one thread: checks that it runs")
    ap.add_argument("--no-torchlens", action="store_true", help="leave torchlens out (it is the slowest part)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (default); cpu: the process's CPU time, for one thread on a loaded machine")
    ap.add_argument("--machine", help="the machine's name in the file name (default: from the CPU model)")
    ap.add_argument("--note", help="a remark stored in the JSON, e.g. that the machine was loaded")
    ap.add_argument("--out", help="the JSON file (default: benchmarks/results/<date>-<machine>.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--memory", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.threads = 1, [1]
    if args.rounds < 1 or any(t < 1 for t in args.threads):
        ap.error("--rounds and --threads take positive integers")
    unknown = set(args.models.split(",")) - set(MODEL_KEYS) if args.models else set()
    if unknown:
        ap.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODEL_KEYS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child or args.memory:
        _child_main(args)
        return
    data = run_suite(args)
    path = _out_path(args, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    sys.path.insert(0, str(HERE))
    from render_table import render_all

    print(render_all(data, source=path.name))
    print(f"\nwritten: {path} ({data['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
