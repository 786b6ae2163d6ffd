"""ArcSlotAdapter: the Adapter protocol, entry-point lookup, loading, batches, metrics."""

from __future__ import annotations

import pytest
import torch

from arc_model.adapter import ArcSlotAdapter
from arc_model.config import TrainConfig
from deadneuron.adapters import Adapter, available_adapters, get_adapter
from deadneuron.errors import ModelMismatchError, UsageError

SMALL = TrainConfig(CHANNELS=8, SLOT_DIM=8, NUM_SLOTS=3, NUM_GRIDS=10, BATCH_SIZE=4)


def test_implements_the_protocol_and_is_registered() -> None:
    assert isinstance(ArcSlotAdapter(), Adapter)
    assert "arc-slot" in available_adapters()
    assert isinstance(get_adapter("arc-slot"), ArcSlotAdapter)


def test_load_gives_the_same_model_in_eval_mode() -> None:
    adapter = ArcSlotAdapter()
    model = adapter.build(SMALL.to_dict())
    ckpt = {"config": SMALL.to_dict(), "state_dict": model.state_dict()}
    loaded = adapter.load(ckpt)
    assert not loaded.training
    batch = next(iter(adapter.batches("train", SMALL.to_dict())))
    with torch.no_grad():
        assert torch.equal(adapter.forward(loaded, batch).logits, adapter.forward(model.eval(), batch).logits)


def test_load_refuses_a_state_dict_of_another_shape() -> None:
    state = ArcSlotAdapter().build(SMALL.to_dict()).state_dict()
    with pytest.raises(ModelMismatchError, match="does not fit"):
        ArcSlotAdapter().load({"config": SMALL.replace(CHANNELS=16).to_dict(), "state_dict": state})


def test_batches_cover_the_split() -> None:
    adapter = ArcSlotAdapter()
    assert sum(len(b) for b in adapter.batches("heldout", {"BATCH_SIZE": 256})) == 3528
    assert sum(len(b) for b in adapter.batches("train", SMALL.to_dict())) == 10
    assert sum(len(b) for b in adapter.batches("heldout", {}, max_grids=7)) == 7
    with pytest.raises(UsageError, match="unknown split"):
        adapter.batches("test", {})


def test_masks_and_metrics_from_outputs() -> None:
    adapter = ArcSlotAdapter()
    model = adapter.build(SMALL.to_dict()).eval()
    batch = next(iter(adapter.batches("train", SMALL.to_dict())))
    with torch.no_grad():
        out = adapter.forward(model, batch)
    masks, valid = adapter.slot_masks(out, batch)
    assert masks.shape[:2] == (len(batch), 3) and torch.equal(valid, batch.valid)
    sums = {k: float(v) for k, v in adapter.metric_sums(out, batch).items()}
    assert sums["valid_pixels"] == float(batch.valid.sum()) and sums["grids"] == len(batch)
    summary = adapter.summarize_metrics(sums)
    assert set(summary) == {"valid_pixel_accuracy", "exact_grid_accuracy", "baseline_valid_pixel_accuracy",
                            "baseline_exact_grid_accuracy"}


def test_config_parsing_for_the_cli() -> None:
    adapter = ArcSlotAdapter()
    assert adapter.default_config() == TrainConfig().to_dict()
    parsed = adapter.parse_config(["BATCH_NORM=false", "LEARNING_RATE=3e-3"], base={"SEED": 2})
    assert (parsed["BATCH_NORM"], parsed["LEARNING_RATE"], parsed["SEED"]) == (False, 3e-3, 2)
    with pytest.raises(UsageError, match="valid keys"):
        adapter.parse_config(["LR=1"])
    with pytest.raises(UsageError, match="unknown config key"):
        adapter.build({"LR": 1})
