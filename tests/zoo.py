"""An edge-case model zoo with an independent oracle.

Every zoo model records, when asked, the pre-activation z and activation a of each site *from inside
its own forward* (cloned before any in-place op): a mechanism that shares nothing with deadneuron's
hooks. `oracle` then computes the per-channel figures in one shot with numpy from those stored tensors,
using closed-form derivatives for the flat regions (the product derives them numerically by autograd).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Tap:
    """Stores (z, a) per site name while ``on``; a no-op otherwise."""

    def __init__(self) -> None:
        self.on = False
        self.z: dict[str, list[np.ndarray]] = defaultdict(list)
        self.a: dict[str, list[np.ndarray]] = defaultdict(list)
        self.axis: dict[str, int] = {}
        self.order: list[str] = []

    def pre(self, name: str, z: torch.Tensor, axis: int) -> None:
        if self.on:
            if name not in self.axis:
                self.order.append(name)
            self.axis[name] = axis % z.dim()
            self.z[name].append(z.detach().clone().double().numpy())

    def post(self, name: str, a: torch.Tensor) -> torch.Tensor:
        if self.on:
            self.a[name].append(a.detach().clone().double().numpy())
        return a


# --- closed-form flat regions (delta = 0.05) ------------------------------------------------------

def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


DERIVATIVES = {
    "gelu": lambda z: _Phi(z) + z * _phi(z),
    "silu": lambda z: _sigmoid(z) * (1 + z * (1 - _sigmoid(z))),
}


def _left_tail_threshold(kind: str, delta: float) -> float:
    d = DERIVATIVES[kind]
    dense = np.linspace(-10, 10, 20001)
    limit = delta * np.abs(d(dense)).max()
    lo, hi = -30.0, -1.5  # |d| small at lo, large at hi (past the tail)
    for _ in range(80):
        mid = (lo + hi) / 2
        if abs(float(d(np.array([mid]))[0])) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


PRELU_SLOPES = np.array([0.01, 0.25, 0.0, -0.5])  # InplaceMix's PReLU: flat below 0 where |slope| <= delta


def flat_mask(kind: str, z: np.ndarray, delta: float = 0.05) -> np.ndarray:
    if kind == "prelu":
        return (z <= 0) & (np.abs(PRELU_SLOPES) <= delta * np.maximum(1, np.abs(PRELU_SLOPES)))
    if kind in ("relu", "leaky_relu"):
        return z <= 0
    if kind == "tanh":
        t = math.atanh(math.sqrt(1 - delta))
        return np.abs(z) >= t
    if kind in DERIVATIVES:
        return z <= _left_tail_threshold(kind, delta)
    raise KeyError(kind)


@dataclass
class OracleSite:
    n: int
    zero: np.ndarray
    flat: np.ndarray
    nonfinite: np.ndarray
    dead: list[int]
    dormant: list[int]
    sparsity: float


def oracle(tap: Tap, name: str, kind: str, *, eps: float = 0.0, delta: float = 0.05) -> OracleSite:
    axis = tap.axis[name]
    z = np.concatenate([np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis]) for t in tap.z[name]])
    a = np.concatenate([np.moveaxis(t, axis, -1).reshape(-1, t.shape[axis]) for t in tap.a[name]])
    n = z.shape[0]
    with np.errstate(invalid="ignore"):
        zero = (np.abs(a) <= eps).sum(0)
        flat = flat_mask(kind, z, delta).sum(0)
    nonfinite = (~np.isfinite(a)).sum(0)
    dead = [int(c) for c in np.flatnonzero(flat == n)]
    dormant = [int(c) for c in np.flatnonzero((flat < n) & (flat / n >= 0.99))]
    return OracleSite(n, zero, flat, nonfinite, dead, dormant, float(zero.sum() / a.size))


# --- the zoo ------------------------------------------------------------------------------------

class ConvBNInplace(nn.Module):
    """conv -> BN -> ReLU(inplace=True), twice."""

    def __init__(self, tap: Tap) -> None:
        super().__init__()
        self.tap = tap
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.act2 = nn.ReLU(inplace=True)
        self.sites = {"act1": "relu", "act2": "relu"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bn1(self.conv1(x))
        self.tap.pre("act1", z, 1)
        x = self.tap.post("act1", self.act1(z))
        z = self.bn2(self.conv2(x))
        self.tap.pre("act2", z, 1)
        return self.tap.post("act2", self.act2(z))


class SeedEncoder(nn.Module):
    """The user's encoder: one shared ``self.relu`` after each of 4 conv+BN layers."""

    def __init__(self, tap: Tap, act: nn.Module | None = None, kind: str = "relu", channels: int = 8) -> None:
        super().__init__()
        self.tap = tap
        self.conv_layers = nn.ModuleList(nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1) for i in range(4))
        self.bn_layers = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(4))
        self.relu = act if act is not None else nn.ReLU()
        self.sites = {f"bn_layers.{i}>relu": kind for i in range(4)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.conv_layers, self.bn_layers, strict=True)):
            z = bn(conv(x))
            self.tap.pre(f"bn_layers.{i}>relu", z, 1)
            x = self.tap.post(f"bn_layers.{i}>relu", self.relu(z))
        return x


class FunctionalCNN(nn.Module):
    """No activation modules at all: F.relu, torch.relu and x.relu() after convs."""

    def __init__(self, tap: Tap) -> None:
        super().__init__()
        self.tap = tap
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)
        self.sites = {"conv1>relu": "relu", "conv2>relu": "relu", "conv3>relu": "relu"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv1(x)
        self.tap.pre("conv1>relu", z, 1)
        x = self.tap.post("conv1>relu", F.relu(z))
        z = self.conv2(x)
        self.tap.pre("conv2>relu", z, 1)
        x = self.tap.post("conv2>relu", torch.relu(z))
        z = self.conv3(x)
        self.tap.pre("conv3>relu", z, 1)
        return self.tap.post("conv3>relu", z.relu())


class GeluMLP(nn.Module):
    def __init__(self, tap: Tap, act: nn.Module | None = None, kind: str = "gelu") -> None:
        super().__init__()
        self.tap = tap
        self.fc1, self.act = nn.Linear(12, 16), act if act is not None else nn.GELU()
        self.fc2 = nn.Linear(16, 4)
        self.sites = {"act": kind}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(x)
        self.tap.pre("act", z, -1)
        return self.fc2(self.tap.post("act", self.act(z)))


class TransformerBlock(nn.Module):
    """Pre-norm block on (N, L, C): attention + MLP with GELU; channels on the last dim."""

    def __init__(self, tap: Tap, dim: int = 16) -> None:
        super().__init__()
        self.tap = tap
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim)
        self.sites = {"act": "gelu"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        z = self.fc1(self.norm2(x))
        self.tap.pre("act", z, -1)
        return x + self.fc2(self.tap.post("act", self.act(z)))


class TupleDictOutputs(nn.Module):
    """Returns a tuple holding a dict; a Tanh and a LeakyReLU site."""

    def __init__(self, tap: Tap) -> None:
        super().__init__()
        self.tap = tap
        self.fc, self.tanh = nn.Linear(6, 5), nn.Tanh()
        self.conv, self.leaky = nn.Conv1d(2, 3, 3, padding=1), nn.LeakyReLU(0.01)
        self.sites = {"tanh": "tanh", "leaky": "leaky_relu"}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.fc(x)
        self.tap.pre("tanh", z, -1)
        t = self.tap.post("tanh", self.tanh(z))
        z = self.conv(x.view(x.shape[0], 2, 3))
        self.tap.pre("leaky", z, 1)
        return t, {"leaky": self.tap.post("leaky", self.leaky(z))}


class CalledThrice(nn.Module):
    """One Linear and one SiLU applied three times per forward: three sites."""

    def __init__(self, tap: Tap) -> None:
        super().__init__()
        self.tap = tap
        self.fc, self.act = nn.Linear(8, 8), nn.SiLU()
        self.sites = {f"fc>act#{i}": "silu" for i in range(3)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(3):
            z = self.fc(x)
            self.tap.pre(f"fc>act#{i}", z, -1)
            x = self.tap.post(f"fc>act#{i}", self.act(z))
        return x


class NaNLayer(nn.Module):
    """A layer that produces NaN in channel 1 (log of negative numbers) before a ReLU."""

    def __init__(self, tap: Tap) -> None:
        super().__init__()
        self.tap = tap
        self.fc, self.act = nn.Linear(4, 3), nn.ReLU()
        self.sites = {"act": "relu"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        z = torch.cat([z[:, :1], torch.log(-z[:, 1:2].abs() - 1), z[:, 2:]], dim=1)
        self.tap.pre("act", z, -1)
        return self.tap.post("act", self.act(z))


def image_batches(n: int = 3, shape: tuple[int, ...] = (4, 3, 6, 6), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def warm_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Update BatchNorm running statistics (a real model would have trained)."""
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    model.eval()


class InplaceMix(nn.Module):
    """In-place SiLU module, in-place functional relu_, and a per-channel PReLU."""

    def __init__(self, tap: Tap) -> None:
        super().__init__()
        self.tap = tap
        self.fc1, self.act = nn.Linear(6, 8), nn.SiLU(inplace=True)
        self.fc2 = nn.Linear(8, 8)
        self.fc3, self.prelu = nn.Linear(8, 4), nn.PReLU(4)
        with torch.no_grad():
            self.prelu.weight.copy_(torch.tensor([0.01, 0.25, 0.0, -0.5]))
        self.sites = {"act": "silu", "fc2>relu": "relu", "prelu": "prelu"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(x)
        self.tap.pre("act", z, -1)
        x = self.tap.post("act", self.act(z))
        z = self.fc2(x)
        self.tap.pre("fc2>relu", z, -1)
        x = self.tap.post("fc2>relu", torch.relu_(z))
        z = self.fc3(x)
        self.tap.pre("prelu", z, -1)
        return self.tap.post("prelu", self.prelu(z))
