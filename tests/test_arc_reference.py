"""The healthy reference checkpoint segments: its slot figures, recomputed in plain numpy from the masks the
model itself returns on held-out grids, match deadneuron's, and they show slots that own parts of grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from arc_model import data
from arc_model.adapter import ArcSlotAdapter
from deadneuron.slots import slot_health

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "slot_attention_healthy.pth"
PROBE = 128  # held-out grids: the first of the timeline's fixed probe order


@pytest.fixture(scope="module")
def outputs() -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(masks (N, K, H, W), valid (N, H, W), prediction (N, H, W), target (N, H, W)) per batch, numpy."""
    ckpt = torch.load(CHECKPOINT, weights_only=True, map_location="cpu")
    model = ArcSlotAdapter().load(ckpt)
    found = []
    with torch.no_grad():
        for batch in data.eval_batches(data.probe_grids(PROBE), 32):
            out = model(batch.x)
            found.append((out.masks.numpy().astype(np.float64), batch.valid.numpy(),
                          out.logits.argmax(1).numpy(), batch.target.numpy()))
    return found


def numpy_figures(masks: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    """Per image, over valid cells: slot k owns a cell where it is the argmax with mask >= 0.5; active =
    owns >= 1 cell. Largest share = cells won by the top argmax slot / valid cells. Entropy in units of
    log K, averaged over valid cells. Mass active = slots holding >= 5% of the image's mask mass."""
    num_slots = masks.shape[1]
    active, largest, mass_active, entropy_sum, cells = [], [], [], 0.0, 0
    for m, v in zip(masks, valid, strict=True):
        mv = m[:, v]  # (K, cells)
        winner, top = mv.argmax(0), mv.max(0)
        owned = np.array([np.sum((winner == k) & (top >= 0.5)) for k in range(num_slots)])
        won = np.array([np.sum(winner == k) for k in range(num_slots)])
        active.append(int(np.sum(owned >= 1)))
        largest.append(won.max() / v.sum())
        mass_active.append(int(np.sum(mv.mean(1) >= 0.05)))
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy_sum += float(np.nansum(-mv * np.log(mv)) / np.log(num_slots))
        cells += int(v.sum())
    return {"active": active, "largest": largest, "mass_active": mass_active, "entropy": entropy_sum / cells}


def test_slot_figures_match_a_numpy_recount(outputs: list[tuple[np.ndarray, ...]]) -> None:
    masks = [m for m, *_ in outputs]
    valid = [v for _, v, *_ in outputs]
    expected: dict[str, list[float]] = {"active": [], "largest": [], "mass_active": []}
    entropy_cells = 0.0
    for m, v in zip(masks, valid, strict=True):
        figures = numpy_figures(m, v)
        for key in expected:
            expected[key] += figures[key]
        entropy_cells += figures["entropy"] * v.sum()
    health = slot_health(torch.cat([torch.from_numpy(_pad(m, masks)) for m in masks]),
                         torch.cat([torch.from_numpy(_pad(v, valid)) for v in valid]))
    assert health.images == PROBE
    assert health.mean_active == pytest.approx(np.mean(expected["active"]))
    assert health.active_histogram == np.bincount(expected["active"], minlength=masks[0].shape[1] + 1).tolist()
    assert health.largest_slot_share == pytest.approx(np.mean(expected["largest"]))
    assert health.mean_mass_active == pytest.approx(np.mean(expected["mass_active"]))
    assert health.mask_entropy == pytest.approx(entropy_cells / sum(v.sum() for v in valid))


def test_the_reference_segments_and_beats_the_baseline(outputs: list[tuple[np.ndarray, ...]]) -> None:
    active, largest, correct, baseline, cells = [], [], 0, 0, 0
    for masks, valid, prediction, target in outputs:
        figures = numpy_figures(masks, valid)
        active += figures["active"]
        largest += figures["largest"]
        correct += int(np.sum((prediction == target) & valid))
        for t, v in zip(target, valid, strict=True):
            baseline += int(np.bincount(t[v], minlength=10).max())  # most common colour of the grid
        cells += int(valid.sum())
    assert np.mean(active) >= 2.0  # at least two slots own cells confidently, per grid on average
    assert np.mean(largest) < 0.9  # no slot paints whole grids
    assert correct / cells >= baseline / cells + 0.05


def _pad(array: np.ndarray, group: list[np.ndarray]) -> np.ndarray:
    """Zero-pad the trailing (H, W) of ``array`` to the largest in ``group`` (padding cells are invalid)."""
    height = max(a.shape[-2] for a in group)
    width = max(a.shape[-1] for a in group)
    pad = [(0, 0)] * (array.ndim - 2) + [(0, height - array.shape[-2]), (0, width - array.shape[-1])]
    return np.pad(array, pad)
