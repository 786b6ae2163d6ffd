"""The Lightning and Hugging Face callbacks with the real packages, on tiny models built from code and
configs (no download). Skipped only where the extra is not installed (`make test` installs both)."""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tests.monitor_models import hook_count

needs_lightning = pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning not installed")
needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers/accelerate not installed",
)
PLANTED = 5  # the hidden channel whose pre-activation is -1 on every input: dead from the start, and it stays


class PlantedMLP(nn.Module):
    """Linear 8 -> 16, ReLU (``act``), Linear 16 -> 2. Channel PLANTED of the first layer has zero weights
    and bias -1: its ReLU never fires, so it gets no gradient and Adam never moves it. With ``loss`` the
    forward takes ``labels`` and returns ``{"loss", "logits"}`` (what a Hugging Face Trainer expects)."""

    def __init__(self, *, loss: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 2)
        self.loss = loss
        with torch.no_grad():
            self.fc.weight[PLANTED] = 0.0
            self.fc.bias[PLANTED] = -1.0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.out(self.act(self.fc(x)))
        if not self.loss:
            return logits
        assert labels is not None
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def planted_batches(steps: int, *, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 8, generator=gen), torch.randint(0, 2, (batch,), generator=gen)) for _ in range(steps)]


class StoredZ:
    """The oracle: a plain forward hook on the ReLU module keeps its input z of every training forward pass
    and, through a tensor hook, dL/dz; `window` counts with plain torch what a snapshot should say."""

    def __init__(self, act: nn.Module) -> None:
        self.z: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.handle = act.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if module.training:
            self.z.append(args[0].detach().clone())
            args[0].register_hook(lambda g: self.grads.append(g.detach().clone()))

    def window(self, first: int, last: int) -> dict[str, Any]:
        """Figures over the training forward passes first .. last-1 (one per optimizer step)."""
        z, g = torch.cat(self.z[first:last]), torch.cat(self.grads[first:last])
        dead = ~(z > 0).any(0)  # a ReLU channel is dead when z <= 0 on every element
        return {"dead": float(dead.sum()), "dead_ids": set(torch.nonzero(dead).flatten().tolist()),
                "flat_fraction": (z <= 0).double().mean().item(), "grad_nonzero": (g != 0).double().mean().item(),
                "not_learning": float((g == 0).all(0).sum())}  # fmt: skip


@needs_lightning
@pytest.mark.parametrize("calls", ["module", "submodule"])  # training_step calls self(x), or self.net(x)
def test_lightning_callback_logs_what_plain_torch_counts_and_names_the_planted_channel(tmp_path: Path, calls: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from deadneuron.integrations.lightning import DeadneuronCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = PlantedMLP()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            return F.cross_entropy((self if calls == "module" else self.net)(batch[0]), batch[1])

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
            self.log("val_loss", F.cross_entropy((self if calls == "module" else self.net)(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    module = Module()
    stored = StoredZ(module.net.act)
    before = hook_count(module)
    callback = DeadneuronCallback(every=3)
    trainer = pl.Trainer(max_steps=9, callbacks=[callback], logger=CSVLogger(tmp_path), accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=3, num_sanity_val_steps=0)  # fmt: skip
    data = planted_batches(9)
    trainer.fit(module, DataLoader(data, batch_size=None), DataLoader([(-x, y) for x, y in data[:2]], batch_size=None))
    stored.handle.remove()
    assert hook_count(module) == before - 1  # the test's own hook is gone too
    assert len(stored.z) == len(stored.grads) == 9  # the validation passes (eval mode) are not stored
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    logged = {int(r["step"]): r for r in rows if r.get("deadneuron/dead/net.act")}
    assert sorted(logged) == [3, 6, 9]
    for step, row in logged.items():
        expected = stored.window(step - 3, step)  # validation passes ran in between: not measured
        assert float(row["deadneuron/dead/net.act"]) == expected["dead"]
        assert float(row["deadneuron/not_learning/net.act"]) == expected["not_learning"]
        assert float(row["deadneuron/flat_fraction/net.act"]) == pytest.approx(expected["flat_fraction"], rel=1e-12)
        assert float(row["deadneuron/grad_nonzero/net.act"]) == pytest.approx(expected["grad_nonzero"], rel=1e-12)
    assert stored.window(0, 9)["dead_ids"] == {PLANTED}
    assert [list(s.sites) for s in callback.snapshots] == [["net.act"]] * 3  # the validation after step 9: none
    assert any(f.channels.get("net.act") == (PLANTED,) for f in callback.findings()), callback.findings()


@needs_lightning
@pytest.mark.parametrize("strategy", ["auto", "ddp"])  # ddp: Lightning runs training_step inside the module's forward
@pytest.mark.parametrize("calls", ["module", "submodule"])
def test_lightning_functional_activations_in_the_loss_are_no_sites(tmp_path: Path, calls: str, strategy: str) -> None:
    """A training_step that applies ``F.softplus`` and ``torch.sigmoid`` to the network's output in its loss,
    outside any module: only the network's own activation is a site, whether the step calls the
    LightningModule or its part ``self.net``, and whether Lightning calls training_step itself or through
    the module's forward (DDP); the loss runs without the functional probe on the torch-function stack."""
    import lightning.pytorch as pl

    from deadneuron.integrations.lightning import DeadneuronCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = PlantedMLP()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            logits = (self if calls == "module" else self.net)(batch[0])
            probes.append(torch._C._len_torch_function_stack())
            return F.softplus(logits).mean() + torch.sigmoid(logits).mean() + F.cross_entropy(logits, batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    probes: list[int] = []
    callback = DeadneuronCallback(every=2, log=False)
    trainer = pl.Trainer(max_steps=4, callbacks=[callback], logger=False, accelerator="cpu", devices=1, strategy=strategy,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    saved, threads = dict(os.environ), torch.get_num_threads()
    try:
        trainer.fit(Module(), DataLoader(planted_batches(4), batch_size=None))
    finally:  # Lightning's DDP leaves its process group, rendezvous variables and thread setting behind
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)
    assert [list(s.sites) for s in callback.snapshots] == [["net.act"]] * 2
    assert probes == [0] * 4 and torch._C._len_torch_function_stack() == 0


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


@needs_hf
def test_hf_callback_logs_what_plain_torch_counts_and_names_the_planted_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import Trainer, TrainingArguments

    from deadneuron.integrations.hf import DeadneuronCallback

    torch.manual_seed(0)
    model = PlantedMLP(loss=True)
    stored = StoredZ(model.act)
    data = [{"x": x, "labels": y} for xs, ys in planted_batches(6) for x, y in zip(xs, ys, strict=True)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True, logging_strategy="no",
                             learning_rate=1e-2)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with caplog.at_level(logging.INFO, logger="deadneuron"), DeadneuronCallback.attach(trainer, every=2) as callback:
        trainer.train()
    stored.handle.remove()
    assert len(stored.z) == len(stored.grads) == 6
    logged = {r["step"]: r for r in trainer.state.log_history if "deadneuron/dead/act" in r}
    assert sorted(logged) == [2, 4, 6]
    for step, row in logged.items():
        expected = stored.window(step - 2, step)
        assert row["deadneuron/dead/act"] == expected["dead"]
        assert row["deadneuron/not_learning/act"] == expected["not_learning"]
        assert row["deadneuron/flat_fraction/act"] == pytest.approx(expected["flat_fraction"], rel=1e-12)
        assert row["deadneuron/grad_nonzero/act"] == pytest.approx(expected["grad_nonzero"], rel=1e-12)
    assert stored.window(0, 6)["dead_ids"] == {PLANTED}
    named = [f for f in callback.findings() if f.channels.get("act") == (PLANTED,)]
    assert named, callback.findings()
    said = [r.getMessage() for r in caplog.records if r.name == "deadneuron"]
    assert any(f"[{f.rule}]" in m and "act" in m for f in named for m in said), said
