"""Train a model through its adapter (default: the bundled ARC slot model) and write a deadneuron checkpoint.

The config starts from the adapter's defaults (or the --resume checkpoint's config); each --config
KEY=VALUE overrides one field (for the ARC model: LEARNING_RATE, NUM_EPOCHS, ACTIVATION, NEGATIVE_SLOPE,
DROPOUT_BETWEEN_CONVS, BATCH_NORM, MAX_STEPS, SEED, ...). The checkpoint is written atomically at the
end: Ctrl-C leaves no partial file, and an existing --out is refused without --force.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from deadneuron.errors import UsageError

DEFAULT_OUT = Path("checkpoints/slot_attention.pth")


def train_command(
    config: Annotated[list[str] | None, typer.Option("--config", metavar="KEY=VALUE", help="Override one config field; repeatable.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (atomically).")] = DEFAULT_OUT,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue from this deadneuron checkpoint (its config, weights, optimizer and step count).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Cap on the total step count (resumed steps included).")] = None,
    adapter_name: Annotated[str, typer.Option("--adapter", help="Adapter (model family) to train.")] = "arc-slot",
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    import torch

    from deadneuron.adapters import get_adapter, is_deadneuron_checkpoint
    from deadneuron.checkpoint import atomic_save, load_checkpoint
    from deadneuron.cli._subject import parse_key_values

    if max_steps is not None and max_steps < 0:
        raise UsageError(f"--max-steps must be >= 0, got {max_steps}")
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    _check_out(out, force=force, resume=resume)
    init: Mapping[str, Any] | None = None
    base: dict[str, Any] = {}
    if resume is not None:
        init = load_checkpoint(resume)  # type: ignore[assignment]
        if not is_deadneuron_checkpoint(init):
            raise UsageError(f"--resume {resume}: not a deadneuron checkpoint (written by `deadneuron train`)")
        assert init is not None
        adapter_name = str(init.get("adapter", adapter_name))
        base = dict(init.get("config") or {})
    adapter = get_adapter(adapter_name)
    cfg = {**base, **parse_key_values(config or [], option="--config")}
    _validate(adapter, cfg)
    kwargs: dict[str, Any] = {"init": init, "max_steps": max_steps}
    if "progress" in inspect.signature(adapter.train).parameters:
        kwargs["progress"] = progress
    checkpoint = adapter.train(cfg, **kwargs)
    atomic_save(checkpoint, out, force=True, protect=[resume] if resume is not None else [])
    typer.echo(_summary(out, checkpoint), err=True)


def _check_out(out: Path, *, force: bool, resume: Path | None) -> None:
    """Refuse a bad --out before training, not after minutes of it."""
    from deadneuron.errors import WriteError

    if resume is not None and out.exists() and resume.exists() and out.resolve() == resume.resolve():
        raise UsageError(f"{out}: is the --resume input and is never overwritten; write to a new path")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to overwrite it, or choose another path")
    if out.is_dir():
        raise WriteError(f"{out}: is a folder; give a file path to write to")
    if not out.parent.is_dir():
        raise WriteError(f"{out}: folder {out.parent} does not exist; create it or choose another path")


def _validate(adapter: Any, config: Mapping[str, Any]) -> None:
    """Unknown keys and bad values fail now, with the adapter's own message."""
    try:
        adapter.build(config)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--config: {exc}") from None


def _summary(out: Path, checkpoint: Mapping[str, Any]) -> str:
    line = f"wrote {out}: step {checkpoint.get('step', '?')}, epoch {checkpoint.get('epoch', '?')}"
    timeline = checkpoint.get("health_timeline") or []
    metrics = timeline[-1].get("metrics", {}) if timeline and isinstance(timeline[-1], Mapping) else {}
    if "valid_pixel_accuracy" in metrics:
        line += f", held-out probe accuracy {float(metrics['valid_pixel_accuracy']):.3f}"
    return line


__all__ = ["train_command"]
