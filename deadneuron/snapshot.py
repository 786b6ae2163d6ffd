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
from deadneuron.part import SiteInfo
from deadneuron.report import flat_channels
from deadneuron.stats import ROWS

MEASURED_ON = "training batches"
_IDS = ("dead_channels", "dormant_channels", "tau_dormant_channels", "not_learning_channels")
_NAN = float("nan")


@dataclass(frozen=True)
class SiteSnapshot:
    """One site over one window. Channel ids are tuples; NaN where a figure was not measured (no
    gradient reached the site, or non-finite activations for the tau score), and None for the channels
    not learning where no gradient reached the site (``grad_elements`` 0: gradients off, a pass under
    no_grad, reentrant activation checkpointing): unmeasured, which is not "none"."""

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
    not_learning_channels: tuple[int, ...] | None  # dL/dz exactly 0 on every element (None: not measured)

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
    def not_learning(self) -> int | None:
        """The channels not learning, None where the gradient flow was not measured."""
        return None if self.not_learning_channels is None else len(self.not_learning_channels)

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
            if f.name == "not_learning_channels" and (value is None or not d.get("grad_elements")):
                kw[f.name] = None  # no gradient reached the site: not measured
            elif f.name in _IDS:
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


def unmeasured_flow(snapshot: Snapshot) -> str | None:
    """The note for sites whose activations were measured in the window but whose gradient was not (no
    gradient reached z): their gradient flow and channels not learning are n/a, not zero. None where
    every measured site got its gradient."""
    sites = [name for name, s in snapshot.sites.items() if s.n and not s.grad_elements]
    if not sites:
        return None
    more = f" and {len(sites) - 3} more" if len(sites) > 3 else ""
    return (f"no gradient reached {', '.join(sites[:3])}{more} in a window: "
            "their gradient flow and channels not learning are not measured (n/a, not 0). A forward pass under "
            "torch.no_grad, no backward before the snapshot, or reentrant activation checkpointing "
            "(checkpoint(..., use_reentrant=True) runs the forward without autograd and recomputes it inside "
            "backward, which is not measured) does this; use_reentrant=False measures the gradient. Inside "
            "torch.func.vmap the gradient is not followed")


@dataclass(frozen=True)
class ChannelDetail:
    """Per-channel arrays of one site over one window."""

    firing: np.ndarray  # 1 - flat fraction
    abs_mean: np.ndarray  # mean |a|
    tau_score: np.ndarray
    grad_nonzero: np.ndarray | None  # share of non-zero dL/dz (None: no gradient)
    grad_abs_mean: np.ndarray | None


def site_snapshot(info: SiteInfo, state: np.ndarray, flow: FlowHost, *, tau: float) -> tuple[SiteSnapshot, ChannelDetail]:
    """A site's window figures from its statistics on the host (``state``: `ChannelStats.state` copied,
    the counts and then the rows of `deadneuron.stats.ROWS`) and the observer's sums. The figures are the
    audit's (`deadneuron.report.SiteHealth.from_result`), read off the arrays without building a SiteHealth."""
    c, n = info.channels, int(state[0])
    zero, flat, finite, mean, _m2, lo, hi = state[2:].reshape(len(ROWS), c)
    zero, flat, seen = np.rint(zero), np.rint(flat), finite > 0
    total = n * c
    nonfinite = int(np.rint(n - finite).astype(np.int64).sum())
    dead, dormant = flat_channels(flat, n)
    abs_mean = _abs_mean(np.where(seen, mean, np.nan), flow, nonfinite=nonfinite)
    scores = tau_scores(abs_mean)
    grad = flow.grad_nonzero
    not_learning = None  # no gradient reached z in the window: not measured
    if grad is not None and flow.grad_elements:
        with np.errstate(invalid="ignore"):
            not_learning = tuple(np.flatnonzero(grad == 0).tolist())
    snap = SiteSnapshot(
        kind=info.kind, channels=c, n=n, dead_channels=dead, dormant_channels=dormant,
        flat_fraction=float(flat.sum()) / total if total else 0.0,
        sparsity=float(zero.sum()) / total if total else 0.0, nonfinite=nonfinite,
        abs_mean=_mean(abs_mean), abs_max=_abs_max(lo[seen], hi[seen]),
        tau=tau, tau_dormant_channels=tau_dormant(scores, tau), grad_elements=flow.grad_elements,
        grad_nonzero=_mean(grad), grad_abs_mean=_mean(flow.grad_abs_mean), not_learning_channels=not_learning,
    )  # fmt: skip
    firing = 1.0 - (flat / n if n else np.zeros(c))
    return snap, ChannelDetail(firing, abs_mean, scores, grad, flow.grad_abs_mean)


def _abs_max(lo: np.ndarray, hi: np.ndarray) -> float:
    """The largest finite |a| from the per-channel ranges of the channels that saw a finite value: the
    larger of |smallest finite minimum| and |largest finite maximum| (NaN where there is none)."""
    lo, hi = lo[np.isfinite(lo)], hi[np.isfinite(hi)]
    ends = [abs(float(lo.min()))] if lo.size else []
    ends += [abs(float(hi.max()))] if hi.size else []
    return max(ends) if ends else _NAN


def _abs_mean(channel_mean: np.ndarray, flow: FlowHost, *, nonfinite: int) -> np.ndarray:
    """Mean |a| per channel: measured, or the mean of a where the kind never outputs a negative value.
    Non-finite activations make it NaN (so the tau score is not computed from them)."""
    if nonfinite:
        return np.full(channel_mean.shape, np.nan)
    if flow.abs_mean is not None:
        return np.asarray(flow.abs_mean, dtype=np.float64)
    return channel_mean


def _mean(per_channel: np.ndarray | None) -> float:
    """Site figure from per-channel figures over equal element counts: their plain mean (numpy's mean,
    without its per-call overhead: the same sum divided by the same count)."""
    if per_channel is None or per_channel.size == 0:
        return _NAN
    return float(per_channel.sum()) / per_channel.size
