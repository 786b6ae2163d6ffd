"""PyTorch Lightning: `DeadneuronCallback` runs a `deadneuron.Monitor` over ``Trainer.fit``'s training
steps (install with ``pip install deadneuron[lightning]``).

    from deadneuron.integrations.lightning import DeadneuronCallback
    cb = DeadneuronCallback(every=100, sample_every=10)
    trainer = lightning.pytorch.Trainer(callbacks=[cb], ...)
    trainer.fit(module, loader)
    cb.findings(); cb.monitor.timeline

A step is one optimizer step (``trainer.global_step``; with gradient accumulation the forward passes of
every micro-batch of the step are measured). Snapshots go to every logger of the trainer
(``logger.log_metrics`` at the global step) and to the monitor's own ``writers``; validation is not
measured. A training_step may call the LightningModule itself or its parts (``self.net(x)``): each
training batch is one forward pass for the site names either way. At the end of training the findings
are logged on the ``deadneuron`` logger and kept (`findings`), or a warning says that no snapshot was
recorded. The timeline is the callback's state in Lightning's checkpoints: ``fit(..., ckpt_path=...)``
continues it. Hooks are removed at the end of training, also when it raises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback
else:
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # the standalone package
        from pytorch_lightning.callbacks import Callback

from torch import nn

from deadneuron.integrations._callback import LOGGED, MetricsWriter, end_of_training
from deadneuron.integrations._callback import checked_options as _checked
from deadneuron.monitor import Monitor
from deadneuron.rules import Finding
from deadneuron.snapshot import Snapshot

LOGGER = logging.getLogger("deadneuron")


class DeadneuronCallback(Callback):
    """Monitor the LightningModule while it trains. ``monitor_options`` go to `deadneuron.Monitor`
    (``select``, ``channel_axis``, ``tau``, ``writers``, ...); ``log`` the figures ``keys`` of every
    snapshot through the trainer's loggers."""

    def __init__(self, *, every: int = 100, sample_every: int = 1, log: bool = True, prefix: str = "deadneuron",
                 keys: Sequence[str] = LOGGED, **monitor_options: Any) -> None:  # fmt: skip
        Monitor(nn.Module(), every=every, sample_every=sample_every, **_checked(monitor_options))  # fail here
        self.every, self.sample_every = every, sample_every
        self.log, self.prefix, self.keys = log, prefix, tuple(keys)
        self.monitor_options = monitor_options
        self.monitor: Monitor | None = None
        self._findings: list[Finding] = []
        self._global_step = 0
        self._restored: list[Snapshot] | None = None  # the timeline of the checkpoint a run resumes from

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._close(snapshot=False)
        earlier = self._restored if self._restored is not None else self.snapshots  # a resumed run's, or a fit's before
        self._restored = None
        options = dict(self.monitor_options)
        writers = list(options.pop("writers", ()))
        if self.log:
            writers.append(MetricsWriter(lambda metrics, snap: _log(trainer, metrics), prefix=self.prefix,
                                         keys=self.keys))  # fmt: skip
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor = Monitor(pl_module, every=self.every, sample_every=self.sample_every, optimizer=optimizer,
                               writers=writers, start_step=trainer.global_step, **options).start()  # fmt: skip
        self.monitor.snapshots[:0] = [s for s in earlier if s.step <= trainer.global_step]  # the timeline goes on
        self._global_step = trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None:  # a strategy with a wrapper (DDP) runs training_step inside the module's forward
            self.monitor.begin_batch(wrapped=trainer.strategy.model is not pl_module)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.monitor is not None:
            self.monitor.end_forward()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.pause()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.resume()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is not None and trainer.global_step != self._global_step:  # an optimizer step ran
            self._global_step = trainer.global_step
            self.monitor.step()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close(snapshot=True)
        if self.monitor is not None:
            self._findings = end_of_training(self.monitor, LOGGER)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close(snapshot=False)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close(snapshot=False)
        if stage == "fit" and self.monitor is None:  # Lightning starts no training at all for max_steps=0
            LOGGER.warning("deadneuron: no health snapshot was recorded: the fit ran no training (max_steps=0?)")

    def _close(self, *, snapshot: bool) -> None:
        if self.monitor is not None:
            self.monitor.close(snapshot=snapshot)

    def state_dict(self) -> dict[str, Any]:
        """The health timeline so far, kept in Lightning's checkpoints: a run resumed from one continues it."""
        return {"timeline": [s.to_dict() for s in self.snapshots]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = [Snapshot.from_dict(e) for e in state_dict.get("timeline") or ()]

    @property
    def snapshots(self) -> list[Snapshot]:
        return self.monitor.snapshots if self.monitor is not None else []

    def findings(self) -> list[Finding]:
        """The findings at the end of training (empty before it ends)."""
        return list(self._findings)


def _log(trainer: Any, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


__all__ = ["DeadneuronCallback"]
