"""ARC grids as one-hot tensors: splits, encoding, deterministic size-grouped batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arc_model import data


@pytest.fixture(scope="module")
def train_grids() -> list[np.ndarray]:
    return data.load_grids("train")


def test_splits_are_the_distinct_arc_agi_1_grids(train_grids: list[np.ndarray]) -> None:
    assert len(train_grids) == 3341
    assert len(data.load_grids("heldout")) == 3528
    with pytest.raises(ValueError, match="unknown split"):
        data.load_grids("test")  # type: ignore[arg-type]


def test_encode_crops_to_the_largest_grid_and_marks_padding() -> None:
    grids = [np.array([[1, 2, 3]]), np.array([[0], [9]])]
    batch = data.encode(grids)
    assert batch.x.shape == (2, 11, 2, 3)
    assert torch.equal(batch.x.sum(1), torch.ones(2, 2, 3))  # one-hot over 10 colours + pad
    assert batch.valid.tolist() == [[[True, True, True], [False, False, False]],
                                    [[True, False, False], [True, False, False]]]
    assert batch.target.tolist() == [[[1, 2, 3], [-1, -1, -1]], [[0, -1, -1], [9, -1, -1]]]
    assert torch.equal(batch.x[:, data.NUM_COLOURS].bool(), ~batch.valid)
    assert batch.x[1, 9, 1, 0] == 1.0


def test_num_grids_is_a_seeded_subset(train_grids: list[np.ndarray]) -> None:
    a, b = data.select_grids(train_grids, 200, seed=0), data.select_grids(train_grids, 200, seed=0)
    assert len(a) == 200 and all(x is y for x, y in zip(a, b, strict=True))
    c = data.select_grids(train_grids, 200, seed=1)
    assert any(x is not y for x, y in zip(a, c, strict=True))
    assert len(data.select_grids(train_grids, None, seed=0)) == 3341


def test_epoch_batches_are_a_function_of_seed_and_epoch(train_grids: list[np.ndarray]) -> None:
    grids = data.select_grids(train_grids, 50, seed=0)

    def shapes(seed: int, epoch: int) -> list[tuple[int, ...]]:
        return [tuple(b.x.shape) for b in data.epoch_batches(grids, 8, seed=seed, epoch=epoch)]

    assert shapes(0, 3) == shapes(0, 3)
    assert shapes(0, 3) != shapes(0, 4)
    batches = list(data.epoch_batches(grids, 8, seed=0, epoch=0))
    assert len(batches) == data.num_batches(50, 8) == 7
    assert sum(int(b.valid.sum()) for b in batches) == sum(g.size for g in grids)


def test_eval_batches_cover_every_grid_once(train_grids: list[np.ndarray]) -> None:
    grids = data.select_grids(train_grids, 40, seed=2)
    batches = list(data.eval_batches(grids, 16))
    assert sum(len(b) for b in batches) == 40
    assert sum(int(b.valid.sum()) for b in batches) == sum(g.size for g in grids)
