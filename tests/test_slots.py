"""Slot occupancy (DESIGN section 3) on hand-made masks, and the streaming accumulator against its oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deadneuron.slots import SlotHealth, SlotParams, SlotStats, slot_health


def one_hot_masks(owner: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(N, H, W) slot index per pixel -> (N, K, H, W) hard masks."""
    return torch.nn.functional.one_hot(owner, num_slots).permute(0, 3, 1, 2).float()


def test_uniform_masks_have_no_active_slot_and_entropy_one() -> None:
    masks = torch.full((3, 7, 4, 5), 1 / 7)
    health = slot_health(masks)
    assert health.mean_active == 0.0
    assert health.active_histogram == [3, 0, 0, 0, 0, 0, 0, 0]
    assert health.mask_entropy == pytest.approx(1.0)
    assert health.mean_mass_active == 7.0  # every slot holds 1/7 > 5% of the mass
    assert health.mean_argmax_active == 1.0  # ties go to the first slot: bare argmax says "1 slot"
    assert health.never_used == list(range(7))


def test_one_hot_masks_give_exact_counts() -> None:
    owner = torch.tensor([[[0, 0, 1], [0, 2, 2]], [[3, 3, 3], [3, 3, 3]]])
    health = slot_health(one_hot_masks(owner, 4))
    assert health.active_histogram == [0, 1, 0, 1, 0]
    assert health.mean_active == 2.0
    assert health.mean_argmax_active == 2.0
    assert health.mean_mass_active == 2.0  # slot 1 holds 1/6 >= 5%, all present slots count
    assert health.largest_slot_share == pytest.approx((3 / 6 + 1.0) / 2)
    assert health.mask_entropy == pytest.approx(0.0)
    assert health.slot_usage == [0.5, 0.5, 0.5, 0.5]
    assert health.never_used == []
    assert health.duplicate_pairs == []
    assert (health.images, health.pixels) == (2, 12)


def test_collapse_to_one_slot() -> None:
    masks = torch.zeros(2, 5, 3, 3)
    masks[:, 2] = 0.9
    masks[:, [0, 1, 3, 4]] = 0.025
    health = slot_health(masks)
    assert health.largest_slot_share == 1.0
    assert health.mean_active == 1.0
    assert health.slot_usage == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert health.never_used == [0, 1, 3, 4]


def test_padding_pixels_are_ignored() -> None:
    owner = torch.tensor([[[0, 0, 1], [0, 0, 1]]])
    valid = torch.tensor([[[True, True, False], [True, True, False]]])
    health = slot_health(one_hot_masks(owner, 2), valid)
    assert health.mean_active == 1.0
    assert health.pixels == 4
    assert health.slot_usage == [1.0, 0.0]


def test_confidence_and_min_pixels() -> None:
    masks = torch.tensor([0.45, 0.35, 0.2]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    masks[0, :, 0, 0] = torch.tensor([0.1, 0.8, 0.1])
    assert slot_health(masks).mean_active == 1.0  # slot 0 wins 3 pixels by argmax but owns none
    assert slot_health(masks).mean_argmax_active == 2.0
    assert slot_health(masks, params=SlotParams(min_pixels=2)).mean_active == 0.0
    assert slot_health(masks, params=SlotParams(confidence=0.4)).mean_active == 2.0


def test_duplicate_slots_are_flagged() -> None:
    masks = torch.zeros(4, 3, 2, 2)
    masks[:, 0, 0] = 0.5
    masks[:, 1, 0] = 0.5
    masks[:, 2, 1] = 1.0
    health = slot_health(masks)
    assert health.duplicate_pairs == [(0, 1, pytest.approx(1.0))]


def test_health_round_trips_through_json() -> None:
    owner = torch.randint(0, 4, (5, 3, 3), generator=torch.Generator().manual_seed(0))
    health = slot_health(one_hot_masks(owner, 4) * 0.7 + 0.075)
    data = json.loads(json.dumps(health.to_dict()))
    assert SlotHealth.from_dict(data) == health


@st.composite
def mask_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    n, k = draw(st.integers(1, 12)), draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    sharpness = draw(st.sampled_from([0.1, 1.0, 10.0]))
    masks = (torch.randn(n, k, h, w, generator=gen) * sharpness).softmax(dim=1)
    valid = torch.rand(n, h, w, generator=gen) < 0.8
    cuts = sorted(draw(st.lists(st.integers(1, n), max_size=3)))
    return masks, valid, cuts


def assert_health_close(a: SlotHealth, b: SlotHealth) -> None:
    da, db = a.to_dict(), b.to_dict()
    for key, value in da.items():
        if isinstance(value, float):
            assert math.isclose(value, db[key], rel_tol=1e-9, abs_tol=1e-9), key
        elif key == "duplicate_pairs":
            assert [p[:2] for p in value] == [p[:2] for p in db[key]]
            assert [p[2] for p in value] == pytest.approx([p[2] for p in db[key]])
        elif key == "slot_usage":
            assert value == pytest.approx(db[key]), key
        else:
            assert value == db[key], key


@settings(max_examples=40, deadline=None)
@given(mask_batches())
def test_streaming_equals_one_shot(batch: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
    masks, valid, cuts = batch
    stats = SlotStats(masks.shape[1])
    for lo, hi in zip([0, *cuts], [*cuts, masks.shape[0]], strict=True):
        if hi > lo:
            stats.update(masks[lo:hi], valid[lo:hi])
    assert_health_close(stats.compute(), slot_health(masks, valid))


@settings(max_examples=20, deadline=None)
@given(mask_batches())
def test_merge_equals_one_update(batch: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
    masks, valid, cuts = batch
    cut = cuts[0] if cuts else 0
    left, right = SlotStats(masks.shape[1]), SlotStats(masks.shape[1])
    left.update(masks[:cut], valid[:cut])
    right.update(masks[cut:], valid[cut:])
    assert_health_close(left.merge(right).compute(), slot_health(masks, valid))
    assert_health_close(left.compute(), slot_health(masks[:cut], valid[:cut]))  # merging leaves both as they were
    assert_health_close(right.compute(), slot_health(masks[cut:], valid[cut:]))


def test_reset_and_errors() -> None:
    stats = SlotStats(3)
    stats.update(torch.full((2, 3, 2, 2), 1 / 3))
    stats.reset()
    assert stats.compute().images == 0
    with pytest.raises(ValueError, match=r"\(N, 3, \.\.\.\)"):
        stats.update(torch.full((2, 4, 2, 2), 1 / 4))
    with pytest.raises(ValueError, match="merge"):
        stats.merge(SlotStats(4))
    with pytest.raises(ValueError, match="spatial size"):
        stats.update(torch.full((2, 3, 2, 2), 1 / 3), torch.ones(2, 3, 3, dtype=torch.bool))
