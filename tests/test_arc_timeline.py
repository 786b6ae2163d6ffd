"""The ARC trainer's health timeline is deadneuron.Monitor's: each entry's figures equal a count over the
pre-activations of its window's training batches on their grid cells (padding left out), recomputed with
plain torch from the weights of each step; and the monitor leaves the training bit-identical to a plain
loop without it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from arc_model import data
from arc_model.config import TrainConfig
from arc_model.model import build_model
from arc_model.train import RunState, make_checkpoint, train, train_step

# 12 grids in batches of 4: 3 steps per epoch. No BatchNorm, so that planted biases kill channels.
CFG = TrainConfig(
    CHANNELS=8, SLOT_DIM=8, NUM_SLOTS=3, NUM_GRIDS=12, BATCH_SIZE=4, TIMELINE_GRIDS=4, TIMELINE_EVERY=100,
    LEARNING_RATE=3e-3, NUM_EPOCHS=1000, BATCH_NORM=False,
)
PLANTED = {1: [2, 5], 3: [0]}  # conv layer -> channels whose bias is -50: dead on every cell


def _planted_start() -> dict[str, Any]:
    torch.manual_seed(CFG.SEED)
    model = build_model(CFG)
    with torch.no_grad():
        for layer, channels in PLANTED.items():
            model.encoder.conv_layers[layer].bias[channels] = -50.0
    return make_checkpoint(model, None, CFG, RunState())


def _pre_activations(state: dict[str, torch.Tensor], batch: data.GridBatch) -> list[np.ndarray]:
    """z of each encoder conv layer on the batch's grid cells, (channels, cells), with plain torch."""
    model = build_model(CFG)
    model.load_state_dict(state)
    x, out = batch.x, []
    with torch.no_grad():
        for conv, bn in zip(model.encoder.conv_layers, model.encoder.bn_layers, strict=True):
            z = bn(conv(x))
            out.append(z.permute(1, 0, 2, 3)[:, batch.valid].numpy())
            x = torch.relu(z)
    return out


def test_each_entry_counts_the_window_s_training_batches_on_grid_cells() -> None:
    start = _planted_start()
    ckpt = train(CFG, init=start, max_steps=3, progress=False)
    timeline = ckpt["health_timeline"]
    assert [(e["first_step"], e["step"], e["sampled_steps"]) for e in timeline] == [(0, 1, 1), (1, 3, 2)]
    assert all(e["measured_on"] == "training batches" and e["learning_rate"] == 3e-3 for e in timeline)
    states = [start["state_dict"]] + [train(CFG, init=start, max_steps=k, progress=False)["state_dict"] for k in (1, 2)]
    batches = list(data.epoch_batches(data.training_grids(CFG.NUM_GRIDS, CFG.SEED), CFG.BATCH_SIZE, seed=CFG.SEED, epoch=0))
    for entry in timeline:
        steps = range(entry["first_step"], entry["step"])
        zs = [_pre_activations(states[k], batches[k]) for k in steps]
        for layer in range(CFG.NUM_CONV):
            z = np.concatenate([per_step[layer] for per_step in zs], axis=1)
            site = entry["sites"][f"encoder.bn_layers.{layer}>relu"]
            dead = np.flatnonzero((z <= 0).all(axis=1)).tolist()
            assert site["dead_channels"] == dead, (entry["step"], layer)
            assert set(PLANTED.get(layer, [])) <= set(dead)
            assert site["n"] == site["grad_elements"] == z.shape[1] == sum(int(batches[k].valid.sum()) for k in steps)
            assert site["sparsity"] == pytest.approx((z <= 0).sum() / z.size, rel=1e-12)
            assert site["abs_mean"] == pytest.approx(np.maximum(z, 0).mean(), rel=1e-5)
    # the run ended on the epoch's end: its record takes the probe-set accuracy of the last entry
    assert ckpt["history"][-1]["heldout_accuracy"] == timeline[-1]["metrics"]["valid_pixel_accuracy"]


def test_training_is_bit_identical_to_a_plain_loop_without_the_monitor() -> None:
    cfg = CFG.replace(DROPOUT=0.3, BATCH_NORM=True, TIMELINE_EVERY=1)  # RNG draws; BatchNorm re-estimation
    monitored = train(cfg, max_steps=4, progress=False)
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.LEARNING_RATE)
    grids = data.training_grids(cfg.NUM_GRIDS, cfg.SEED)
    for epoch in range(2):
        for batch in list(data.epoch_batches(grids, cfg.BATCH_SIZE, seed=cfg.SEED, epoch=epoch))[: 4 - 3 * epoch]:
            train_step(model, optimizer, batch)
    assert len(monitored["health_timeline"]) == 3  # after step 1, at the epoch's end (3), at the end (4)
    for key, value in model.state_dict().items():
        assert torch.equal(monitored["state_dict"][key], value), key
    assert torch.equal(monitored["rng_state"], torch.get_rng_state())
