"""Audit overhead as a ratio to a plain forward pass over the same batches, in one process.

    python benchmarks/overhead.py [--threads 1] [--rounds 7] [--device cpu|cuda]

For each model: R interleaved rounds of (plain inference-mode forward over B batches) and
(`deadneuron.audit` over the same B batches, every activation site hooked); the median of the per-
round ratios is reported, with the statistics memory and its growth from 10 to 500 batches.
Nothing here is asserted: it prints figures for the README.
"""

from __future__ import annotations

import argparse
import statistics
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


def _time(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def overhead(
    model: nn.Module, batches: list[torch.Tensor], rounds: int, device: torch.device, *, compile: bool
) -> tuple[float, float, float]:
    model.to(device).eval()
    batches = [b.to(device) for b in batches]

    def plain() -> None:
        with torch.inference_mode():
            for b in batches:
                model(b)

    def audited() -> None:
        deadneuron.audit(model, batches, progress=False, compile=compile)

    plain()
    audited()  # warm-up
    ratios, tp, ta = [], [], []
    for _ in range(rounds):
        p = _time(plain, device)
        a = _time(audited, device)
        tp.append(p)
        ta.append(a)
        ratios.append(a / p)
    return statistics.median(ratios), statistics.median(tp), statistics.median(ta)


def state_bytes(model: nn.Module, make_batch: Callable[[], torch.Tensor], count: int) -> int:
    with torch.inference_mode(), Recorder(model) as rec:
        for _ in range(count):
            rec.start_batch()
            model(make_batch())
        return rec.state_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cases: dict[str, tuple[nn.Module, list[torch.Tensor]]] = {
        "ResNet-18 16x3x64x64": (resnet18(), [torch.randn(16, 3, 64, 64) for _ in range(8)]),
        "ARC CNN 64x10x30x30": (ArcCNN(), [torch.randn(64, 10, 30, 30) for _ in range(8)]),
        "GELU MLP 256x512": (gelu_mlp(), [torch.randn(256, 512) for _ in range(8)]),
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, {args.rounds} rounds")
    print(f"{'model':<22} {'kernels':<9} {'plain s':>8} {'audit s':>8} {'ratio':>6} {'stats KB':>9} {'KB@500':>7}")
    for name, (model, batches) in cases.items():
        small = [b[:2] for b in batches]
        kb10 = state_bytes(model, lambda s=small: s[0], 10) / 1024
        kb500 = state_bytes(model, lambda s=small: s[0], 500) / 1024
        for compile in (True, False):
            ratio, tp, ta = overhead(model, batches, args.rounds, device, compile=compile)
            kind = "compiled" if compile else "eager"
            print(f"{name:<22} {kind:<9} {tp:8.3f} {ta:8.3f} {ratio:6.3f} {kb10:9.1f} {kb500:7.1f}", flush=True)


if __name__ == "__main__":
    main()
