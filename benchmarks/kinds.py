"""Audit overhead on kinds of model outside the suite of benchmarks/overhead.py, to find the worst cases.

    python -m benchmarks.kinds [--threads 1] [--rounds 10] [--batches 6] [--models mobilenet,mlp-tiny]

The suite measures six models beside the peers; a user brings others. Here, in one process, for each model:
a plain inference-mode forward over the same batches and ``deadneuron.audit(..., rules=False)`` over them,
one untimed run of each first (warm-up), then ``--rounds`` rounds in which the side that runs first
alternates. A side's time runs from the first batch asked for to the loop asking past the last (set-up and
report building left out, as the suite's headline ratio). Printed per model: the median over rounds of the
per-round ratio, its range, and the plain forward's time per batch. Activations are of the kinds these
architectures use (ReLU6, SiLU with sigmoid gates, GELU called as a function inside attention blocks,
Tanh after an LSTM, ELU, Mish); a tiny MLP shows the fixed cost per site where a forward takes well under
a millisecond. Nothing is asserted: it prints figures for docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import deadneuron


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))


class _MBConv(nn.Module):
    """EfficientNet-style inverted residual: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project, SiLU."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        e = c * expand
        self.pw, self.bn1 = nn.Conv2d(c, e, 1), nn.BatchNorm2d(e)
        self.dw, self.bn2 = nn.Conv2d(e, e, 3, padding=1, groups=e), nn.BatchNorm2d(e)
        self.se, self.project, self.act = _SqueezeExcite(e), nn.Conv2d(e, c, 1), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.act(self.bn2(self.dw(self.act(self.bn1(self.pw(x))))))))


class _ViTBlock(nn.Module):
    """Pre-norm block: nn.MultiheadAttention, MLP with F.gelu called in the forward."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class _LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.fc, self.act = nn.LSTM(64, 128, num_layers=2, batch_first=True), nn.Linear(128, 128), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(self.lstm(x)[0]))


def _mobilenet() -> nn.Module:
    def block() -> nn.Module:
        return nn.Sequential(nn.Conv2d(32, 128, 1), nn.BatchNorm2d(128), nn.ReLU6(),
                             nn.Conv2d(128, 128, 3, padding=1, groups=128), nn.BatchNorm2d(128), nn.ReLU6(),
                             nn.Conv2d(128, 32, 1))  # fmt: skip

    return nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU6(), *(block() for _ in range(4)))


def _mlp() -> nn.Module:
    return nn.Sequential(*(m for _ in range(6) for m in (nn.Linear(256, 256), nn.ReLU())))


def _stack(make: Callable[[int], list[nn.Module]], count: int) -> nn.Module:
    return nn.Sequential(*(m for i in range(count) for m in make(i)))


MODELS: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = {
    "efficientnet": ("EfficientNet-style, SiLU + sigmoid gates", lambda: nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.SiLU(), *(_MBConv(32) for _ in range(4))), (16, 3, 64, 64)),
    "mobilenet": ("MobileNetV2-style, ReLU6, depthwise", _mobilenet, (16, 3, 64, 64)),
    "mlp-large": ("MLP 6 x (Linear 256 + ReLU), 4096 rows", _mlp, (4096, 256)),
    "mlp-tiny": ("MLP 6 x (Linear 256 + ReLU), 32 rows", _mlp, (32, 256)),
    "vit": ("ViT-style, nn.MultiheadAttention, F.gelu", lambda: nn.Sequential(*(_ViTBlock(192) for _ in range(4))),
            (16, 64, 192)),
    "lstm": ("2-layer LSTM, Linear + Tanh", _LSTMHead, (16, 50, 64)),
    "conv1d": ("1-D conv 5 x (Conv1d 64 + BN + ELU)", lambda: _stack(
        lambda i: [nn.Conv1d(1 if i == 0 else 64, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ELU()], 5),
        (16, 1, 4000)),
    "mish": ("conv 4 x (Conv2d 32 + Mish)", lambda: _stack(
        lambda i: [nn.Conv2d(3 if i == 0 else 32, 32, 3, padding=1), nn.Mish()], 4), (16, 3, 48, 48)),
}  # fmt: skip


class _Stamped:
    """The batches, with the clock read when the first is asked for and when the loop asks past the last."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self.batches, self.span = batches, float("nan")

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        start = time.perf_counter()
        yield from self.batches
        self.span = time.perf_counter() - start


def measure(model: nn.Module, batches: Sequence[torch.Tensor], rounds: int) -> tuple[list[float], float]:
    """Per-round ratios (audit / plain) and the last round's plain seconds per batch."""

    def plain() -> float:
        stamped = _Stamped(batches)
        with torch.inference_mode():
            for b in stamped:
                model(b)
        return stamped.span

    def audit() -> float:
        stamped = _Stamped(batches)
        deadneuron.audit(model, stamped, rules=False)
        return stamped.span

    plain(), audit()
    ratios, base = [], float("nan")
    for r in range(rounds):
        if r % 2:
            side = audit()
            base = plain()
        else:
            base = plain()
            side = audit()
        ratios.append(side / base)
    return ratios, base / len(batches)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    args = ap.parse_args(argv)
    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in MODELS]
    if unknown or args.rounds < 1 or args.batches < 1 or args.threads < 1:
        ap.error(f"unknown model {unknown[0]!r}" if unknown else "--rounds, --batches, --threads take positive integers")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.batches} batches, {args.rounds} rounds")
    print("| model | input | audit / plain (median, range) | plain ms/batch |\n|---|---|---|---|")
    for key in keys:
        name, build, shape = MODELS[key]
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(shape)
        ratios, per_batch = measure(model, [x] * args.batches, args.rounds)
        span = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"| {name} | {tuple(shape)} | {statistics.median(ratios):.2f}x ({span}) | {per_batch * 1e3:.2f} |")


if __name__ == "__main__":
    main()
