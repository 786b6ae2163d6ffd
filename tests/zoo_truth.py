"""The oracle of tests/test_truth_zoo.py (issue 11: "Truth on every layout") and the zoo's building blocks.

Every zoo model (tests/zoo_truth_models.py) stores the pre-activation z and activation a of each site
*from inside its own forward* (`Tap`, z cloned before the call, so in-place activations cannot overwrite
it), together with the channel axis the model's author knows and, for token models, the mask of real
(non-padding) positions. `truth` then computes the per-channel figures of DESIGN section 3 with numpy in
float64 from those tensors, with closed-form flat regions (delta = 0.05). Nothing here or in the zoo
imports deadneuron.

Dead channels are planted (a large bias, or weights of one sign) so that reading the wrong axis gives a
visibly different answer: another channel count, other dead channels (`naive_axis` is the shape-only
guess the zoo is built to defeat). Each model is a `Net`: its layers plus a forward function.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

SEED = 0
DELTA = 0.05
BIG = 50.0
# Kinds whose flat threshold is a kink on an integer (the product's derived region is exact there);
# the others are compared with the small tolerance of tests/test_audit_oracle.py.
EXACT_KINDS = frozenset({"relu", "leaky_relu", "relu6", "prelu"})


@dataclass(frozen=True)
class Site:
    """One activation call site as the model's author knows it.

    ``module`` is the SiteHealth.module the audit should report (the activation module's qualified
    name, or for a functional call the module inside whose forward it ran: "" for the root);
    ``report_kind`` the built-in kind it should have (None: a custom one); ``index`` the k-th site of
    that module and kind; ``planted``/``dormant`` the dead and dormant channels it was built with.
    ``recognised=False``: an activation the audit may measure or must name in a
    warning (``warn``). ``trap``: the shape-only guess reads it on another axis.
    """

    kind: str
    module: str
    report_kind: str | None = None
    index: int = 0
    planted: tuple[int, ...] = ()
    dormant: tuple[int, ...] = ()
    axis_known: bool = True
    recognised: bool = True
    trap: bool = False
    warn: str = ""
    params: tuple[float, ...] = ()


class Tap:
    """Stores (z, a, valid) per site tag while ``on``; otherwise just applies the activation."""

    def __init__(self) -> None:
        self.on = False
        self.calls: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = defaultdict(list)
        self.axis: dict[str, int] = {}

    def __call__(self, tag: str, z: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor], axis: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if not self.on:
            return act(z)
        zc = _numpy(z)  # before the call: an in-place activation overwrites z
        a = act(z)
        self.axis[tag] = axis % z.dim()
        self.calls[tag].append((zc, _numpy(a), None if valid is None else valid.detach().cpu().bool().numpy().copy()))
        return a


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64, copy=True).numpy()


class Net(nn.Module):
    """A zoo model: named layers, a forward function ``body(model, *inputs)`` and the sites it taps."""

    def __init__(self, body: Callable[..., Any], sites: dict[str, Site], **layers: nn.Module) -> None:
        super().__init__()
        self.tap = Tap()
        self.body = body
        self.sites = sites
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.body(self, *args, **kwargs)


class ConvWrap(nn.Module):
    """A user's wrapper whose forward only calls its Conv1d."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MyAct(nn.Module):
    """A custom activation module deadneuron cannot know: clamp(min=0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0)


# --- the oracle --------------------------------------------------------------------------------------

def _gelu_left_tail(delta: float) -> float:
    phi = lambda z: math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
    d = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))) + z * phi(z)  # noqa: E731
    limit = delta * max(abs(d(x / 1000)) for x in range(-10000, 10001))
    lo, hi = -30.0, -1.5  # |d| is small at lo and large at hi (it only grows in between)
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if abs(d(mid)) <= limit else (lo, mid)
    return lo


GELU_LO = _gelu_left_tail(DELTA)


def flat_region(site: Site, z: np.ndarray) -> np.ndarray:
    """Where |f'(z)| <= delta * max |f'| (closed form), for finite z; z is (elements, channels)."""
    k = site.kind
    with np.errstate(invalid="ignore"):
        if k in ("relu", "leaky_relu", "rrelu", "clamp0"):  # slopes 0, 0.01, (lower+upper)/2 <= delta
            r = z <= 0
        elif k == "relu6":
            r = (z <= 0) | (z >= 6)
        elif k == "hardsigmoid":  # f' = 1/6 on (-3, 3), 0 outside
            r = (z <= -3) | (z >= 3)
        elif k == "softsign":  # f' = 1 / (1 + |z|)^2, max 1
            r = np.abs(z) >= 1 / math.sqrt(DELTA) - 1
        elif k == "tanh":  # f' = 1 - tanh^2, max 1
            r = np.abs(z) >= math.atanh(math.sqrt(1 - DELTA))
        elif k == "gelu":
            r = z <= GELU_LO
        elif k == "prelu":  # slope s below 0: flat where |s| <= delta * max(1, |s|)
            s = np.abs(np.asarray(site.params))
            r = (z <= 0) & (s <= DELTA * np.maximum(1.0, s))
        else:
            raise KeyError(k)
    return r & np.isfinite(z)


@dataclass
class Truth:
    axis: int
    channels: int
    n: int
    excluded: int
    zero: np.ndarray
    flat: np.ndarray
    nonfinite: np.ndarray
    dead: tuple[int, ...]
    dormant: tuple[int, ...]
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    values: np.ndarray = field(repr=False)  # a as (elements, channels)


def truth(tap: Tap, tag: str, site: Site, *, masked: bool = True, axis: int | None = None) -> Truth:
    """Per-channel figures of one site over every stored call (padding excluded where ``masked``)."""
    ax = tap.axis[tag] if axis is None else axis
    zs, as_, excluded = [], [], 0
    for z, a, valid in tap.calls[tag]:
        z, a = np.moveaxis(z, ax, -1), np.moveaxis(a, ax, -1)
        if valid is not None and masked:
            assert valid.shape == z.shape[:-1], (tag, valid.shape, z.shape)
            z, a, excluded = z[valid], a[valid], excluded + int((~valid).sum())
        zs.append(z.reshape(-1, z.shape[-1]))
        as_.append(a.reshape(-1, a.shape[-1]))
    if len({x.shape[1] for x in zs}) != 1:
        raise ValueError(f"{tag}: channel count differs between calls on axis {ax}")
    z, a = np.concatenate(zs), np.concatenate(as_)
    n, c = z.shape
    fin = np.isfinite(a)
    count = fin.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(fin, a, 0).sum(0) / count
        std = np.sqrt((np.where(fin, a - mean, 0) ** 2).sum(0) / count)
    flat = flat_region(site, z).sum(0)
    return Truth(
        axis=ax, channels=c, n=n, excluded=excluded, zero=(np.abs(a) <= 0).sum(0), flat=flat,
        nonfinite=(~fin).sum(0), dead=tuple(int(i) for i in np.flatnonzero(flat == n)),
        dormant=tuple(int(i) for i in np.flatnonzero((flat < n) & (flat >= 0.99 * n))),
        mean=mean, std=std, min=np.where(fin, a, np.inf).min(0), max=np.where(fin, a, -np.inf).max(0), values=a,
    )  # fmt: skip


def naive_axis(ndim: int) -> int:
    """The shape-only guess: dim 1 for 4-D and more, else the last dim."""
    return 1 if ndim >= 4 else ndim - 1


# --- helpers ----------------------------------------------------------------------------------------

def plant(t: torch.Tensor, idx: tuple[int, ...], value: float = -BIG) -> None:
    with torch.no_grad():
        t[list(idx)] = value


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def feed(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


def record(model: Net, batches: list[Any]) -> None:
    """Warm BatchNorm (a trained model would have), then run the batches once with the tap on."""
    with torch.no_grad():
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model.train()
            for b in batches:
                feed(model, b)
        model.eval()
        model.tap.on = True
        try:
            for b in batches:
                feed(model, b)
        finally:
            model.tap.on = False


def shapes(*dims: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Callable[[], list[torch.Tensor]]:
    """A data factory: one standard-normal batch per shape."""
    def data() -> list[torch.Tensor]:
        g = gen()
        return [randn(*d, g=g).to(dtype) for d in dims]
    return data


@dataclass(frozen=True)
class Case:
    """A zoo entry: a model builder, its batches, and whether they are padded token batches."""

    build: Callable[[], Net]
    data: Callable[[], list[Any]]
    padded: bool = False
