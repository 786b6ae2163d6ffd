"""The training loop: learning, determinism, exact resume, the checkpoint format, safe writing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from arc_model.config import TrainConfig
from arc_model.train import main, train
from deadneuron.adapters import CHECKPOINT_FORMAT
from deadneuron.errors import WriteError

# A tiny model on 12 grids: 3 steps per epoch, seconds per test.
TINY = TrainConfig(
    CHANNELS=8, SLOT_DIM=8, NUM_SLOTS=3, NUM_GRIDS=12, BATCH_SIZE=4, TIMELINE_GRIDS=4, TIMELINE_EVERY=100,
    LEARNING_RATE=3e-3, NUM_EPOCHS=1000,
)


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_few_steps_lower_the_loss() -> None:
    cfg = TINY.replace(NUM_GRIDS=4, LEARNING_RATE=1e-2)  # one batch per epoch: history per step
    losses = [r["loss"] for r in train(cfg, max_steps=15, progress=False)["history"]]
    assert len(losses) == 15
    assert min(losses[-3:]) < losses[0] * 0.9


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a = train(TINY, max_steps=4, progress=False)
    b = train(TINY, max_steps=4, progress=False)
    c = train(TINY.replace(SEED=1), max_steps=4, progress=False)
    assert_same_weights(a["state_dict"], b["state_dict"])
    assert not torch.equal(a["state_dict"]["encoder.conv_layers.0.weight"], c["state_dict"]["encoder.conv_layers.0.weight"])


@pytest.mark.parametrize("stop_at", [3, 4], ids=["epoch-boundary", "mid-epoch"])
def test_resume_equals_uninterrupted_training(stop_at: int) -> None:
    cfg = TINY.replace(TIMELINE_EVERY=1, DROPOUT=0.3)  # dropout and slot noise draw from the RNG
    whole = train(cfg, max_steps=7, progress=False)
    first = train(cfg, max_steps=stop_at, progress=False)
    resumed = train(cfg, init=first, max_steps=7, progress=False)
    assert_same_weights(whole["state_dict"], resumed["state_dict"])
    assert (resumed["step"], resumed["epoch"]) == (whole["step"], whole["epoch"]) == (7, 2)
    assert resumed["history"] == whole["history"]
    # The interrupted run also took a snapshot where it stopped; the first covers the first step.
    assert [e["step"] for e in resumed["health_timeline"]] == sorted({1, 3, 6, 7, stop_at})


def test_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    out = tmp_path / "run.pth"
    returned = train(TINY, out=out, max_steps=3, progress=False)
    ckpt = torch.load(out, weights_only=True, map_location="cpu")
    assert (ckpt["format"], ckpt["version"], ckpt["adapter"]) == (CHECKPOINT_FORMAT, 1, "arc-slot")
    assert TrainConfig.from_dict(ckpt["config"]) == TINY
    assert_same_weights(ckpt["state_dict"], returned["state_dict"])
    assert ckpt["optimizer_state"]["state"]
    assert ckpt["history"][0].keys() >= {"epoch", "step", "loss", "train_accuracy", "heldout_accuracy"}
    entry = ckpt["health_timeline"][-1]
    assert entry["step"] == 3
    assert entry["sites"]["encoder.bn_layers.3>relu"].keys() >= {"sparsity", "flat_fraction", "dead_channels"}
    assert 0 <= entry["slots"]["mean_active"] <= 3
    assert 0 <= entry["metrics"]["valid_pixel_accuracy"] <= 1
    assert [(e["first_step"], e["step"]) for e in ckpt["health_timeline"]] == [(0, 1), (1, 3)]


def test_existing_out_is_refused_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "keep.pth"
    out.write_bytes(b"precious")
    with pytest.raises(WriteError, match="exists"):
        train(TINY, out=out, max_steps=1, progress=False)
    assert out.read_bytes() == b"precious"


def test_ctrl_c_leaves_the_last_complete_checkpoint_and_no_temp_file(tmp_path: Path) -> None:
    out = tmp_path / "run.pth"

    def interrupt(record: dict[str, Any]) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TINY.replace(TIMELINE_EVERY=1), out=out, max_steps=9, progress=False, callbacks=[interrupt])
    assert [p.name for p in tmp_path.iterdir()] == ["run.pth"]
    assert torch.load(out, weights_only=True)["epoch"] == 2


def test_command_line_writes_a_small_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.pth"
    overrides = [f"{k}={v}" for k, v in TINY.to_dict().items() if v is not None]
    assert main(["--config", *overrides, "--out", str(out), "--max-steps", "2", "--quiet", "--no-optimizer-state"]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["optimizer_state"] is None and ckpt["step"] == 2
    assert "wrote" in capsys.readouterr().err
