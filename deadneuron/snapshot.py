"""Snapshots of the training monitor: the health of every site over one window of training steps.

Pure values (DESIGN section 9). A `Snapshot` covers the steps since the previous one; per site it holds
deadneuron's figures over the window's sampled training batches (dead, dormant, flat, sparsity: DESIGN
section 3), the tau-dormant units of Sokar et al. 2023, the gradient flow (share of non-zero dL/dz, mean
|dL/dz|, channels whose gradient was exactly zero: "not learning") and the activation magnitude.
``to_dict`` is a health-timeline entry (the format the timeline rules and ``deadneuron timeline`` read:
``{"step", "sites": {site: {"dead", "dead_channels", ...}}}``); ``from_dict`` reads one back.
Per-channel arrays of a window live in `ChannelDetail`, which the monitor keeps for the last window only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
from typing import Any

import numpy as np

from deadneuron.gradflow import FlowHost, tau_dormant, tau_scores
from deadneuron.report import SiteHealth

MEASURED_ON = "training batches"
_IDS = ("dead_channels", "dormant_channels", "tau_dormant_channels", "not_learning_channels")
_NAN = float("nan")


@dataclass(frozen=True)
class SiteSnapshot:
    """One site over one window. Channel ids are tuples; NaN where a figure was not measured (no
    gradient reached the site, or non-finite activations for the tau score)."""

    kind: str
    channels: int
    n: int  # activation elements per channel over the window's sampled batches
    dead_channels: tuple[int, ...]
    dormant_channels: tuple[int, ...]
    flat_fraction: float
    sparsity: float
    nonfinite: int
    abs_mean: float  # mean |a| over the site
    abs_max: float  # largest finite |a|
    tau: float
    tau_dormant_channels: tuple[int, ...]
    grad_elements: int  # gradient elements per channel (0: no gradient reached z)
    grad_nonzero: float  # share of dL/dz elements that are not exactly 0
    grad_abs_mean: float  # mean |dL/dz|
    not_learning_channels: tuple[int, ...]  # dL/dz exactly 0 on every element of the window

    @property
    def dead(self) -> int:
        return len(self.dead_channels)

    @property
    def dormant(self) -> int:
        return len(self.dormant_channels)

    @property
    def tau_dormant(self) -> int:
        return len(self.tau_dormant_channels)

    @property
    def not_learning(self) -> int:
        return len(self.not_learning_channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
            elif isinstance(value, float) and not math.isfinite(value):
                d[key] = None
        counts = {"dead": self.dead, "dormant": self.dormant, "tau_dormant": self.tau_dormant,
                  "not_learning": self.not_learning}  # fmt: skip
        return {**d, **counts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteSnapshot:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            value = d.get(f.name)
            if f.name in _IDS:
                kw[f.name] = tuple(int(c) for c in value or ())
            elif f.type in ("int",):
                kw[f.name] = int(value or 0)
            elif f.type in ("float",):
                kw[f.name] = _NAN if value is None else float(value)
            else:
                kw[f.name] = str(value or "")
        return cls(**kw)


@dataclass(frozen=True)
class Snapshot:
    """The monitor's figures at ``step`` (steps completed), over steps ``first_step`` .. ``step - 1``."""

    step: int
    first_step: int
    sampled_steps: int  # steps of the window whose forward passes were measured
    learning_rate: float | None
    sites: Mapping[str, SiteSnapshot]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", MappingProxyType(dict(self.sites)))

    @property
    def dead(self) -> int:
        return sum(s.dead for s in self.sites.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "first_step": self.first_step, "sampled_steps": self.sampled_steps,
            "learning_rate": self.learning_rate, "measured_on": MEASURED_ON,
            "sites": {name: s.to_dict() for name, s in self.sites.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Snapshot:
        lr = d.get("learning_rate")
        return cls(
            step=int(d["step"]),
            first_step=int(d.get("first_step", d["step"])),
            sampled_steps=int(d.get("sampled_steps", 0)),
            learning_rate=None if lr is None else float(lr),
            sites={str(k): SiteSnapshot.from_dict(v) for k, v in (d.get("sites") or {}).items()},
        )


@dataclass(frozen=True)
class ChannelDetail:
    """Per-channel arrays of one site over one window."""

    firing: np.ndarray  # 1 - flat fraction
    abs_mean: np.ndarray  # mean |a|
    tau_score: np.ndarray
    grad_nonzero: np.ndarray | None  # share of non-zero dL/dz (None: no gradient)
    grad_abs_mean: np.ndarray | None


def site_snapshot(health: SiteHealth, flow: FlowHost, *, tau: float) -> tuple[SiteSnapshot, ChannelDetail]:
    """A site's window figures from the Recorder's statistics and the observer's sums."""
    abs_mean = _abs_mean(health, flow)
    scores = tau_scores(abs_mean)
    grad = flow.grad_nonzero
    finite_abs = [abs(v) for v in (health.min, health.max) if math.isfinite(v)]
    with np.errstate(invalid="ignore"):
        not_learning = tuple(int(i) for i in np.flatnonzero(grad == 0)) if grad is not None else ()
    snap = SiteSnapshot(
        kind=health.kind, channels=health.channels, n=health.n, dead_channels=health.dead_channels,
        dormant_channels=health.dormant_channels, flat_fraction=health.flat_fraction, sparsity=health.sparsity,
        nonfinite=health.nonfinite, abs_mean=float(abs_mean.mean()) if abs_mean.size else _NAN,
        abs_max=max(finite_abs) if finite_abs else _NAN, tau=tau, tau_dormant_channels=tau_dormant(scores, tau),
        grad_elements=flow.grad_elements, grad_nonzero=_mean(grad), grad_abs_mean=_mean(flow.grad_abs_mean),
        not_learning_channels=not_learning,
    )  # fmt: skip
    detail = ChannelDetail(1.0 - np.asarray(health.channel_flat, dtype=np.float64), abs_mean, scores, grad,
                           flow.grad_abs_mean)  # fmt: skip
    return snap, detail


def _abs_mean(health: SiteHealth, flow: FlowHost) -> np.ndarray:
    """Mean |a| per channel: measured, or the mean of a where the kind never outputs a negative value.
    Non-finite activations make it NaN (so the tau score is not computed from them)."""
    if health.nonfinite:
        return np.full(health.channels, np.nan)
    if flow.abs_mean is not None:
        return np.asarray(flow.abs_mean, dtype=np.float64)
    return np.asarray(health.channel_mean, dtype=np.float64)


def _mean(per_channel: np.ndarray | None) -> float:
    """Site figure from per-channel figures over equal element counts: their plain mean."""
    if per_channel is None or per_channel.size == 0:
        return _NAN
    return float(per_channel.mean())
