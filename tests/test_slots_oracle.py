"""Slot occupancy against plain numpy loops over each image, following the definitions of `deadneuron.slots`:
random soft masks with padding, ties, one-hot images, an image with no valid pixel, K = 1, 2 and 7."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deadneuron.slots import SlotParams, SlotStats


def _oracle(masks: np.ndarray, valid: np.ndarray, p: SlotParams) -> dict[str, object]:
    """Per image, over valid pixels only: owned = argmax and >= confidence, active = owns >= min_pixels;
    bare argmax, mass share, largest share, entropy / log K, soft IoU (sum min / sum max) of heavy pairs."""
    n, k = masks.shape[:2]
    m = masks.reshape(n, k, -1).astype(np.float64)
    v = valid.reshape(n, -1).astype(bool)
    hist = np.zeros(k + 1)
    usage = np.zeros(k)
    iou_sum, iou_count = np.zeros((k, k)), np.zeros((k, k))
    images = argmax_active = mass_active = largest = entropy = pixels = 0.0
    for i in range(n):
        cells = np.flatnonzero(v[i])
        pixels += len(cells)
        for c in cells:
            col = m[i, :, c]
            entropy += -sum(x * math.log(x) for x in col if x > 0) / math.log(k) if k > 1 else 0.0
        if len(cells) == 0:
            continue
        images += 1
        mi = m[i][:, cells]
        winner = mi.argmax(0)
        wins = np.array([(winner == j).sum() for j in range(k)])
        owned = np.array([((winner == j) & (mi[j] >= p.confidence)).sum() for j in range(k)])
        active = owned >= p.min_pixels
        hist[active.sum()] += 1
        usage += active
        argmax_active += (wins >= 1).sum()
        share = mi.sum(1) / len(cells)
        heavy = share >= p.mass_threshold
        mass_active += heavy.sum()
        largest += wins.max() / len(cells)
        for a in range(k):
            for b in range(k):
                if heavy[a] and heavy[b]:
                    union = np.maximum(mi[a], mi[b]).sum()
                    iou_sum[a, b] += np.minimum(mi[a], mi[b]).sum() / union if union > 0 else 0.0
                    iou_count[a, b] += 1
    return {"images": images, "pixels": pixels, "hist": hist, "usage": usage, "argmax_active": argmax_active,
            "mass_active": mass_active, "largest": largest, "entropy": entropy, "iou_sum": iou_sum,
            "iou_count": iou_count}  # fmt: skip


def _batch(k: int, h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.softmax(torch.randn(6, k, h, h, generator=g) * 3, 1)
    masks[0, :, 0, 0] = 1.0 / k  # a tie on one pixel
    masks[1] = 0.0
    masks[1, 0] = 1.0  # one image held by one slot
    masks[3, :, :, :1] = torch.softmax(torch.zeros(k, h, 1), 0)  # a uniform column
    valid = torch.rand(6, h, h, generator=g) > 0.3
    valid[2] = False  # an image of padding only: skipped
    return masks, valid


@pytest.mark.parametrize(("k", "h"), [(7, 9), (2, 5), (1, 4), (3, 30)])
def test_slot_state_matches_numpy(k: int, h: int) -> None:
    params = SlotParams(confidence=0.4, min_pixels=2, mass_threshold=0.1)
    stats = SlotStats(k, params=params)
    batches = [_batch(k, h, seed) for seed in range(2)]
    for masks, valid in batches:
        stats.update(masks, valid)
    health = stats.compute()
    want = [_oracle(mk.numpy(), vd.numpy(), params) for mk, vd in batches]
    total = {key: sum(w[key] for w in want) for key in want[0]}  # type: ignore[misc]
    images = total["images"]
    assert health.images == images
    assert health.pixels == total["pixels"]
    assert health.active_histogram == [round(x) for x in total["hist"]]  # type: ignore[union-attr]
    np.testing.assert_allclose(health.slot_usage, total["usage"] / images)  # type: ignore[operator]
    assert health.mean_argmax_active == pytest.approx(total["argmax_active"] / images)  # type: ignore[operator]
    assert health.mean_mass_active == pytest.approx(total["mass_active"] / images)  # type: ignore[operator]
    assert health.largest_slot_share == pytest.approx(total["largest"] / images)  # type: ignore[operator]
    assert health.mask_entropy == pytest.approx(total["entropy"] / total["pixels"], rel=1e-9)  # type: ignore[operator]
    iou = total["iou_sum"] / np.maximum(total["iou_count"], 1)  # type: ignore[operator]
    expected = [(a, b, iou[a, b]) for a in range(k) for b in range(a + 1, k)
                if total["iou_count"][a, b] > 0 and iou[a, b] >= params.duplicate_iou]  # type: ignore[index]
    assert [(a, b) for a, b, _ in health.duplicate_pairs] == [(a, b) for a, b, _ in expected]
    np.testing.assert_allclose([x for *_, x in health.duplicate_pairs], [x for *_, x in expected], rtol=1e-12)
    state = stats.state
    np.testing.assert_allclose(state["iou_sum"].numpy(), total["iou_sum"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(state["iou_count"].numpy(), total["iou_count"])
