"""Audit overhead as a ratio to a plain forward pass over the same batches, in one process.

    python benchmarks/overhead.py [--threads 1] [--rounds 9] [--device cpu|cuda] [--malloc steady|system]

For each model: R interleaved rounds of (plain inference-mode forward over B batches) and
(`deadneuron.audit` over the same B batches, every activation site hooked); the median of the per-
round ratios is reported, with the statistics memory and its growth from 10 to 500 batches.

Allocator: glibc returns large freed blocks to the kernel and page-faults them back in on the next
allocation. How often depends on the order of allocations and frees, which hooks change: measured on
the ARC CNN, the plain forward took 330k page faults per round and the audited one 185k, so the audit
looked faster than the plain forward. By default (``--malloc steady``) the script re-runs itself with
``MALLOC_MMAP_THRESHOLD_=32 MiB`` and ``MALLOC_TRIM_THRESHOLD_=1 GiB``, so that neither side faults
and the ratio is the audit's own cost; ``--malloc system`` measures with the default allocator
settings. Page faults per round are printed for both sides.
Nothing here is asserted: it prints figures for the README.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import deadneuron
from deadneuron.probe import Recorder


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.down(x))


def resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 layout written inline (torchvision does not import beside this torch build)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class ArcCNN(nn.Module):
    """4 x (conv 64 + BN + ReLU), the shape of the ARC encoder, one shared ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList(nn.Conv2d(10 if i == 0 else 64, 64, 3, padding=1) for i in range(4))
        self.bn_layers = nn.ModuleList(nn.BatchNorm2d(64) for _ in range(4))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.conv_layers, self.bn_layers, strict=True):
            x = self.relu(bn(conv(x)))
        return x


def gelu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 512))


_STEADY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    f, t = _faults(), time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, _faults() - f


def overhead(
    model: nn.Module, batches: list[torch.Tensor], rounds: int, device: torch.device, *, compile: bool
) -> dict[str, float | str]:
    model.to(device).eval()
    batches = [b.to(device) for b in batches]
    kernels = []

    def plain() -> None:
        with torch.inference_mode():
            for b in batches:
                model(b)

    def audited() -> None:
        kernels.append(deadneuron.audit(model, batches, progress=False, compile=compile).meta["kernels"])

    plain()
    audited()  # warm-up (builds or compiles the kernels)
    ratios, tp, ta, fp, fa = [], [], [], [], []
    for _ in range(rounds):
        p, pf = _time(plain, device)
        a, af = _time(audited, device)
        tp.append(p)
        ta.append(a)
        fp.append(pf)
        fa.append(af)
        ratios.append(a / p)
    med = statistics.median
    return {"ratio": med(ratios), "plain": med(tp), "audit": med(ta), "faults_plain": med(fp),
            "faults_audit": med(fa), "kernels": kernels[-1]}


def state_bytes(model: nn.Module, make_batch: Callable[[], torch.Tensor], count: int) -> int:
    with torch.inference_mode(), Recorder(model) as rec:
        for _ in range(count):
            rec.start_batch()
            model(make_batch())
        return rec.state_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--malloc", choices=("steady", "system"), default="steady")
    args = ap.parse_args()
    if args.malloc == "steady" and any(os.environ.get(k) != v for k, v in _STEADY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_STEADY})
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cases: dict[str, tuple[nn.Module, list[torch.Tensor]]] = {
        "ResNet-18 16x3x64x64": (resnet18(), [torch.randn(16, 3, 64, 64) for _ in range(8)]),
        "ARC CNN 64x10x30x30": (ArcCNN(), [torch.randn(64, 10, 30, 30) for _ in range(8)]),
        "GELU MLP 256x512": (gelu_mlp(), [torch.randn(256, 512) for _ in range(8)]),
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, {args.rounds} rounds, "
          f"allocator {args.malloc}")
    print(f"{'model':<22} {'kernels':<9} {'plain s':>8} {'audit s':>8} {'ratio':>6} {'faults p/a':>13} "
          f"{'stats KB':>9} {'KB@500':>7}")
    for name, (model, batches) in cases.items():
        small = [b[:2] for b in batches]
        kb10 = state_bytes(model, lambda s=small: s[0], 10) / 1024
        kb500 = state_bytes(model, lambda s=small: s[0], 500) / 1024
        for compile in (True, False):
            r = overhead(model, batches, args.rounds, device, compile=compile)
            faults = f"{r['faults_plain']:.0f}/{r['faults_audit']:.0f}"
            print(f"{name:<22} {r['kernels']:<9} {r['plain']:8.3f} {r['audit']:8.3f} {r['ratio']:6.3f} "
                  f"{faults:>13} {kb10:9.1f} {kb500:7.1f}", flush=True)


if __name__ == "__main__":
    main()
