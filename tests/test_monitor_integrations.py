"""The Lightning and Hugging Face callbacks with the real packages, on tiny models built from code and
configs (no download). Skipped only where the extra is not installed (`make test` installs both)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tests.monitor_models import StashCNN, dead_oracle, hook_count, teacher_batches

needs_lightning = pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning not installed")
needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers/accelerate not installed",
)


@needs_lightning
def test_lightning_callback_logs_through_the_trainer_s_logger(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from deadneuron.integrations.lightning import DeadneuronCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = StashCNN()
            self.net.stash = {}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            self.net.step = self.global_step
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=3e-2)

    torch.manual_seed(0)
    module = Module()
    before = hook_count(module)
    callback = DeadneuronCallback(every=5)
    trainer = pl.Trainer(max_steps=20, callbacks=[callback], logger=CSVLogger(tmp_path), accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=10, num_sanity_val_steps=0)  # fmt: skip
    data = teacher_batches(20)
    trainer.fit(module, DataLoader(data, batch_size=None), DataLoader([(-x, y) for x, y in data[:4]], batch_size=None))
    assert hook_count(module) == before
    assert [s.step for s in callback.snapshots] == [5, 10, 15, 20]
    for snap in callback.snapshots:  # validation passes (eval mode) were not measured
        expected = dead_oracle(module.net.stash["bn>relu"], snap.first_step, snap.step)
        assert set(snap.sites["net.bn>relu"].dead_channels) == expected
    assert callback.monitor is not None and callback.monitor.optimizer_name == "adam"
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    logged = [(int(r["step"]), float(r["deadneuron/dead/net.bn>relu"])) for r in rows if r.get("deadneuron/dead/net.bn>relu")]
    assert logged == [(s.step, float(s.sites["net.bn>relu"].dead)) for s in callback.snapshots]
    assert "channels-dying" in {f.rule for f in callback.findings()}


@needs_lightning
def test_lightning_callback_removes_its_hooks_when_fit_raises(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from deadneuron.integrations.lightning import DeadneuronCallback

    class Failing(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch: torch.Tensor, index: int) -> torch.Tensor:
            if index == 3:
                raise RuntimeError("boom")
            return self.net(batch).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Failing()
    before = hook_count(module)
    trainer = pl.Trainer(max_steps=10, callbacks=[DeadneuronCallback(every=2)], logger=False, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, DataLoader([torch.randn(2, 4) for _ in range(8)], batch_size=None))
    assert hook_count(module) == before and torch._C._len_torch_function_stack() == 0


@needs_hf
def test_hf_callback_logs_through_trainer_log_on_a_bert_built_from_a_config(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from deadneuron.integrations.hf import DeadneuronCallback

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 50, (8,), generator=gen), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(24)]  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True, logging_strategy="no",
                             learning_rate=1e-3)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    before = hook_count(model)
    with DeadneuronCallback.attach(trainer, every=2) as callback:
        trainer.train()
    assert hook_count(model) == before
    assert [s.step for s in callback.snapshots] == [2, 4, 6]
    (site,) = [name for name in callback.snapshots[0].sites if "intermediate" in name]  # the GELU of the MLP
    figures = callback.snapshots[-1].sites[site]
    assert figures.channels == 32 and figures.n == 2 * 4 * 8 and figures.grad_elements == figures.n
    logged = [r for r in trainer.state.log_history if f"deadneuron/dead/{site}" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert [r[f"deadneuron/grad_nonzero/{site}"] for r in logged] == pytest.approx(
        [s.sites[site].grad_nonzero for s in callback.snapshots])
    assert callback.monitor is not None and callback.monitor.learning_rate is not None
    assert isinstance(callback.findings(), list)
