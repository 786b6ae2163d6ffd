"""The Lightning and Hugging Face callbacks on a user's tiny models: a resumed Lightning run continues its
health timeline, a run shorter than one snapshot interval gets its snapshot at the end, and a run that
records nothing says so instead of returning no findings in silence."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

needs_lightning = pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning not installed")
needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers/accelerate not installed",
)
PLANTED = 2


def mlp(*, activation: bool = True) -> nn.Sequential:
    """Linear 6 -> 8 (channel PLANTED dead: zero weights, bias -1), ReLU, Linear 8 -> 2; without
    ``activation`` no activation at all (nothing for the monitor to measure)."""
    fc = nn.Linear(6, 8)
    with torch.no_grad():
        fc.weight[PLANTED] = 0.0
        fc.bias[PLANTED] = -1.0
    return nn.Sequential(fc, nn.ReLU(), nn.Linear(8, 2)) if activation else nn.Sequential(fc, nn.Linear(8, 2))


def data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 2, (8,), generator=gen)) for _ in range(n)]


def lightning_module(*, activation: bool = True) -> Any:
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(activation=activation)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    return Module()


def fit(module: Any, callback: Any, tmp_path: Path, *, max_steps: int, ckpt_path: Path | None = None) -> Any:
    import lightning.pytorch as pl

    trainer = pl.Trainer(max_steps=max_steps, callbacks=[callback], logger=False, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(data(8), batch_size=None), ckpt_path=ckpt_path)
    return trainer


@needs_lightning
def test_a_lightning_run_resumed_from_a_checkpoint_continues_its_timeline(tmp_path: Path) -> None:
    from deadneuron.integrations.lightning import DeadneuronCallback

    first = DeadneuronCallback(every=2, log=False)
    trainer = fit(lightning_module(), first, tmp_path, max_steps=4)
    trainer.save_checkpoint(tmp_path / "step4.ckpt")
    resumed = DeadneuronCallback(every=2, log=False)  # a new process: a new callback, the checkpoint's state
    fit(lightning_module(), resumed, tmp_path, max_steps=8, ckpt_path=tmp_path / "step4.ckpt")
    assert [(s.first_step, s.step) for s in resumed.snapshots] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [s.to_dict() for s in resumed.snapshots[:2]] == [s.to_dict() for s in first.snapshots]
    assert all(list(s.sites["net.1"].dead_channels) == [PLANTED] for s in resumed.snapshots)
    found = {f.rule: f for f in resumed.findings()}
    assert "over steps 0-1" in found["dead-from-start"].message  # the run's first window, not the resume's


@needs_lightning
def test_a_lightning_run_shorter_than_one_interval_gets_its_snapshot_at_the_end(tmp_path: Path) -> None:
    from deadneuron.integrations.lightning import DeadneuronCallback

    callback = DeadneuronCallback(every=100, log=False)
    fit(lightning_module(), callback, tmp_path, max_steps=3)
    (snap,) = callback.snapshots
    assert (snap.first_step, snap.step, snap.sites["net.1"].n) == (0, 3, 3 * 8)
    assert any(f.channels.get("net.1") == (PLANTED,) for f in callback.findings())


@needs_lightning
@pytest.mark.parametrize("case", ["no-activation", "no-step"])
def test_a_lightning_run_that_records_nothing_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    from deadneuron.integrations.lightning import DeadneuronCallback

    callback = DeadneuronCallback(every=100, log=False)
    with caplog.at_level(logging.WARNING, logger="deadneuron"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the monitor's own warning and Lightning's
        fit(lightning_module(activation=case != "no-activation"), callback, tmp_path, max_steps=0 if case == "no-step" else 3)
    assert callback.snapshots == [] and callback.findings() == []
    said = [r.getMessage() for r in caplog.records if r.name == "deadneuron"]
    assert len(said) == 1 and "no health snapshot was recorded" in said[0], said


@needs_hf
def test_a_hugging_face_run_that_records_nothing_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import Trainer, TrainingArguments

    from deadneuron.integrations.hf import DeadneuronCallback

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(activation=False)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    rows = [{"x": x[i], "labels": y[i]} for x, y in data(2) for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1000)  # fmt: skip
    trainer = Trainer(model=Model(), args=args, train_dataset=rows)
    with caplog.at_level(logging.WARNING, logger="deadneuron"), \
            pytest.warns(RuntimeWarning, match="no activation"), DeadneuronCallback.attach(trainer, every=100) as callback:
        trainer.train()
    assert callback.snapshots == [] and callback.findings() == []
    said = [r.getMessage() for r in caplog.records if r.name == "deadneuron"]
    assert len(said) == 1 and "no health snapshot was recorded over this run (2 optimizer steps)" in said[0], said
