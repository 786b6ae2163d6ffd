"""Audit a checkpoint: per-site sparsity, flat fraction, dead and dormant channels, slots, findings.

A deadneuron checkpoint (from `deadneuron train`) needs no other flag: its adapter rebuilds the model
and feeds it its held-out data. A plain state_dict needs --model MODULE:FACTORY and data: --data
MODULE:FACTORY (an iterable of batches) or --input-shape N,C,H,W (random inputs, flagged as such).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deadneuron.errors import DeadneuronError, ExitCode, UsageError


def audit_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint: a deadneuron .pth, a state_dict, or .safetensors.")],
    model: Annotated[str | None, typer.Option("--model", help="MODULE:FACTORY building the model (for plain state_dicts).")] = None,
    model_arg: Annotated[list[str] | None, typer.Option("--model-arg", help="KEY=VALUE passed to the factory; repeatable.")] = None,
    input_shape: Annotated[str | None, typer.Option("--input-shape", help="Audit on random N,C,H,W inputs (flagged in the report).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="MODULE:FACTORY returning an iterable of batches.")] = None,
    batches: Annotated[int | None, typer.Option("--batches", help="Audit at most N batches (default: all; 8 with --input-shape).")] = None,
    eps: Annotated[float, typer.Option("--eps", help="An activation with |a| <= eps counts as zero.")] = 0.0,
    delta: Annotated[float, typer.Option("--delta", help="Flat region: derivative <= delta x its maximum.")] = 0.05,
    select: Annotated[list[str] | None, typer.Option("--select", help="Only sites matching this glob or kind; repeatable.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table (rich terminal report) or json (the Report on stdout).")] = "table",
    out: Annotated[Path | None, typer.Option("--out", help="Also write the report files into this folder.")] = None,
    allow_global: Annotated[list[str] | None, typer.Option("--allow-global", help="Allow one more type (module.Name) when unpickling.")] = None,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Open code-carrying formats (TorchScript, .pt2, pickled modules). Runs their code.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="Run on this device (default: where the model is).")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")] = None,
) -> None:
    from deadneuron.audit import audit
    from deadneuron.cli._subject import build_subject, parse_key_values

    if fmt not in ("table", "json"):
        raise UsageError(f"--format takes table or json, not {fmt!r}")
    if batches is not None and batches < 1:
        raise UsageError(f"--batches must be at least 1, got {batches}")
    if eps < 0:
        raise UsageError(f"--eps must be >= 0, got {eps}")
    if not 0 <= delta < 1:
        raise UsageError(f"--delta must be in [0, 1), got {delta}")
    subject = build_subject(
        checkpoint,
        model_spec=model,
        model_args=parse_key_values(model_arg or [], option="--model-arg"),
        input_shape=input_shape,
        data_spec=data,
        batches=batches,
        allow_globals=allow_global or (),
        trust_code=trust_code,
    )
    warnings = list(subject.warnings)
    if subject.random_inputs:
        warnings.append(f"made on random inputs of shape {input_shape}: real data can give different figures")
    assert subject.data is not None
    report = audit(
        subject.model, subject.data, eps=eps, delta=delta, select=select, max_batches=batches,
        device=device, progress=progress if fmt == "table" else False, adapter=subject.adapter,
        meta={"source": str(checkpoint), "random_inputs": subject.random_inputs},
    )  # fmt: skip
    report = report.with_meta(warnings=[*report.warnings, *warnings])
    report = _with_rules(report, subject)
    if out is not None:
        _write(report, out)
    if fmt == "json":
        typer.echo(report.to_json(indent=1))
        return
    from deadneuron.render.terminal import render

    render(report, Console())


def _with_rules(report, subject):  # type: ignore[no-untyped-def]
    """Attach findings when the rule engine is present (it arrives with its own issue)."""
    try:
        from deadneuron.rules import attach_findings
    except ImportError:
        return report
    return attach_findings(report, subject.checkpoint)


def _write(report, out: Path) -> None:  # type: ignore[no-untyped-def]
    try:
        from deadneuron.render.files import write_report
    except ImportError:
        write_report = None
    if write_report is not None:
        write_report(report, out)
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from deadneuron.errors import WriteError

        raise WriteError(f"cannot create report folder {out}: {exc.strerror}") from exc
    report.to_json(out / "report.json")


__all__ = ["DeadneuronError", "ExitCode", "audit_command"]
