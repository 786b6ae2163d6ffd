"""deadneuron.Monitor under torch.distributed: two gloo ranks train a small CNN under DDP, and every
snapshot of each rank equals plain torch over the inputs of both ranks in that window, with the weights
of each step (counts exactly, moments and gradient means closely); both ranks keep the same timeline.
``distributed=False`` keeps each rank to its own batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import dist_helpers, monitor_dist
from tests.monitor_dist import BATCH, EVERY, SIDE, SITES, STEPS, oracle_forward


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("monitor_ranks")
    dist_helpers.spawn(2, tmp, target=monitor_dist.worker)
    return [torch.load(tmp / f"monitor{rank}.pt", weights_only=True) for rank in range(2)]


def _window(ranks: list[dict[str, Any]], steps: range) -> dict[str, dict[str, np.ndarray]]:
    """Per site, (channels, elements) arrays of z, a and dL/dz over both ranks' batches of ``steps``."""
    parts: dict[str, dict[str, list[np.ndarray]]] = {site: {"z": [], "a": [], "g": []} for site in SITES}
    for step in steps:
        state = ranks[0]["states"][step]
        for got in ranks:
            assert all(torch.equal(state[k], v) for k, v in got["states"][step].items())  # DDP: the same weights
            x, y = got["inputs"][step]
            z1, a1, z2, a2, logits = oracle_forward(state, x)
            g1, g2 = torch.autograd.grad(F.cross_entropy(logits, y), [z1, z2])  # each rank's own loss
            for site, tensors in zip(SITES, ((z1, a1, g1), (z2, a2, g2)), strict=True):
                for key, t in zip("zag", tensors, strict=True):
                    parts[site][key].append(t.detach().transpose(0, 1).reshape(t.shape[1], -1).double().numpy())
    return {site: {k: np.concatenate(v, axis=1) for k, v in p.items()} for site, p in parts.items()}


def test_both_ranks_get_the_same_timeline(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["entries"] == ranks[1]["entries"]
    assert ranks[0]["details"] == ranks[1]["details"]
    assert [e["step"] for e in ranks[0]["entries"]] == list(range(EVERY, STEPS + 1, EVERY))


def test_each_snapshot_equals_plain_torch_over_both_ranks_inputs(ranks: list[dict[str, Any]]) -> None:
    for entry, details in zip(ranks[0]["entries"], ranks[0]["details"], strict=True):
        oracle = _window(ranks, range(entry["first_step"], entry["step"]))
        for site in SITES:
            z, a, g = oracle[site]["z"], oracle[site]["a"], oracle[site]["g"]
            got, figures = details[site], entry["sites"][site]
            assert got["n"] == figures["n"] == figures["grad_elements"] == z.shape[1] == 2 * EVERY * BATCH * SIDE * SIDE
            np.testing.assert_array_equal(got["zero"], (a == 0).sum(1) / z.shape[1])
            np.testing.assert_array_equal(got["min"], a.min(1))
            np.testing.assert_array_equal(got["max"], a.max(1))
            np.testing.assert_allclose(got["mean"], a.mean(1), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(got["std"], a.std(1), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(got["abs_mean"], np.abs(a).mean(1), rtol=1e-6)
            np.testing.assert_array_equal(got["grad_nonzero"], (g != 0).mean(1))
            np.testing.assert_allclose(got["grad_abs_mean"], np.abs(g).mean(1), rtol=1e-5)
        relu_z = oracle["relu"]["z"]
        assert details["relu"]["dead"] == entry["sites"]["relu"]["dead_channels"] == np.flatnonzero((relu_z <= 0).all(1)).tolist()
        assert 1 in details["relu"]["dead"]  # the planted channel


def test_distributed_false_measures_each_rank_alone(ranks: list[dict[str, Any]]) -> None:
    assert [got["alone_n"] for got in ranks] == [EVERY * BATCH * SIDE * SIDE] * 2


def test_the_oracle_sees_different_data_on_the_two_ranks(ranks: list[dict[str, Any]]) -> None:
    """The merge is tested on ranks whose batches differ (else one rank's figures would pass for both)."""
    x0, x1 = ranks[0]["inputs"][0][0], ranks[1]["inputs"][0][0]
    assert not torch.equal(x0, x1)
