"""Where the audit's time goes on models whose forward calls torch functions (the functional probe).

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.probe_profile [--pairs 30] [--rounds 15] [--batches 4]
        [--models transformer,bert,arc,slot] [--profile transformer] [--torch-profile transformer]

For each model, two figures, each the median of per-pair or per-round ratios, the side that runs first
alternating, warm-up left out, with wall and CPU clocks: per batch, P pairs of (one plain inference-mode
forward) and (the same batch inside the audit's Recorder), set-up left out; per audit, R rounds of
(plain forwards over the B batches) and (`deadneuron.audit(..., rules=False)` over them), set-up and
report included (``--rounds 0`` skips it).
``--profile NAME`` prints cProfile's top functions for one audit of that model; ``--torch-profile NAME``
torch.profiler's top ops. Run it as ``python -m benchmarks.probe_profile`` from the repository root to
measure this checkout's deadneuron. Nothing here is asserted: it prints figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import deadneuron
from benchmarks.suite_models import ArcCNN  # the suite's model, run with python -m benchmarks.probe_profile
from deadneuron.audit import default_forward
from deadneuron.probe import Recorder


class Block(nn.Module):
    """Pre-norm transformer block, attention written as tensor ops, GELU MLP (functional)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        att = att.softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 8, depth: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
                     vocab_size=1000, max_position_embeddings=128)  # fmt: skip
    return BertModel(cfg)


def slot_model() -> nn.Module:
    from arc_model.config import TrainConfig
    from arc_model.model import build_model

    return build_model(TrainConfig())


def cases(batches: int) -> dict[str, tuple[Callable[[], nn.Module], Callable[[], list[Any]]]]:
    def ids() -> list[Any]:
        return [{"input_ids": torch.randint(0, 1000, (8, 64)), "attention_mask": torch.ones(8, 64, dtype=torch.long)}
                for _ in range(batches)]  # fmt: skip

    def grids() -> list[Any]:  # one-hot ARC-like grids, (N, 11, 30, 30), channel 10 marks padding
        colours = torch.randint(0, 11, (batches, 16, 30, 30))
        return [F.one_hot(c, 11).permute(0, 3, 1, 2).float().contiguous() for c in colours]

    return {
        "slot": (slot_model, grids),
        "transformer": (Transformer, lambda: [torch.randn(8, 64, 256) for _ in range(batches)]),
        "bert": (bert, ids),
        "arc": (ArcCNN, lambda: [torch.randn(64, 10, 30, 30) for _ in range(batches)]),
    }


def sides(model: nn.Module, data: list[Any]) -> tuple[Callable[[], None], Callable[[], None]]:
    def plain() -> None:
        with torch.inference_mode():
            for b in data:
                default_forward(model, b)

    def audited() -> None:
        deadneuron.audit(model, data, progress=False, rules=False)

    return plain, audited


def clock(fn: Callable[[], None]) -> tuple[float, float]:
    """Wall time and this thread's CPU time of one call (on a shared machine the CPU time leaves out
    the time other processes held the core)."""
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w, time.thread_time() - c


def _medians(rows: list[tuple[tuple[float, float], tuple[float, float]]], batches: int) -> dict[str, float]:
    med = statistics.median
    return {
        "wall": med(a[0] / p[0] for p, a in rows), "cpu": med(a[1] / p[1] for p, a in rows),
        "plain_ms": med(p[0] for p, _ in rows) / batches * 1e3, "audit_ms": med(a[0] for _, a in rows) / batches * 1e3,
    }  # fmt: skip


def per_audit(model: nn.Module, data: list[Any], rounds: int) -> dict[str, float]:
    """Whole audits (set-up and report included) against plain passes over the same batches: median of
    the per-round ratios, the side that runs first alternating, after one warm-up of each side."""
    plain, audited = sides(model, data)
    plain()
    audited()  # warm-up: kernels built, caches filled
    rows = []
    for r in range(rounds):
        if r % 2:
            a, p = clock(audited), clock(plain)
        else:
            p, a = clock(plain), clock(audited)
        rows.append((p, a))
    return _medians(rows, len(data))


def per_batch(model: nn.Module, data: list[Any], pairs: int) -> dict[str, float]:
    """One batch plain against the same batch inside the audit's Recorder (entered and left around each
    recorded batch, as the monitor does): median of the per-pair ratios, the side that runs first
    alternating. Adjacent pairs see the same load on a shared machine; set-up is left out."""
    rec = Recorder(model)
    rows = []
    with torch.inference_mode():
        for i in range(pairs + 2):
            b = data[i % len(data)]

            def plain(b: Any = b) -> None:
                default_forward(model, b)

            def recorded(b: Any = b) -> None:
                rec.start_batch()
                default_forward(model, b)

            if i % 2:
                p = clock(plain)
                with rec:
                    a = clock(recorded)
            else:
                with rec:
                    a = clock(recorded)
                p = clock(plain)
            if i >= 2:  # the first two pairs warm up
                rows.append((p, a))
    return _medians(rows, 1)


def profile(model: nn.Module, data: list[Any]) -> None:
    _, audited = sides(model, data)
    audited()
    prof = cProfile.Profile()
    prof.enable()
    audited()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())


def torch_profile(model: nn.Module, data: list[Any]) -> None:
    _, audited = sides(model, data)
    audited()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        audited()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="transformer,bert,arc")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--torch-profile", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    all_cases = cases(args.batches)
    print(f"deadneuron from {deadneuron.__file__}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.batches} batches")
    for name in args.models.split(","):
        torch.manual_seed(0)
        build, make = all_cases[name]
        model, data = build().eval(), make()
        if args.profile == name:
            profile(model, data)
        if args.torch_profile == name:
            torch_profile(model, data)
        b = per_batch(model, data, args.pairs)
        print(f"{name:<12} per batch: plain {b['plain_ms']:7.2f} ms, recorded {b['audit_ms']:7.2f} ms, median ratio "
              f"{b['wall']:.3f} wall, {b['cpu']:.3f} cpu ({args.pairs} pairs)", flush=True)
        if args.rounds:
            r = per_audit(model, data, args.rounds)
            print(f"{'':<12} per audit: plain {r['plain_ms']:7.2f} ms, audit    {r['audit_ms']:7.2f} ms per batch, "
                  f"median ratio {r['wall']:.3f} wall, {r['cpu']:.3f} cpu ({args.rounds} rounds)", flush=True)


if __name__ == "__main__":
    main()
