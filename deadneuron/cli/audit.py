"""Audit a checkpoint: per-site sparsity, flat fraction, dead and dormant channels, slots, findings.

A deadneuron checkpoint (from `deadneuron train`) needs no other flag: its adapter rebuilds the model
and feeds it its held-out data. A plain state_dict needs --model MODULE:FACTORY and data: --data
MODULE:FACTORY (an iterable of batches) or --input-shape N,C,H,W (random inputs, flagged as such).
Padding is left out of every statistic where a mask fits the site: by default the attention_mask of
dict batches, or the adapter's valid grid cells; --mask KEY names another key (True where the batch holds
data; --mask '~KEY' inverts one True at padding, as PyTorch's key_padding_mask is; --mask 'len:KEY' builds
it from per-sample lengths), --no-mask counts padding.
A sequence-first site ((L, N, C) under an (N, L) mask) is masked on its dims 1,0; where N == L the shapes
cannot tell, and --mask-dims 'GLOB=1,0' says it.
Under torchrun (``torchrun --nproc-per-node N -m deadneuron audit ...``) each rank audits every N-th
batch, the ranks merge their statistics exactly, and the first rank prints and writes the one report.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from deadneuron._parse import check_count
from deadneuron.errors import DeadneuronError, ExitCode, UsageError

EPS, DELTA = 0.0, 0.05  # the defaults of --eps and --delta

if TYPE_CHECKING:
    from deadneuron.cli._subject import Subject
    from deadneuron.gate import GateLimits
    from deadneuron.report import Report
    from deadneuron.rules import RulesConfig, RuleSet


def audit_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint: a deadneuron .pth, a state_dict, or .safetensors.")],
    model: Annotated[str | None, typer.Option("--model", metavar="MODULE:FACTORY", help="MODULE:FACTORY or file.py:FACTORY building the model (for plain state_dicts).")] = None,
    model_arg: Annotated[list[str] | None, typer.Option("--model-arg", metavar="KEY=VALUE", help="KEY=VALUE passed to the factory; repeatable.")] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", metavar="N,C,H,W", help="Audit on random N,C,H,W inputs (flagged in the report).")] = None,
    data: Annotated[str | None, typer.Option("--data", metavar="MODULE:FACTORY", help="MODULE:FACTORY or file.py:FACTORY returning an iterable of batches.")] = None,
    batches: Annotated[int | None, typer.Option("--batches", help="Audit at most N batches (default: all; 8 with --input-shape).")] = None,
    train: Annotated[str | None, typer.Option("--train", metavar="MODULE:FN", help="train(model, steps=N, seed=S) for your model: the suggested patch commands retrain with it.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="With --train: steps of every run of the suggested patch commands (both arms).")] = None,
    eps: Annotated[float, typer.Option("--eps", help="An activation with |a| <= eps counts as zero.")] = EPS,
    delta: Annotated[float, typer.Option("--delta", help="Flat region: derivative <= delta x its maximum.")] = DELTA,
    select: Annotated[list[str] | None, typer.Option("--select", metavar="GLOB", help="Only sites matching this glob or kind; repeatable.")] = None,
    mask: Annotated[str | None, typer.Option("--mask", metavar="KEY", help="Padding mask: this key of dict batches, True (1) where the batch holds data; ~KEY inverts one that is True at padding, as PyTorch's key_padding_mask is; len:KEY builds it from the (N,) per-sample lengths in KEY (default: the attention_mask of dict batches, or the adapter's valid cells).")] = None,
    no_mask: Annotated[bool, typer.Option("--no-mask", help="Use no padding mask: padded positions count as data.")] = False,
    channel_axis: Annotated[list[str] | None, typer.Option("--channel-axis", metavar="GLOB=AXIS", help="Channel dim of the sites matching GLOB, where no layer fixes it (negative: from the end; none: the input has no channel dim, one channel); repeatable.")] = None,
    mask_dims: Annotated[list[str] | None, typer.Option("--mask-dims", metavar="GLOB=DIMS", help="Where the padding mask lies at the sites matching GLOB: their dims under the mask's (N, positions...), e.g. 1,0 for (L, N, C) sequence-first activations; repeatable.")] = None,
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="table (rich terminal report) or json (the Report on stdout).")] = "table",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Table: also the dead/dormant channel ids, slot usage and every finding's full text.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the report files into this folder.")] = None,
    allow_global: Annotated[list[str] | None, typer.Option("--allow-global", metavar="MODULE.NAME", help="Allow one more type (module.Name) when unpickling.")] = None,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Open code-carrying formats (TorchScript, .pt2, pickled modules). Runs their code.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="Run on this device (default: where the model is).")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")] = None,
    max_dead: Annotated[int | None, typer.Option("--max-dead", help="Gate: exit 1 if any site has more than N dead channels.")] = None,
    max_dead_fraction: Annotated[str | None, typer.Option("--max-dead-fraction", metavar="SHARE", help="Gate: exit 1 if any site has a larger share of dead channels (0.05 or 5%).")] = None,
    max_sparsity: Annotated[str | None, typer.Option("--max-sparsity", metavar="SHARE", help="Gate: exit 1 if any site's sparsity is higher (0.6 or 60%).")] = None,
    min_active_slots: Annotated[float | None, typer.Option("--min-active-slots", help="Gate: exit 1 if fewer slots are active per image on average.")] = None,
    gate_sites: Annotated[list[str] | None, typer.Option("--sites", metavar="GLOB", help="Gate only the sites matching this glob (name or module); repeatable.")] = None,
    no_rules: Annotated[bool, typer.Option("--no-rules", help="Measure only: evaluate no rule, list no finding.")] = False,
    disable: Annotated[list[str] | None, typer.Option("--disable", metavar="RULE_ID", help="Skip this rule (see `deadneuron rules`); repeatable.")] = None,
    rules_config: Annotated[Path | None, typer.Option("--config", metavar="FILE", help="TOML file of rule thresholds ([rules] table), read after pyproject.toml.")] = None,
) -> None:
    from deadneuron._inputs import resolve_device
    from deadneuron.activations import check_delta, check_eps
    from deadneuron.audit import audit
    from deadneuron.cli._launch import launch
    from deadneuron.cli._subject import (
        build_subject,
        check_callable,
        parse_channel_axes,
        parse_key_values,
        parse_mask_dims,
    )
    from deadneuron.cli._target import (
        AuditFlags,
        audit_args,
        measure_args,
        patch_target,
        peek_data,
        subject_limits,
    )
    from deadneuron.gate import GateLimits, fraction
    from deadneuron.render.progress import terminal_bar

    if fmt not in ("table", "json"):
        raise UsageError(f"--format takes table or json, not {fmt!r}")
    check_count(batches, "--batches")
    check_eps(eps)  # before any work
    check_delta(delta)
    if mask is not None and no_mask:
        raise UsageError("pass either --mask KEY or --no-mask, not both")
    _check_budget(train=train, max_steps=max_steps)
    if mask is not None and not mask.strip():
        raise UsageError("--mask takes the key of the mask in dict batches (e.g. attention_mask), got an empty string")
    try:
        limits = GateLimits(max_dead=max_dead, max_dead_fraction=fraction(max_dead_fraction, "max_dead_fraction"),
                            max_sparsity=fraction(max_sparsity, "max_sparsity"), min_active_slots=min_active_slots,
                            sites=tuple(gate_sites or ()))  # fmt: skip
    except UsageError as exc:  # named as the user typed them: --max-sparsity, not max_sparsity
        raise UsageError(_as_flags(str(exc))) from None
    if gate_sites and not limits.active:
        raise UsageError("--sites scopes the gate options: add --max-dead, --max-sparsity or --min-active-slots")
    if device is not None:
        resolve_device(device)  # an unusable device fails before the checkpoint is read
    axes = parse_channel_axes(channel_axis or [])
    placed = parse_mask_dims(mask_dims or [])
    if placed and no_mask:
        raise UsageError("--mask-dims places a padding mask, and --no-mask uses none: pass one of them")
    rules = _rules_config(no_rules, disable or [], rules_config)  # a bad config fails before the audit runs
    if out is not None:
        from deadneuron.cli._outputs import check_folder

        check_folder(out, option="--out")  # before any work
    with launch(device) as (shard, device):
        subject = build_subject(
            checkpoint,
            model_spec=model,
            model_args=parse_key_values(model_arg or [], option="--model-arg"),
            input_shape=input_shape,
            data_spec=data,
            batches=batches,
            allow_globals=allow_global or (),
            trust_code=trust_code,
            shard=shard,
        )
        train_fn = check_callable(train, option="--train") if train is not None else None
        for note in subject.notes if shard.primary else ():
            typer.echo(f"note: {note}", err=True)
        warnings = list(subject.warnings)
        if subject.random_inputs:
            warnings.append(f"made on random inputs of shape {input_shape}: real data can give different figures")
        assert subject.data is not None
        flags = AuditFlags(checkpoint, model=model, model_args=tuple(model_arg or ()), data=data, input_shape=input_shape,
                           batches=batches, train=train, max_steps=max_steps, allow_globals=tuple(allow_global or ()),
                           trust_code=trust_code, limits=subject_limits(mask=mask, no_mask=no_mask, channel_axis=channel_axis or (),
                                                                     mask_dims=mask_dims or ()))  # fmt: skip
        measured = measure_args(select=select or (), mask=mask, no_mask=no_mask, channel_axis=channel_axis or (),
                                mask_dims=mask_dims or (), eps=None if eps == EPS else str(eps),
                                delta=None if delta == DELTA else str(delta))  # fmt: skip
        peeked = peek_data(subject, batches)
        report = audit(
            subject.model, shard.take(subject.data, batches, sharded=subject.sharded), eps=eps, delta=delta,
            select=select, device=device, progress=terminal_bar(progress) if fmt == "table" and shard.primary else None,
            adapter=subject.adapter, histograms=out is not None, mask=None if no_mask else (mask or "auto"),
            channel_axis=axes, mask_dims=placed,
            meta={"source": str(checkpoint), "audit_args": list(audit_args(flags, measure=measured)),
                  "random_inputs": subject.random_inputs, "warnings": warnings,
                  **({"patched_plans": subject.patched_plans} if subject.patched_plans else {})},
            rules=rules[0] if rules is not None else False, rules_config=rules[1] if rules is not None else None,
            checkpoint=subject.checkpoint, patch_target=patch_target(flags, subject, peeked, train=train_fn),
        )  # fmt: skip
        if shard.primary:
            _publish(report, out, subject, fmt, verbose=verbose)
        _gate(report, limits, quiet=not shard.primary)


def _publish(report: Report, out: Path | None, subject: Subject, fmt: str, *, verbose: bool) -> None:
    """Write the report files and print the report (one rank does this under torchrun)."""
    written = _write(report, out, subject) if out is not None else []
    if fmt == "json":
        typer.echo(report.to_json(indent=1))
    else:
        from deadneuron.render.terminal import render

        render(report, Console(), verbose=verbose)
    if out is not None:  # on stderr: stdout holds the report alone (JSON with --format json)
        typer.echo(f"wrote {_written_text(written, out)}", err=True)


def _check_budget(*, train: str | None, max_steps: int | None) -> None:
    """--train makes the suggested commands retrain the model, which `deadneuron patch` does on a budget."""
    check_count(max_steps, "--max-steps")
    if train is not None and max_steps is None:
        raise UsageError("--train makes the suggested patch commands retrain your model: add --max-steps N, the "
                         "steps of every run (both arms)")  # fmt: skip
    if max_steps is not None and train is None:
        raise UsageError("--max-steps is the budget of the runs --train makes: add --train MODULE:FUNCTION")


def _gate(report: Report, limits: GateLimits, *, quiet: bool = False) -> None:
    """After the report is out: a --sites glob that matches no site is a usage error (exit 2); else list
    every violated check on stderr (unless ``quiet``: a rank other than the first under torchrun) and exit 1."""
    from deadneuron.gate import check, failure_message

    unmatched = _unmatched_sites(report, limits.sites)
    if unmatched:  # a gate on a glob that matches nothing guards nothing: a usage error, not a violation
        if quiet:
            raise typer.Exit(int(ExitCode.USAGE))
        raise UsageError(unmatched)
    violations = check(report, limits)
    if violations:
        if not quiet:
            typer.echo("deadneuron: " + _as_flags(failure_message(violations, header="health gate failed")), err=True)
        raise typer.Exit(int(ExitCode.GATE_FAILED))


def _as_flags(text: str) -> str:
    """The gate's limits named as the user typed them: --max-sparsity, not max_sparsity."""
    return re.sub(r"(?<![\w.])(max_dead_fraction|max_dead|max_sparsity|min_active_slots)\b",
                  lambda m: "--" + m.group(1).replace("_", "-"), text)  # fmt: skip


def _unmatched_sites(report: Report, globs: tuple[str, ...]) -> str:
    """One line for the --sites globs that match no site of ``report`` (empty when every glob matches)."""
    from deadneuron.gate import scoped_sites

    missed = [g for g in globs if not scoped_sites(report, (g,))]
    if not missed:
        return ""
    names = list(report.sites)
    known = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    said = ", ".join(f"--sites {g!r}" for g in missed) + (" matches" if len(missed) == 1 else " match")
    return (f"{said} no site, so a gate on {'it' if len(missed) == 1 else 'them'} checks nothing "
            f"(sites: {known or 'none'}); give a glob of site or module names")


def _rules_config(no_rules: bool, disable: list[str], config_file: Path | None) -> tuple[RuleSet, RulesConfig] | None:
    """Rules and thresholds: defaults, pyproject.toml, --config, then --disable (None with --no-rules)."""
    if no_rules:
        return None
    from deadneuron.rules import load_rules
    from deadneuron.settings import load_config

    rules = load_rules()
    return rules, load_config(rules=rules, config_file=config_file, disable=disable)


def _write(report: Report, out: Path, subject: Subject) -> list[Path]:
    from deadneuron.render.files import write_report

    return write_report(report, out, model=subject.model, adapter=subject.adapter, checkpoint=subject.checkpoint)


def _written_text(written: list[Path], out: Path) -> str:
    """``reports/mine/: report.json, report.md, report.html and 4 figures (PNG)``."""
    names = [p.name for p in written if p.suffix != ".png"]
    figures = sum(1 for p in written if p.suffix == ".png")
    if figures:
        names.append(f"{figures} figure{'s' if figures != 1 else ''} (PNG)")
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)
    return f"{out}{'' if str(out).endswith('/') else '/'}: {listed}"


__all__ = ["DeadneuronError", "ExitCode", "audit_command"]
