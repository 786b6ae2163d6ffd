"""Slot occupancy statistics (DESIGN section 3) of the slot masks an adapter reads from the model's outputs
(`deadneuron.adapters.Feed.slot_masks`). Pure torch: no I/O, no hooks.

Per image, over valid (non-padding) pixels, slot k **owns** a pixel where it is the argmax and its mask
value is >= ``confidence``; it is **active** if it owns at least ``min_pixels`` pixels. Bare-argmax counts
and mass counts are reported beside it because each alone misleads on near-uniform masks: bare argmax
says "1 slot" and mass >= 5% says "all of them" for the same masks.

``SlotStats`` is a streaming accumulator (``update`` / ``merge`` / ``compute`` / ``reset``); every state is
a tensor that adds across batches and processes (``all_reduce`` with SUM). ``slot_health`` is its one-shot
functional twin, the test oracle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

_STATE_NAMES = (
    "images", "pixels", "active_hist", "argmax_active", "mass_active", "largest_share", "entropy",
    "slot_active", "iou_sum", "iou_count",
)  # fmt: skip


@dataclass(frozen=True)
class SlotParams:
    """Thresholds of the occupancy definitions."""

    confidence: float = 0.5
    min_pixels: int = 1
    mass_threshold: float = 0.05
    duplicate_iou: float = 0.5


@dataclass(frozen=True)
class SlotHealth:
    """Occupancy of a slot mask over an audit set; plain numbers and lists only (JSON-ready)."""

    num_slots: int
    images: int
    pixels: int
    mean_active: float
    active_histogram: list[int]  # images with 0, 1, ..., K active slots
    mean_argmax_active: float  # slots winning >= 1 pixel by bare argmax, per image
    mean_mass_active: float  # slots holding >= mass_threshold of the image's mask mass, per image
    largest_slot_share: float  # share of an image's valid pixels won (argmax) by its largest slot
    mask_entropy: float  # mean over valid pixels of -sum m log m / log K; 1 = uniform
    slot_usage: list[float]  # fraction of images where slot k is active
    never_used: list[int]
    duplicate_pairs: list[tuple[int, int, float]]  # (j, k, mean soft IoU) with IoU >= duplicate_iou
    params: SlotParams = field(default_factory=SlotParams)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["duplicate_pairs"] = [list(pair) for pair in self.duplicate_pairs]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SlotHealth:
        values = dict(data)
        values["params"] = SlotParams(**values.get("params", {}))
        values["duplicate_pairs"] = [(int(j), int(k), float(iou)) for j, k, iou in values["duplicate_pairs"]]
        return cls(**values)


def batch_state(masks: torch.Tensor, valid: torch.Tensor | None, params: SlotParams) -> dict[str, torch.Tensor]:
    """Additive statistics of one batch: ``masks`` (N, K, ...) summing to 1 over K, ``valid`` (N, ...)."""
    m = masks.detach().flatten(2).double()  # sums over many images: float32 would drift
    num_slots = m.shape[1]
    v = _valid_weights(valid, m)
    pixels = v.sum(1)
    ok = (pixels > 0).double()  # images without valid pixels are skipped
    top, winner = m.max(dim=1)
    # per image and slot: valid pixels it wins by argmax, and those it wins with confidence (it owns)
    argmax_count = _per_slot(winner, v, num_slots)
    owned = _per_slot(winner, v * top.ge(params.confidence).double(), num_slots)
    active = owned.ge(params.min_pixels).double() * ok.unsqueeze(1)
    mv = m * v.unsqueeze(1)
    mass = mv.sum(2)
    heavy = (mass / pixels.clamp_min(1).unsqueeze(1)).ge(params.mass_threshold).double() * ok.unsqueeze(1)
    inter, union = _soft_overlap(mv, mass)
    both = heavy.unsqueeze(2) * heavy.unsqueeze(1)
    entropy = -torch.xlogy(m, m).sum(1) / math.log(num_slots) if num_slots > 1 else torch.zeros_like(v)
    return {
        "images": ok.sum(),
        "pixels": pixels.sum(),
        "active_hist": _histogram(active.sum(1), ok, num_slots),
        "argmax_active": (argmax_count.ge(1).double() * ok.unsqueeze(1)).sum(),
        "mass_active": heavy.sum(),
        "largest_share": (argmax_count.max(1).values / pixels.clamp_min(1) * ok).sum(),
        "entropy": (entropy * v).sum(),
        "slot_active": active.sum(0),
        "iou_sum": (inter / union.clamp_min(1e-12) * both).sum(0),
        "iou_count": both.sum(0),
    }


def _per_slot(winner: torch.Tensor, weight: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(N, K): per image, the sum of ``weight`` (N, P) over the pixels whose winning slot is k."""
    return torch.zeros(winner.shape[0], num_slots, dtype=weight.dtype, device=weight.device).scatter_add_(1, winner, weight)


def _valid_weights(valid: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    if valid is None:
        return torch.ones(m.shape[0], m.shape[2], dtype=m.dtype, device=m.device)
    v = valid.detach().flatten(1) if valid.dim() > 1 else valid.detach().reshape(m.shape[0], -1)
    if v.shape != (m.shape[0], m.shape[2]):
        raise ValueError(f"valid {tuple(valid.shape)} does not match the mask's spatial size {m.shape[2]}")
    return v.double()


def _histogram(counts: torch.Tensor, weights: torch.Tensor, num_slots: int) -> torch.Tensor:
    bins = torch.zeros(num_slots + 1, dtype=weights.dtype, device=counts.device)
    return bins.index_add_(0, counts.long(), weights)


def _soft_overlap(mv: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, K) sums of min and max of every pair of masks ``mv`` (N, K, P), whose sums over P are ``mass``.
    The min is summed for the pairs j < k only (one slot against the later ones at a time, to bound memory);
    the max from it (max(a, b) = a + b - min(a, b)), the lower half by symmetry, the diagonal is the mass."""
    inter = torch.diag_embed(mass)
    for j in range(mv.shape[1] - 1):
        inter[:, j, j + 1 :] = torch.minimum(mv[:, j : j + 1], mv[:, j + 1 :]).sum(2)
    upper = torch.triu(inter, diagonal=1)
    inter = inter + upper.transpose(1, 2)
    union = mass.unsqueeze(2) + mass.unsqueeze(1) - inter
    return inter, union


def finalize(state: Mapping[str, torch.Tensor], params: SlotParams) -> SlotHealth:
    """SlotHealth from summed states (the only host sync)."""
    s = {name: state[name].detach().double().cpu() for name in _STATE_NAMES}
    num_slots = s["slot_active"].shape[0]
    images = max(float(s["images"]), 1.0)
    usage = (s["slot_active"] / images).tolist()
    return SlotHealth(
        num_slots=num_slots,
        images=round(float(s["images"])),
        pixels=round(float(s["pixels"])),
        mean_active=float(s["active_hist"] @ torch.arange(num_slots + 1, dtype=torch.float64)) / images,
        active_histogram=[round(x) for x in s["active_hist"].tolist()],
        mean_argmax_active=float(s["argmax_active"]) / images,
        mean_mass_active=float(s["mass_active"]) / images,
        largest_slot_share=float(s["largest_share"]) / images,
        mask_entropy=float(s["entropy"]) / max(float(s["pixels"]), 1.0),
        slot_usage=usage,
        never_used=[k for k, u in enumerate(usage) if u == 0.0],
        duplicate_pairs=_duplicates(s["iou_sum"], s["iou_count"], params.duplicate_iou),
        params=params,
    )


def _duplicates(iou_sum: torch.Tensor, iou_count: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    mean = iou_sum / iou_count.clamp_min(1)
    num_slots = mean.shape[0]
    return [
        (j, k, float(mean[j, k]))
        for j in range(num_slots)
        for k in range(j + 1, num_slots)
        if iou_count[j, k] > 0 and mean[j, k] >= threshold
    ]


def slot_health(masks: torch.Tensor, valid: torch.Tensor | None = None, *,
                params: SlotParams | None = None) -> SlotHealth:
    """One-shot occupancy of ``masks`` (N, K, ...); the functional twin of ``SlotStats``."""
    params = params or SlotParams()
    return finalize(batch_state(masks, valid, params), params)


class SlotStats:
    """Streaming, mergeable slot-occupancy accumulator."""

    def __init__(self, num_slots: int, *, params: SlotParams | None = None,
                 device: torch.device | str | None = None) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.params = params or SlotParams()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.state: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        k = self.num_slots
        shapes: dict[str, tuple[int, ...]] = {name: () for name in _STATE_NAMES}
        shapes.update(active_hist=(k + 1,), slot_active=(k,), iou_sum=(k, k), iou_count=(k, k))
        self.state = {name: torch.zeros(shape, dtype=torch.float64, device=self.device)
                      for name, shape in shapes.items()}

    def update(self, masks: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if masks.dim() < 3 or masks.shape[1] != self.num_slots:
            raise ValueError(f"expected masks (N, {self.num_slots}, ...), got {tuple(masks.shape)}")
        if masks.device != self.device:
            self._move(masks.device)
        for name, value in batch_state(masks, valid, self.params).items():
            self.state[name] += value.double()

    def _move(self, device: torch.device) -> None:
        self.device = device
        self.state = {name: value.to(device) for name, value in self.state.items()}

    def merge(self, other: SlotStats) -> SlotStats:
        """A new accumulator equal to one that had seen both streams (same K and thresholds), as
        `deadneuron.stats.ChannelStats.merge`; neither operand changes."""
        if other.num_slots != self.num_slots or other.params != self.params:
            raise ValueError("cannot merge SlotStats with different slot counts or thresholds")
        out = SlotStats(self.num_slots, params=self.params, device=self.device)
        out.state = {name: value + other.state[name].to(self.device) for name, value in self.state.items()}
        return out

    def compute(self) -> SlotHealth:
        return finalize(self.state, self.params)
