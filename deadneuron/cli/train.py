"""Train a model through its adapter (default: the bundled ARC slot model) and write a deadneuron checkpoint.

The config starts from the adapter's defaults (or the --resume checkpoint's config); each --config
KEY=VALUE overrides one field (for the ARC model: LEARNING_RATE, NUM_EPOCHS, ACTIVATION, NEGATIVE_SLOPE,
DROPOUT_BETWEEN_CONVS, BATCH_NORM, MAX_STEPS, SEED, ...). The checkpoint is written atomically at every
health-timeline point (TIMELINE_EVERY epochs) and at the end, so --out always holds the last complete
checkpoint: Ctrl-C or SIGTERM stops the run (a save in progress is let finish) with one line and exit
code 130 (143 for SIGTERM), SIGKILL loses at most the steps since the last timeline point, and no partial
file ever has --out's name. An existing --out is refused without --force.
"""

from __future__ import annotations

import inspect
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from deadneuron.errors import UsageError

DEFAULT_OUT = Path("checkpoints/slot_attention.pth")


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised like Python's own Ctrl-C so that the same cleanup runs (the atomic writer
    removes its temp file)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def train_command(
    config: Annotated[list[str] | None, typer.Option("--config", metavar="KEY=VALUE", help="Override one config field; repeatable.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (atomically, at every timeline point and at the end).")] = DEFAULT_OUT,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue from this deadneuron checkpoint (its config, weights, optimizer and step count).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Cap on the total step count (resumed steps included).")] = None,
    adapter_name: Annotated[str, typer.Option("--adapter", help="Adapter (model family) to train.")] = "arc-slot",
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    no_optimizer_state: Annotated[bool, typer.Option("--no-optimizer-state", help="Leave the optimizer state out (half the size; a resumed run starts a fresh optimizer).")] = False,
) -> None:
    before = _identity(out)
    requested: list[int] = []  # the signals received
    try:
        with _signals_interrupt(requested):
            _train(config or [], out=out, force=force, resume=resume, max_steps=max_steps, adapter_name=adapter_name,
                   threads=threads, progress=progress, save_optimizer=not no_optimizer_state, requested=requested)  # fmt: skip
    except KeyboardInterrupt as stop:
        signum = stop.signum if isinstance(stop, _Interrupted) else signal.SIGINT
        typer.echo(_interrupted(signum, out, before=before), err=True)
        raise typer.Exit(128 + signum) from None  # 130 for Ctrl-C, 143 for SIGTERM


def _train(config: list[str], *, out: Path, force: bool, resume: Path | None, max_steps: int | None, adapter_name: str,
           threads: int | None, progress: bool, save_optimizer: bool, requested: list[int]) -> None:  # fmt: skip
    import torch

    from deadneuron._parse import check_count
    from deadneuron.adapters import get_adapter, is_deadneuron_checkpoint
    from deadneuron.checkpoint import atomic_save, load_checkpoint
    from deadneuron.cli._subject import parse_key_values

    check_count(max_steps, "--max-steps", least=0)
    check_count(threads, "--threads")
    if threads is not None:
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
    cfg = {**base, **parse_key_values(config, option="--config")}
    _validate(adapter, cfg)
    kwargs = _train_kwargs(adapter, out=out, progress=progress, save_optimizer=save_optimizer, requested=requested)
    checkpoint = adapter.train(cfg, init=init, max_steps=max_steps, **kwargs)
    if "out" not in kwargs:  # an adapter that cannot save as it goes: once, at the end
        if not save_optimizer:
            checkpoint = {**checkpoint, "optimizer_state": None}
        atomic_save(checkpoint, out, force=True, protect=[resume] if resume is not None else [])
    if requested:  # it came during the last save, which was let finish
        raise _Interrupted(requested[0])
    typer.echo(_summary(out, checkpoint), err=True)


def _train_kwargs(adapter: Any, *, out: Path, progress: bool, save_optimizer: bool, requested: list[int]) -> dict[str, Any]:
    """The keywords this adapter's ``train`` takes besides ``init`` and ``max_steps``.

    With ``out`` the adapter saves at every timeline point; ``out`` was checked (and --force given where
    it exists), hence ``overwrite``. The callback, run after every epoch (and right after the save of a
    timeline point), stops a run whose signal came during a save (see _signals_interrupt), or whose
    exception got lost in C code that had called back into Python."""

    def stop_if_requested(_record: Mapping[str, Any]) -> None:
        if requested:
            raise _Interrupted(requested[0])

    params = inspect.signature(adapter.train).parameters
    kwargs: dict[str, Any] = {"callbacks": [stop_if_requested]} if "callbacks" in params else {}
    if "progress" in params:
        kwargs["progress"] = progress
    if "save_optimizer" in params:
        kwargs["save_optimizer"] = save_optimizer
    if {"out", "overwrite"} <= params.keys():
        kwargs.update(out=out, overwrite=True)
        if not save_optimizer and "save_optimizer" not in params:
            raise UsageError(f"--no-optimizer-state: the {adapter.name} adapter always saves its optimizer state")
    return kwargs


@contextmanager
def _signals_interrupt(requested: list[int]) -> Iterator[None]:
    """For the length of the run, Ctrl-C and SIGTERM append to ``requested`` and raise _Interrupted, except
    inside an atomic save; then the previous handlers are back.

    A save is let finish (milliseconds) and the run stops right after it, unless a second signal comes:
    an exception raised in the middle of torch.save, within torch's C++ zip writer, can come out as a
    bogus "cannot serialise" error or not at all. Only from the main thread (the only one that may set a handler) and only over the
    default handlers: an ignored SIGINT (a background job) stays ignored, and an application that embeds
    the CLI and handles the signals itself keeps its handlers."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    if threading.current_thread() is not threading.main_thread():
        defaults = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        requested.append(signum)
        if len(requested) > 1 or not _inside_atomic_save(frame):  # a second one aborts even a save
            raise _Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s, default in defaults.items() if signal.getsignal(s) is default}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _inside_atomic_save(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__") == "deadneuron._atomic":
            return True
        frame = frame.f_back
    return False


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells a replaced file from the old one (an atomic replace gives a new inode)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _interrupted(signum: int, out: Path, *, before: tuple[int, int, int] | None) -> str:
    """One line: what stopped the run and what --out holds now."""
    head = f"deadneuron: interrupted by {'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'}"
    now = _identity(out)
    if now is not None and now != before:
        step = _step_of(out)
        at = f" (step {step})" if step is not None else ""
        return f"{head}: {out} holds the last complete checkpoint{at}; continue with --resume {out} --out NEW.pth"
    if now is not None:
        return f"{head} before the first checkpoint was written: {out} is unchanged"
    return f"{head} before the first checkpoint was written: nothing was written"


def _step_of(path: Path) -> int | None:
    """The step recorded in the checkpoint at ``path`` (read from the file: the stop may fall between a
    save and anything the run could tell us about it), or None where it cannot be read."""
    import torch

    try:
        step = torch.load(path, map_location="cpu", weights_only=True).get("step")
    except Exception:
        return None
    return step if isinstance(step, int) else None


def _check_out(out: Path, *, force: bool, resume: Path | None) -> None:
    """Refuse a bad --out before training, not after minutes of it."""
    from deadneuron.errors import WriteError

    if resume is not None and out.exists() and resume.exists() and out.resolve() == resume.resolve():
        raise UsageError(f"{out}: is the --resume input and is never overwritten; write to a new path")
    if out.is_dir():  # before the --force advice, which would not help
        raise WriteError(f"{out}: is a folder; give a file path to write to")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to overwrite it, or choose another path")
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
