"""Hugging Face ``Trainer``: `DeadneuronCallback` runs a `deadneuron.Monitor` over the training steps
(install with ``pip install deadneuron[hf]``).

    from deadneuron.integrations.hf import DeadneuronCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    with DeadneuronCallback.attach(trainer, every=100, sample_every=10) as cb:
        trainer.train()
    cb.findings(); cb.monitor.timeline

A step is one optimizer step (``on_step_end``; with gradient accumulation every micro-batch's forward pass
of a sampled step is measured). Snapshots are logged with ``trainer.log`` (so they reach ``log_history``
and every ``report_to`` integration: TensorBoard, Weights & Biases...) when the callback knows its trainer
(`attach`), and always go to the monitor's own ``writers``. Evaluation runs in eval mode and is not
measured. At the end of training the findings are logged on the ``deadneuron`` logger and kept, or a
warning says that no snapshot was recorded. A run resumed from a checkpoint keeps its step numbers, but its
timeline starts afresh there (the Trainer keeps no callback state by default; a ``JsonlWriter`` on one path
in both runs keeps the whole run).

The Trainer has no event for a training run that raises: leave ``trainer.train()`` inside the ``with``
block (or call `close`) so the hooks are removed then too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback

from deadneuron.integrations._callback import LOGGED, MetricsWriter, checked_options, end_of_training
from deadneuron.monitor import Monitor
from deadneuron.rules import Finding
from deadneuron.snapshot import Snapshot

LOGGER = logging.getLogger("deadneuron")


class DeadneuronCallback(TrainerCallback):
    """Monitor the Trainer's model while it trains. ``monitor_options`` go to `deadneuron.Monitor`
    (``select``, ``channel_axis``, ``tau``, ``writers``, ...); with a ``trainer``, ``log`` the figures
    ``keys`` of every snapshot through ``trainer.log``."""

    def __init__(self, trainer: Any = None, *, every: int = 100, sample_every: int = 1, log: bool = True,
                 prefix: str = "deadneuron", keys: Sequence[str] = LOGGED, **monitor_options: Any) -> None:  # fmt: skip
        Monitor(nn.Module(), every=every, sample_every=sample_every, **checked_options(monitor_options))
        self.trainer = trainer
        self.every, self.sample_every = every, sample_every
        self.log, self.prefix, self.keys = log, prefix, tuple(keys)
        self.monitor_options = monitor_options
        self.monitor: Monitor | None = None
        self._findings: list[Finding] = []

    @classmethod
    def attach(cls, trainer: Any, **options: Any) -> DeadneuronCallback:
        """A callback that logs through ``trainer``, added to its callbacks."""
        callback = cls(trainer, **options)
        trainer.add_callback(callback)
        return callback

    def __enter__(self) -> DeadneuronCallback:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks now (the end of training does it too)."""
        if self.monitor is not None:
            self.monitor.close(snapshot=False)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:  # fmt: skip
        self.close()
        if model is None:
            return
        options = dict(self.monitor_options)
        writers = list(options.pop("writers", ()))
        if self.log and self.trainer is not None:
            writers.append(MetricsWriter(self._log, prefix=self.prefix, keys=self.keys))
        self.monitor = Monitor(model, every=self.every, sample_every=self.sample_every, optimizer=optimizer,
                               writers=writers, start_step=state.global_step, **options).start()  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        if self.monitor.optimizer is None:  # the Trainer makes its optimizer after on_train_begin's arguments
            self.monitor.optimizer = optimizer if optimizer is not None else getattr(self.trainer, "optimizer", None)
        self.monitor.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        self.monitor.close(snapshot=True)
        self._findings = end_of_training(self.monitor, LOGGER)

    def _log(self, metrics: dict[str, float], snapshot: Snapshot) -> None:
        self.trainer.log(metrics)

    @property
    def snapshots(self) -> list[Snapshot]:
        return self.monitor.snapshots if self.monitor is not None else []

    def findings(self) -> list[Finding]:
        """The findings at the end of training (empty before it ends)."""
        return list(self._findings)


__all__ = ["DeadneuronCallback"]
