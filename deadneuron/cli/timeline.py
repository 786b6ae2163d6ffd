"""Draw the health timeline of a training run: dead channels, flat fraction, tau-dormant share and
gradient flow per site over the steps.

PATH is a monitor log (JSONL or CSV, written by deadneuron.Monitor's JsonlWriter or CsvWriter) or a
deadneuron checkpoint that carries a health timeline (what `deadneuron train` writes), loaded without
running its code (weights_only); its figure is the one `audit --out` draws. Without --out, prints the
last timeline point's figures per site.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from deadneuron.errors import UsageError


def timeline_command(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="A monitor log (JSONL or CSV), or a checkpoint with a health timeline.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write the figure to this PNG file.")] = None,
    title: Annotated[str, typer.Option("--title", help="Title of a monitor log's figure (a checkpoint's is titled as by audit --out).")] = "Health over training",
) -> None:  # fmt: skip
    entries, checkpoint = _read(path)
    if out is None:
        _print_last(entries[-1])
        return
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the figure is written as PNG; give a .png path")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    from deadneuron.render._style import figure_png
    from deadneuron.render.files import timeline_figure, write_bytes_file
    from deadneuron.render.timeline_plots import plot_monitor_timeline

    figure = timeline_figure(checkpoint) if checkpoint is not None else None  # what audit --out draws
    if figure is None:
        figure = plot_monitor_timeline(entries, title=title)
    write_bytes_file(figure_png(figure), out)
    typer.echo(str(out))


def _read(path: Path) -> tuple[list[dict[str, Any]], Mapping[str, Any] | None]:
    """The timeline entries at ``path`` and, for a checkpoint, the checkpoint (its history too is drawn)."""
    from deadneuron.checkpoint import CheckpointFormat, load_checkpoint, sniff
    from deadneuron.integrations.writers import read_log

    fmt = sniff(path) if path.is_file() else None
    if fmt in (CheckpointFormat.ZIP, CheckpointFormat.LEGACY_PICKLE):
        checkpoint = load_checkpoint(path)  # weights_only: nothing in the file runs
        if isinstance(checkpoint, Mapping):
            timeline = checkpoint.get("health_timeline")
            if isinstance(timeline, list) and timeline and all(isinstance(e, Mapping) for e in timeline):
                return [dict(e) for e in timeline], checkpoint
    if fmt in (CheckpointFormat.ZIP, CheckpointFormat.LEGACY_PICKLE, CheckpointFormat.SAFETENSORS,
               CheckpointFormat.TORCHSCRIPT, CheckpointFormat.EXPORTED_PROGRAM):  # fmt: skip
        raise UsageError(f"{path}: a checkpoint without a health timeline (deadneuron train stores one in its "
                         "checkpoints); give a monitor log (JSONL or CSV) or such a checkpoint")  # fmt: skip
    entries = read_log(path, warn=lambda message: typer.echo(f"warning: {message}", err=True))
    if not entries:
        raise UsageError(f"{path}: the monitor log has no snapshot yet")
    return entries, None


def _print_last(entry: dict[str, Any]) -> None:
    from deadneuron.render.timeline import timeline_frame

    frame = timeline_frame([entry])
    sites = [s for s in (entry.get("sites") or {}).values() if isinstance(s, dict)]
    columns = [c for c in ("site", "channels", "dead", "dormant", "tau_dormant", "not_learning", "flat_fraction",
                           "grad_nonzero") if c in frame and (not frame[c].isna().all() or any(c in s for s in sites))]  # fmt: skip
    from deadneuron.render.markdown import pct

    table = frame[columns].copy()
    for share in ("flat_fraction", "grad_nonzero"):  # shares of elements, in % as every other report says them
        if share in table:
            table[share] = [pct(v) for v in table[share]]
    typer.echo(f"step {entry.get('step')}: {len(frame)} sites")
    typer.echo(table.to_string(index=False, na_rep="n/a"))  # n/a: not measured (no gradient reached it)
