"""Apply a fix, retrain, and measure whether it helped: baseline and patched arms on the same budget.

For a deadneuron checkpoint (the bundled ARC model) the flags change its config: --select globs choose
the activation keys (ACTIVATION for the encoder conv stack, ENCODER_MLP_ACTIVATION, SLOT_MLP_ACTIVATION,
DECODER_ACTIVATION), --add-batchnorm sets BATCH_NORM, and NEGATIVE_SLOPE, LEARNING_RATE, NUM_EPOCHS,
DROPOUT_BETWEEN_CONVS follow their flags; the plan lists by name the sites that will change. Both configs
are retrained for --seeds seeds on the same step budget (default: the checkpoint's own step count),
audited on the held-out grids and compared metric by metric with a verdict: improved, no change within
the spread, or worse. The patched run of the first seed is written to --out (default: beside the input,
suffix _patched).
For a plain state_dict (--model MODULE:FACTORY with --data or --input-shape) the model itself is patched
(module surgery, torch.fx for functional activations, BatchNorm after the layers feeding the selected
sites) and its state_dict is written with the plan. With --train MODULE:FUNCTION, train(model, steps=N,
seed=S), both arms are trained --seeds times for --max-steps steps (--init scratch or checkpoint),
audited on --data, scored with --metric, and compared in the same table.
Before any work every output path is checked; a plan that changes nothing is refused (exit 2); the
input is never modified; an existing output is refused without --force; --dry-run writes nothing; the
outputs are written together at the end, all or none.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deadneuron import ops
from deadneuron._parse import check_count
from deadneuron.errors import UsageError
from deadneuron.patch.config import Init

DEFAULT_CHECKPOINT = Path(ops.DEFAULT_CHECKPOINT)


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
    reinit_dead: Annotated[bool, typer.Option("--reinit-dead", help="Re-initialise dead channels (ReDo); retraining needs --init checkpoint.")] = False,
    add_batchnorm: Annotated[bool, typer.Option("--add-batchnorm", help="BatchNorm after the conv/linear layers feeding the sites (--select; default: every conv-fed site); BATCH_NORM for the bundled model.")] = False,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per arm (1 is an anecdote; 3 for a claim).")] = 1,
    init: Annotated[str | None, typer.Option("--init", help="scratch (default): train fresh; checkpoint: fine-tune the input's weights.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the patched checkpoint (default: INPUT_patched.pth).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and what would change; write nothing.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Retrain the baseline too and compare (adapter models).")] = True,
    select: Annotated[list[str] | None, typer.Option("--select", metavar="GLOB", help="Only patch these sites/modules (swap, re-initialise, add BatchNorm; globs, or kind:relu); repeatable.")] = None,
    audit_grids: Annotated[int | None, typer.Option("--audit-grids", help="Audit this many held-out grids per run (default: all).")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the comparison as a Markdown table here.")] = None,
    figure: Annotated[Path | None, typer.Option("--figure", help="Also write the before/after figure (PNG) here.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads per training run (default 1: runs go in parallel, see --workers).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Processes the arms x seeds runs of a deadneuron checkpoint spread over (default: the cores available); the same table for any N. A model of your own (--model) trains in this process.")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bars (default: on a terminal).")] = None,
    model: Annotated[str | None, typer.Option("--model", metavar="MODULE:FACTORY", help="MODULE:FACTORY or file.py:FACTORY building the model (plain state_dicts).")] = None,
    model_arg: Annotated[list[str] | None, typer.Option("--model-arg", metavar="KEY=VALUE", help="KEY=VALUE passed to the factory; repeatable.")] = None,
    data: Annotated[str | None, typer.Option("--data", metavar="MODULE:FACTORY", help="MODULE:FACTORY or file.py:FACTORY returning an iterable of batches.")] = None,
    train: Annotated[str | None, typer.Option("--train", metavar="MODULE:FUNCTION", help="MODULE:FUNCTION: train(model, steps=N, seed=S) trains your model in place; both arms are retrained and compared.")] = None,
    metric: Annotated[str | None, typer.Option("--metric", metavar="MODULE:FUNCTION", help="MODULE:FUNCTION: metric(model) -> number or {name: number}, scored on every run (with --train).")] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", metavar="N,C,H,W", help="Check on random N,C,H,W inputs.")] = None,
    batches: Annotated[int | None, typer.Option("--batches", help="Audit at most N batches of --data (default 8).")] = None,
    allow_global: Annotated[list[str] | None, typer.Option("--allow-global", metavar="MODULE.NAME", help="Allow one more type (module.Name) when unpickling.")] = None,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Open code-carrying formats. Runs their code.")] = False,
) -> None:
    import torch

    from deadneuron.patch import plan_from_flags

    _check_numbers(seeds=seeds, max_steps=max_steps, audit_grids=audit_grids, threads=threads, init=init)
    check_count(workers, "--workers")
    if threads is not None:
        torch.set_num_threads(threads)
    flags = plan_from_flags(activation=activation, negative_slope=negative_slope, sites=tuple(select or ()), lr=lr,
                            lr_scale=lr_scale, dropout_between_convs=dropout_between_convs, epochs=epochs,
                            reinit_dead=reinit_dead, add_batchnorm=add_batchnorm)  # fmt: skip
    if not flags and not apply_suggestions:
        raise UsageError("nothing to patch: pass --activation, --add-batchnorm, --lr, --lr-scale, "
                         "--dropout-between-convs, --epochs, --reinit-dead or --apply-suggestions")  # fmt: skip
    _check_combination(model=model, train=train, metric=metric, seeds=seeds, max_steps=max_steps, init=init,
                       reinit_dead=reinit_dead, verify=verify, audit_grids=audit_grids, workers=workers)  # fmt: skip
    target = out if out is not None else default_out(checkpoint)
    if not dry_run:
        from deadneuron.cli._outputs import check_outputs

        check_outputs({"--out": target, "--markdown": markdown, "--figure": figure}, inputs=[checkpoint], force=force)
    from deadneuron.cli._launch import launch, world_size
    from deadneuron.cli._patch_context import Context, SubjectFlags

    if model is not None and world_size() > 1:
        raise UsageError("under torchrun, patch spreads the runs of a deadneuron checkpoint over the ranks; a "
                         "model of your own (--model) is patched in one process: run it without torchrun")  # fmt: skip
    with launch(None, backend="gloo") as (shard, _):  # under torchrun: the runs spread over the ranks
        show = (progress if progress is not None else sys.stderr.isatty()) and shard.primary
        ctx = Context(checkpoint=checkpoint, out=target, force=force, dry_run=dry_run, progress=show,
                      markdown=markdown, figure=figure, console=Console(), err=Console(stderr=True),
                      primary=shard.primary)  # fmt: skip
        if model is not None:
            from deadneuron.cli._patch_generic import patch_generic
            from deadneuron.cli._subject import parse_key_values

            subject = SubjectFlags(model, parse_key_values(model_arg or [], option="--model-arg"), data, input_shape,
                                   batches, allow_global or (), trust_code)  # fmt: skip
            if train is not None:
                from deadneuron.cli._patch_own import patch_own

                patch_own(ctx, flags, subject, apply_suggestions=apply_suggestions, train_spec=train,
                          metric_spec=metric, seeds=seeds, steps=max_steps or 0, init=_init(init))  # fmt: skip
                return
            patch_generic(ctx, flags, subject, apply_suggestions=apply_suggestions)
            return
        from deadneuron.cli._patch_adapter import patch_adapter

        patch_adapter(ctx, flags, apply_suggestions=apply_suggestions, seeds=seeds, init=_init(init),
                      max_steps=max_steps, verify=verify, audit_grids=audit_grids, allow_globals=allow_global or (),
                      workers=workers, threads=threads, ranks=(shard.rank, shard.world_size))  # fmt: skip


def _check_combination(*, model: str | None, train: str | None, metric: str | None, seeds: int, max_steps: int | None,
                       init: str | None, reinit_dead: bool, verify: bool, audit_grids: int | None,
                       workers: int | None = None) -> None:  # fmt: skip
    """Flags that mean nothing together, refused before any work: every flag given is honoured."""
    if model is not None and workers is not None and workers > 1:
        raise UsageError(f"--workers {workers} spreads the runs of a deadneuron checkpoint over processes; a model of "
                         "your own (--model) is patched and its runs trained one after another in this process: "
                         "drop --workers")  # fmt: skip
    if train is not None and model is None:
        raise UsageError("--train trains a model of your own: add --model MODULE:FACTORY and --data MODULE:FACTORY "
                         "(a deadneuron checkpoint retrains through its adapter without --train)")  # fmt: skip
    if metric is not None and train is None:
        where = "add --train MODULE:FUNCTION" if model is not None else "it is for models of your own (--model, " \
            "--train); the bundled model is scored on its task metrics"
        raise UsageError(f"--metric scores retrained models: {where}")
    if model is not None:
        _check_own_model(train=train, seeds=seeds, max_steps=max_steps, init=init, verify=verify, audit_grids=audit_grids)
    training = model is None or train is not None
    if reinit_dead and training and init != "checkpoint":
        raise UsageError("--reinit-dead re-initialises the trained weights, which a retraining from scratch throws "
                         "away (both arms would train the same thing): add --init checkpoint")  # fmt: skip


def _check_own_model(*, train: str | None, seeds: int, max_steps: int | None, init: str | None, verify: bool,
                     audit_grids: int | None) -> None:  # fmt: skip
    """--model: the retraining flags need --train, and --train needs a budget."""
    if train is None:
        given = [flag for flag, on in (("--seeds", seeds != 1), ("--max-steps", max_steps is not None),
                                       ("--init", init is not None)) if on]  # fmt: skip
        if given:
            raise UsageError(f"{', '.join(given)} set(s) how the model is retrained, and without --train nothing is: "
                             "add --train MODULE:FUNCTION, train(model, steps=N, seed=S)")  # fmt: skip
        return
    if max_steps is None:
        raise UsageError("--train needs a budget: pass --max-steps N (steps per run, the same for both arms)")
    if audit_grids is not None:
        raise UsageError("--audit-grids is for the bundled model's held-out grids: use --batches N with --data")
    if not verify:
        raise UsageError("--no-verify is for the bundled model: with --train both arms are trained and compared")


def _check_numbers(*, seeds: int, max_steps: int | None, audit_grids: int | None, threads: int | None, init: str | None) -> None:
    for value, flag in ((seeds, "--seeds"), (max_steps, "--max-steps"), (audit_grids, "--audit-grids"), (threads, "--threads")):
        check_count(value, flag)
    _init(init)


def _init(text: str | None) -> Init:
    """``--init``: scratch (the default) or checkpoint."""
    if text is None or text == "scratch":
        return "scratch"
    if text == "checkpoint":
        return "checkpoint"
    raise UsageError(f"--init takes scratch or checkpoint, not {text!r}")


def default_out(checkpoint: Path) -> Path:
    """``checkpoints/slot_attention.pth`` -> ``checkpoints/slot_attention_patched.pth``."""
    return checkpoint.with_name(f"{checkpoint.stem}_patched{checkpoint.suffix or '.pth'}")


__all__ = ["default_out", "patch_command"]
