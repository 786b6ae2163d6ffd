"""Training loop of the ARC slot model: Adam, deterministic for a seed, resumable, with a health timeline.

``train(config, out=..., init=...)`` returns a deadneuron checkpoint: a dict of plain types only
(``torch.load(path, weights_only=True)`` reads it) holding the config, weights, optimizer state, per-epoch
history and the health timeline. A run is a function of its config: the data subset and the order of
each epoch depend on (SEED, epoch) only, and the checkpoint carries the torch RNG state and the partial
epoch's sums, so a run resumed from any checkpoint ends bit-identical to an uninterrupted one (same
machine, same thread count).

``history``: one record per epoch: loss (mean NLL per valid cell), train_accuracy (valid cells, train
mode, during the epoch), heldout_accuracy (valid cells of the timeline's probe set, at timeline epochs
only, else None). ``health_timeline``: the snapshots of a `deadneuron.Monitor` watching the training
steps, after the first step (the initial weights' batch), every TIMELINE_EVERY epochs and at the end.
Each covers the steps since the previous one, on their training batches in train mode with padding cells
left out (``Snapshot.to_dict()``: per site dead, dormant, flat, sparsity, gradient flow, tau-dormant...),
plus the slot occupancy (``SlotHealth.to_dict()``) and task metrics of the current weights on a fixed
probe set of TIMELINE_GRIDS held-out grids (BatchNorm statistics re-estimated).

Command line (until ``deadneuron train`` exists; the same ``--config KEY=VALUE`` flags)::

    python -m arc_model.train --config BATCH_NORM=false LEARNING_RATE=3e-3 MAX_STEPS=600 \
        --out checkpoints/slot_attention.pth
    python -m arc_model.train --recipe reference --out healthy.pth   # the demo checkpoints' recipe
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arc_model import data
from arc_model.config import RECIPES, TrainConfig, recipe
from arc_model.feed import ArcFeed
from arc_model.loss import metric_sums, reconstruction_nll
from arc_model.model import SlotAutoencoder, build_model
from deadneuron.adapters import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from deadneuron.checkpoint import atomic_save
from deadneuron.errors import ModelMismatchError, WriteError
from deadneuron.monitor import Monitor

ADAPTER_NAME = "arc-slot"
Callback = Callable[[dict[str, Any]], None]


@dataclass
class RunState:
    """Everything that changes while training; what a checkpoint stores besides the weights."""

    step: int = 0
    epoch: int = 0  # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, float] = field(default_factory=dict)  # sums of the unfinished epoch


def train(
    config: TrainConfig | Mapping[str, Any],
    *,
    out: str | os.PathLike[str] | None = None,
    init: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    callbacks: Iterable[Callback] = (),
    save_optimizer: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (or resume from ``init``, a checkpoint dict) and return the checkpoint dict.

    ``max_steps`` caps the total step count (it overrides ``MAX_STEPS``). With ``out``, the checkpoint is
    written atomically at every timeline point and at the end; an existing ``out`` is refused unless
    ``overwrite``. Ctrl-C leaves the last complete checkpoint and no partial file. Each callback gets the
    history record of every finished epoch (with its timeline entry under "timeline" when one was taken).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    out_path = _check_out(out, overwrite)
    grids = data.training_grids(cfg.NUM_GRIDS, cfg.SEED)
    probe = data.probe_grids(cfg.TIMELINE_GRIDS)
    per_epoch = data.num_batches(len(grids), cfg.BATCH_SIZE)
    cap = _step_cap(cfg, per_epoch, max_steps)
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.LEARNING_RATE)
    run = _restore(model, optimizer, init, cfg) if init is not None else RunState()

    def save() -> dict[str, Any]:
        ckpt = make_checkpoint(model, optimizer if save_optimizer else None, cfg, run)
        if out_path is not None:
            atomic_save(ckpt, out_path, force=True)  # out was checked at the start
        return ckpt

    with _progress_bar(progress, cap, per_epoch, run.step) as advance, _monitor(model, optimizer, run) as mon:
        for record in _epochs(model, optimizer, grids, probe, cfg, run, cap, advance, mon):
            if "timeline" in record:
                save()
            for callback in callbacks:
                callback(record)
        if run.step > (run.timeline[-1]["step"] if run.timeline else 0):
            run.timeline.append(_snapshot(model, grids, probe, cfg, run, mon))
            if run.history and run.history[-1]["step"] == run.step:  # the run ended on an epoch boundary
                run.history[-1]["heldout_accuracy"] = run.timeline[-1]["metrics"]["valid_pixel_accuracy"]
    return save()


def _monitor(model: SlotAutoencoder, optimizer: torch.optim.Optimizer, run: RunState) -> Monitor:
    """The health timeline's monitor: snapshots when `_snapshot` asks, padding cells left out (the pad
    channel of the input is 1 exactly there, as the adapter's position mask; at the decoder's slots too, as
    the adapter places it), one process."""
    return Monitor(model, every=None, optimizer=optimizer, start_step=run.step, distributed=False,
                   mask=lambda x: x[:, data.NUM_COLOURS] == 0, mask_dims=ArcFeed.mask_dims)  # fmt: skip


def _step_cap(cfg: TrainConfig, per_epoch: int, max_steps: int | None) -> int:
    cap = cfg.NUM_EPOCHS * per_epoch
    limit = max_steps if max_steps is not None else cfg.MAX_STEPS
    return cap if limit is None else min(cap, limit)


def _epochs(model: SlotAutoencoder, optimizer: torch.optim.Optimizer, grids: list[data.Grid],
            probe: list[data.Grid], cfg: TrainConfig, run: RunState, cap: int,
            advance: Callable[[dict[str, float]], None], mon: Monitor) -> Iterator[dict[str, Any]]:
    """Run epochs until ``cap`` steps or NUM_EPOCHS; yield the record of every finished epoch."""
    per_epoch = data.num_batches(len(grids), cfg.BATCH_SIZE)
    while run.step < cap and run.epoch < cfg.NUM_EPOCHS:
        done_in_epoch = run.step - run.epoch * per_epoch
        batches = data.epoch_batches(grids, cfg.BATCH_SIZE, seed=cfg.SEED, epoch=run.epoch)
        for index, batch in enumerate(batches):
            if index < done_in_epoch:
                continue  # resuming mid-epoch: these were trained before the checkpoint
            if run.step >= cap:
                return
            set_learning_rate(optimizer, learning_rate(cfg, run.step, horizon=_step_cap(cfg, per_epoch, None)))
            _accumulate(run.partial, train_step(model, optimizer, batch, grad_clip=cfg.GRAD_CLIP))
            run.step += 1
            mon.step()
            if not run.timeline:  # "dead at init": the first step's batch, on the initial weights
                run.timeline.append(_snapshot(model, grids, probe, cfg, run, mon))
            advance(_running(run.partial))
        yield _finish_epoch(model, grids, probe, cfg, run, mon)


def learning_rate(cfg: TrainConfig, step: int, *, horizon: int) -> float:
    """The rate of step ``step`` (0-based): LEARNING_RATE, ramped up linearly over WARMUP_STEPS, then
    cosine-decayed to 0 at step ``horizon`` with LR_DECAY="cosine". A function of the step only, so a
    resumed run follows the same schedule."""
    rate = cfg.LEARNING_RATE
    if step < cfg.WARMUP_STEPS:
        return rate * (step + 1) / cfg.WARMUP_STEPS
    if cfg.LR_DECAY == "cosine":
        span = max(horizon - cfg.WARMUP_STEPS, 1)
        progress = min((step - cfg.WARMUP_STEPS) / span, 1.0)
        return rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return rate


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate


def train_step(model: SlotAutoencoder, optimizer: torch.optim.Optimizer, batch: data.GridBatch, *,
               grad_clip: float = 0.0) -> dict[str, float]:
    model.train()
    out = model(batch.x)
    loss = reconstruction_nll(out.logits, batch.target, batch.valid)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    sums = metric_sums(out.logits.detach(), batch.target, batch.valid)
    pixels = float(sums["valid_pixels"])
    return {"loss": float(loss.detach()) * pixels, "correct": float(sums["correct_pixels"]), "pixels": pixels}


def _accumulate(total: dict[str, float], part: Mapping[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value


def _running(partial: Mapping[str, float]) -> dict[str, float]:
    pixels = max(partial.get("pixels", 0.0), 1.0)
    return {"loss": partial.get("loss", 0.0) / pixels, "accuracy": partial.get("correct", 0.0) / pixels}


def _finish_epoch(model: SlotAutoencoder, grids: list[data.Grid], probe: list[data.Grid], cfg: TrainConfig,
                  run: RunState, mon: Monitor) -> dict[str, Any]:
    run.epoch += 1
    means = _running(run.partial)
    run.partial = {}
    record: dict[str, Any] = {
        "epoch": run.epoch, "step": run.step, "loss": means["loss"],
        "train_accuracy": means["accuracy"], "heldout_accuracy": None,
    }
    if run.epoch % cfg.TIMELINE_EVERY == 0:
        entry = _snapshot(model, grids, probe, cfg, run, mon)
        run.timeline.append(entry)
        record["heldout_accuracy"] = entry["metrics"]["valid_pixel_accuracy"]
    run.history.append(record)
    return {**record, "timeline": run.timeline[-1]} if record["heldout_accuracy"] is not None else record


def _snapshot(model: SlotAutoencoder, grids: list[data.Grid], probe: list[data.Grid], cfg: TrainConfig,
              run: RunState, mon: Monitor) -> dict[str, Any]:
    """A timeline entry: the monitor's snapshot of the steps since the previous entry, and the slots and
    metrics of the current weights on the probe set, BatchNorm statistics re-estimated."""
    from arc_model.feed import probe_figures

    snap = mon.snapshot()
    health = snap.to_dict() if snap is not None else {"step": run.step, "sites": {}}
    view = _with_batchnorm_statistics(model, grids, cfg)
    figures = probe_figures(view, data.eval_batches(probe, cfg.BATCH_SIZE))
    return {"epoch": run.epoch, **health, "batchnorm_reestimated": view is not model, **figures}


def _with_batchnorm_statistics(model: SlotAutoencoder, grids: list[data.Grid], cfg: TrainConfig) -> SlotAutoencoder:
    """``model`` itself without BatchNorm, else a copy whose BatchNorm statistics are re-estimated on the
    training grids with the current weights (MEASURED.md's method). Running statistics lag the weights
    early in training, and fresh ones fake up to 18 dead channels at init. The model and the RNG stream
    of the run are left untouched; the copy is built afresh (a deep copy would copy the monitor's hooks)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        estimate = build_model(cfg).train()
        estimate.load_state_dict(model.state_dict())
        for m in estimate.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches
        for batch in data.eval_batches(grids, cfg.BATCH_SIZE):
            estimate(batch.x)
    return estimate.eval()


def make_checkpoint(model: SlotAutoencoder, optimizer: torch.optim.Optimizer | None, cfg: TrainConfig,
                    run: RunState) -> dict[str, Any]:
    """The deadneuron checkpoint dict (plain types only)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "adapter": ADAPTER_NAME,
        "config": cfg.to_dict(),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "history": [dict(r) for r in run.history],
        "health_timeline": [dict(e) for e in run.timeline],
        "step": run.step,
        "epoch": run.epoch,
        "partial_epoch": dict(run.partial),
        "rng_state": torch.get_rng_state(),
    }


def _restore(model: SlotAutoencoder, optimizer: torch.optim.Optimizer, init: Mapping[str, Any],
             cfg: TrainConfig) -> RunState:
    """Load weights, optimizer state, counters and RNG state of ``init`` (a checkpoint dict)."""
    try:
        model.load_state_dict(init["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise ModelMismatchError(f"cannot start from this checkpoint: {err}") from None
    if init.get("optimizer_state") is not None:
        optimizer.load_state_dict(init["optimizer_state"])
        for group in optimizer.param_groups:
            group["lr"] = cfg.LEARNING_RATE  # a patch may have changed the learning rate
    if init.get("rng_state") is not None:
        torch.set_rng_state(init["rng_state"])
    return RunState(
        step=int(init.get("step", 0)),
        epoch=int(init.get("epoch", 0)),
        history=[dict(r) for r in init.get("history", [])],
        timeline=[dict(e) for e in init.get("health_timeline", [])],
        partial=dict(init.get("partial_epoch", {})),
    )


def _check_out(out: str | os.PathLike[str] | None, overwrite: bool) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not overwrite:
        raise WriteError(f"{path} exists; choose another --out or pass --force to replace it")
    if not path.parent.is_dir():
        raise WriteError(f"cannot write {path}: folder {path.parent} does not exist")
    return path


class _NoBar:
    def __enter__(self) -> Callable[[dict[str, float]], None]:
        return lambda _: None

    def __exit__(self, *exc: object) -> None:
        return None


class _RichBar:
    """A rich progress bar over steps showing epoch, running loss and valid-pixel accuracy."""

    def __init__(self, total: int, per_epoch: int, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.per_epoch = per_epoch
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), transient=False)
        self.task = self.progress.add_task("training", total=total, completed=start)
        self.step = start

    def __enter__(self) -> Callable[[dict[str, float]], None]:
        self.progress.__enter__()
        return self._advance

    def _advance(self, running: dict[str, float]) -> None:
        self.step += 1
        text = (f"epoch {self.step // self.per_epoch + 1} loss {running['loss']:.3f} "
                f"acc {running['accuracy']:.3f}")
        self.progress.update(self.task, advance=1, description=text)

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)


def _progress_bar(enabled: bool, total: int, per_epoch: int, start: int) -> _NoBar | _RichBar:
    return _RichBar(total, per_epoch, start) if enabled else _NoBar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arc_model.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides")
    parser.add_argument("--out", required=True, help="checkpoint to write (atomically)")
    parser.add_argument("--init", help="checkpoint to resume from")
    parser.add_argument("--recipe", default="user", help=f"named base config ({', '.join(RECIPES)}; default user)")
    parser.add_argument("--max-steps", type=int, help="cap on the total step count")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--no-optimizer-state", action="store_true", help="smaller file, not resumable")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    init = torch.load(args.init, weights_only=True, map_location="cpu") if args.init else None
    try:
        base = TrainConfig.from_dict(init["config"]) if init else recipe(args.recipe)
        config = base.with_overrides(args.config)
    except ValueError as err:
        parser.error(str(err))
    ckpt = train(config, out=args.out, init=init, max_steps=args.max_steps, progress=not args.quiet,
                 save_optimizer=not args.no_optimizer_state, overwrite=args.force)
    timeline = ckpt["health_timeline"]
    accuracy = f", held-out probe accuracy {timeline[-1]['metrics']['valid_pixel_accuracy']:.3f}" if timeline else ""
    print(f"wrote {args.out}: step {ckpt['step']}, epoch {ckpt['epoch']}{accuracy}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ADAPTER_NAME", "RunState", "make_checkpoint", "train", "train_step"]
