"""benchmarks/overhead.py runs end to end and writes a well-formed results JSON; the docs' tables are the
committed results rendered. No timing is asserted: the figures depend on the machine."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str) -> ModuleType:
    """A benchmarks/ script as a module (its sibling imports resolved from benchmarks/ while it loads)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_run_writes_well_formed_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "overhead.py"), "--quick", "--models", "arc_cnn,slot",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["schema"], data["version"], data["quick"], data["threads"]) == ("deadneuron.bench", 1, True, [1])
    assert data["torch"] and data["cpu"] and data["date"]
    by_kind = {(r["allocator"], tuple(r["peers"])): r for r in data["runs"]}
    expected = {("glibc", ("captum", "fastai-style")), ("tuned", ())}
    if _installed("torchlens"):
        expected.add(("glibc", ("torchlens",)))
    assert set(by_kind) == expected
    for (allocator, peers), run in by_kind.items():
        assert "failed" not in run
        assert [m["key"] for m in run["models"]] == ["arc_cnn", "slot"]
        for m in run["models"]:
            assert "failed" not in m, m
            assert _positive(m["plain_ms_per_batch"]) and m["sites"] > 0
            sides = set(m["sides"])
            want = {p for p in peers if p == "fastai-style" or _installed(p)}
            if peers != ("torchlens",):
                want.add("deadneuron")
            assert sides == want, (allocator, peers, m.get("errors"))
            for s in m["sides"].values():
                assert all(_positive(s[k]) for k in ("ratio", "ratio_min", "ratio_max", "whole_ratio", "ms_per_batch"))
                assert s["ratio_min"] <= s["ratio"] <= s["ratio_max"]
        if allocator == "tuned":
            assert run["malloc_env"] == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
        else:
            assert run["malloc_env"] == {}
    points = {(p["side"], p["batches"]): p for p in data["memory"]["points"]}
    assert set(points) == {(side, n) for side in ("plain", "deadneuron") for n in (10, 50)}
    for p in points.values():
        assert isinstance(p["peak_rss_growth_kb"], int) and p["tracemalloc_peak_kb"] >= p["tracemalloc_retained_kb"]
        assert list(p["rss_growth_kb_at_batch"]) == (["9"] if p["batches"] == 10 else ["10", "49"])
    rendered = subprocess.run([sys.executable, str(BENCH / "render_table.py"), str(out)], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    assert "QUICK RUN" in rendered and "ARC-like CNN" in rendered and "slot model" in rendered


def test_unknown_model_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "overhead.py"), "--models", "resnet18,vgg"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown model(s) vgg" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_clock_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "overhead.py"), "--clock", "gpu"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "--clock" in proc.stderr and "Traceback" not in proc.stderr


def test_the_clock_reaches_every_measuring_process() -> None:
    overhead = _load("overhead")
    args = overhead.parse(["--clock", "cpu", "--models", "arc_cnn"])
    runs = overhead.specs(1, rounds=3, quick=False, models=["arc_cnn"], device="cpu", torchlens=True, clock=args.clock)
    assert [r["clock"] for r in runs] == ["cpu"] * len(runs) and len(runs) == 3
    assert overhead.parse([]).clock == "wall"


def test_a_side_is_timed_with_the_clock_it_is_given() -> None:
    sides = _load("sides")
    import torch

    ticks = iter([10.0, 13.5, 20.0, 31.0])  # whole start, first batch asked, past the last, whole end
    timing = sides.timed(lambda stamped: list(stamped), [1, 2, 3], torch.device("cpu"), lambda: next(ticks))
    assert (timing["span"], timing["whole"]) == (6.5, 21.0)
    assert sides.CLOCKS["cpu"] is time.process_time


def test_order_alternates_which_side_runs_first() -> None:
    order = _load("worker").order
    sides = ["plain", "deadneuron", "captum", "fastai"]
    firsts = [order(sides, r)[0] for r in range(8)]
    assert sorted(firsts) == sorted(sides * 2)  # each side leads equally often
    assert all(sorted(order(sides, r)) == sorted(sides) for r in range(8))
    assert [order(["plain", "audit"], r)[0] for r in range(4)] == ["plain", "audit", "audit", "plain"]


def test_docs_tables_are_the_committed_results_rendered() -> None:
    render = _load("render_table")
    path = render.newest()
    data = json.loads(path.read_text())
    for name, target in render.TARGETS.items():
        text = target.read_text()
        assert render.replace_block(text, name, render.RENDERERS[name](data, path.name)) == text, (
            f"{target.name} is not {path.name} rendered: run `make bench-docs`"
        )


ABLATION_CHECK = """
import json, torch
from benchmarks import ablation
from benchmarks.suite_models import build_case
from deadneuron.probe.recorder import Recorder
from deadneuron.stats import ChannelStats
before = {(o.__name__, a): o.__dict__[a] for v in ablation.VARIANTS.values() for o, a, _ in v[1]}
case = build_case("arc_cnn", quick=True)
counted = {name: ablation.elements_counted(case, name) for name in ablation.VARIANTS}
after = {(o.__name__, a): o.__dict__[a] for v in ablation.VARIANTS.values() for o, a, _ in v[1]}
x, m, per_channel = case.batches[0], case.model, 0
with torch.inference_mode():
    for conv, bn in zip(m.conv_layers, m.bn_layers):
        z = bn(conv(x))
        per_channel += z.numel() // z.shape[1]
        x = torch.relu(z)
print(json.dumps({"counted": counted, "restored": before == after, "per_channel": per_channel}))
"""


def test_ablation_variants_switch_off_what_they_say_and_put_it_back() -> None:
    """Each variant of benchmarks/ablation.py that says it measures nothing counts no element, the audit counts
    every position of the batch's four ReLU inputs (their shapes computed here from the model's own layers), and every
    method a variant replaced is the original again afterwards; then the script runs end to end."""
    proc = subprocess.run([sys.executable, "-c", ABLATION_CHECK], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    counted = found["counted"]
    assert found["restored"]
    for name in ("no kernel", "no statistics", "no functional probe", "torch's hook calls"):
        assert counted[name] == 0, (name, counted)
    assert counted["audit"] == counted["model's ReLU skipped"] == found["per_channel"] > 0
    run = subprocess.run([sys.executable, "-m", "benchmarks.ablation", "--quick", "--models", "arc_cnn", "--pairs", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    for name in counted:
        assert f"x  {name}" in run.stdout
    assert "C kernel" in run.stdout and "torch's hook dispatch" in run.stdout
