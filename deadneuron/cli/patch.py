"""Apply a fix, retrain, and measure whether it helped: baseline and patched arms on the same budget.

For a deadneuron checkpoint (the bundled ARC model) the flags change its config (ACTIVATION,
NEGATIVE_SLOPE, LEARNING_RATE, NUM_EPOCHS, DROPOUT_BETWEEN_CONVS); both configs are retrained for --seeds
seeds on the same step budget (default: the checkpoint's own step count), audited on the held-out grids
and compared metric by metric with a verdict: improved, no change within the spread, or worse. The
patched run of the first seed is written to --out (default: beside the input, suffix _patched).
For a plain state_dict (--model MODULE:FACTORY with --data or --input-shape) the model itself is patched
(module surgery, torch.fx for functional activations) and its state_dict is written with the plan.
The input is never modified; an existing --out is refused without --force; --dry-run writes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from deadneuron.errors import UsageError

DEFAULT_CHECKPOINT = Path("checkpoints/slot_attention.pth")


def patch_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to fix (never modified).")] = DEFAULT_CHECKPOINT,
    activation: Annotated[str | None, typer.Option("--activation", help="Swap ReLU for leaky, gelu, elu, silu or prelu.")] = None,
    negative_slope: Annotated[float | None, typer.Option("--negative-slope", help="LeakyReLU slope (with --activation leaky).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="New learning rate.")] = None,
    lr_scale: Annotated[float | None, typer.Option("--lr-scale", help="Multiply the learning rate by this.")] = None,
    dropout_between_convs: Annotated[float | None, typer.Option("--dropout-between-convs", metavar="P", help="Dropout with probability P after every conv layer's activation.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="New epoch budget (NUM_EPOCHS).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Steps per training run, both arms (default: the checkpoint's step count).")] = None,
    apply_suggestions: Annotated[bool, typer.Option("--apply-suggestions", help="Also apply the preferred fix of every finding of an audit (flags win).")] = False,
    reinit_dead: Annotated[bool, typer.Option("--reinit-dead", help="Re-initialise dead channels (ReDo); with --init checkpoint for adapter models.")] = False,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per arm (1 is an anecdote; 3 for a claim).")] = 1,
    init: Annotated[str, typer.Option("--init", help="scratch: train fresh (as advised); checkpoint: fine-tune the input's weights.")] = "scratch",
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the patched checkpoint (default: INPUT_patched.pth).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and what would change; write nothing.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Retrain the baseline too and compare (adapter models).")] = True,
    select: Annotated[list[str] | None, typer.Option("--select", help="Only swap these sites/modules (globs, or kind:relu); repeatable.")] = None,
    audit_grids: Annotated[int | None, typer.Option("--audit-grids", help="Audit this many held-out grids per run (default: all).")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the comparison as a Markdown table here.")] = None,
    figure: Annotated[Path | None, typer.Option("--figure", help="Also write the before/after figure (PNG) here.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads per training run (default 1: runs go in parallel, see --workers).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Processes the arms x seeds runs spread over (default: the cores available); the same table for any N.")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bars (default: on a terminal).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="MODULE:FACTORY building the model (plain state_dicts).")] = None,
    model_arg: Annotated[list[str] | None, typer.Option("--model-arg", help="KEY=VALUE passed to the factory; repeatable.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="MODULE:FACTORY returning an iterable of batches.")] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="Check on random N,C,H,W inputs.")] = None,
    batches: Annotated[int | None, typer.Option("--batches", help="Audit at most N batches of --data (default 8).")] = None,
    allow_global: Annotated[list[str] | None, typer.Option("--allow-global", help="Allow one more type (module.Name) when unpickling.")] = None,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Open code-carrying formats. Runs their code.")] = False,
) -> None:
    import torch

    from deadneuron.patch import plan_from_flags

    _check_numbers(seeds=seeds, max_steps=max_steps, audit_grids=audit_grids, threads=threads, init=init)
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if threads is not None:
        torch.set_num_threads(threads)
    flags = plan_from_flags(activation=activation, negative_slope=negative_slope, sites=tuple(select or ()), lr=lr,
                            lr_scale=lr_scale, dropout_between_convs=dropout_between_convs, epochs=epochs,
                            reinit_dead=reinit_dead)  # fmt: skip
    if not flags and not apply_suggestions:
        raise UsageError("nothing to patch: pass --activation, --lr, --lr-scale, --dropout-between-convs, --epochs, "
                         "--reinit-dead or --apply-suggestions")  # fmt: skip
    target = out if out is not None else default_out(checkpoint)
    if not dry_run:
        check_out(target, checkpoint, force=force)
    show = progress if progress is not None else sys.stderr.isatty()
    ctx = Context(checkpoint=checkpoint, out=target, force=force, dry_run=dry_run, progress=show,
                  markdown=markdown, figure=figure, console=Console(), err=Console(stderr=True))  # fmt: skip
    if model is not None:
        from deadneuron.cli._patch_generic import patch_generic
        from deadneuron.cli._subject import parse_key_values

        args = parse_key_values(model_arg or [], option="--model-arg")
        patch_generic(ctx, flags, apply_suggestions=apply_suggestions, model_spec=model, model_args=args, data=data,
                      input_shape=input_shape, batches=batches, allow_globals=allow_global or (), trust_code=trust_code)  # fmt: skip
        return
    from deadneuron.cli._patch_adapter import patch_adapter

    patch_adapter(ctx, flags, apply_suggestions=apply_suggestions, seeds=seeds, init=init, max_steps=max_steps,
                  verify=verify, audit_grids=audit_grids, allow_globals=allow_global or (),
                  workers=workers, threads=threads)  # fmt: skip


class Context:
    """Where the outputs go and how to talk to the user; shared by both flows."""

    def __init__(self, *, checkpoint: Path, out: Path, force: bool, dry_run: bool, progress: bool,
                 markdown: Path | None, figure: Path | None, console: Console, err: Console) -> None:  # fmt: skip
        self.checkpoint, self.out, self.force, self.dry_run, self.progress = checkpoint, out, force, dry_run, progress
        self.markdown, self.figure, self.console, self.err = markdown, figure, console, err

    def say(self, text: str) -> None:
        self.err.print(text, highlight=False, markup=False)


def _check_numbers(*, seeds: int, max_steps: int | None, audit_grids: int | None, threads: int | None, init: str) -> None:
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {max_steps}")
    if audit_grids is not None and audit_grids < 1:
        raise UsageError(f"--audit-grids must be at least 1, got {audit_grids}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if init not in ("scratch", "checkpoint"):
        raise UsageError(f"--init takes scratch or checkpoint, not {init!r}")


def default_out(checkpoint: Path) -> Path:
    """``checkpoints/slot_attention.pth`` -> ``checkpoints/slot_attention_patched.pth``."""
    return checkpoint.with_name(f"{checkpoint.stem}_patched{checkpoint.suffix or '.pth'}")


def check_out(out: Path, source: Path, *, force: bool) -> None:
    """Refuse a bad --out before any training: the input itself, an existing file without --force."""
    from deadneuron.errors import WriteError

    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise UsageError(f"{out}: is the input checkpoint and is never overwritten; choose another --out")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to overwrite it, or choose another --out")
    if out.is_dir():
        raise WriteError(f"{out}: is a folder; give a file path to write to")
    if not out.parent.is_dir():
        raise WriteError(f"{out}: folder {out.parent} does not exist; create it or choose another --out")


def write_extras(ctx: Context, verification: Any, before: list[Any], after: list[Any], labels: tuple[str, str]) -> None:
    """The Markdown table and the before/after figure, where asked for."""
    from deadneuron.checkpoint import atomic_write_bytes, atomic_write_text
    from deadneuron.patch.table import verification_markdown

    if ctx.markdown is not None:
        atomic_write_text(verification_markdown(verification), ctx.markdown, protect=[ctx.checkpoint])
        ctx.say(f"wrote {ctx.markdown}")
    if ctx.figure is not None:
        plot = before_after_plot()
        if plot is None:
            ctx.say("no before/after figure function is installed (deadneuron.render); --figure skipped")
            return
        from deadneuron.render._style import figure_png

        atomic_write_bytes(figure_png(plot(before, after, labels=labels)), ctx.figure, protect=[ctx.checkpoint])
        ctx.say(f"wrote {ctx.figure}")


def before_after_plot() -> Any:
    """``plot_before_after`` from deadneuron.render (plots or training_plots), or None."""
    import importlib

    for module in ("deadneuron.render.plots", "deadneuron.render.training_plots"):
        try:
            found = getattr(importlib.import_module(module), "plot_before_after", None)
        except ImportError:
            continue
        if found is not None:
            return found
    return None


__all__ = ["Context", "check_out", "default_out", "patch_command"]
