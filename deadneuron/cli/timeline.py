"""Draw the health timeline of a training run from a monitor log: dead channels, flat fraction,
tau-dormant share and gradient flow per site over the steps.

LOG is a JSONL or CSV file written by deadneuron.Monitor's JsonlWriter or CsvWriter. Without --out, prints
the last snapshot's figures per site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deadneuron.errors import UsageError


def timeline_command(
    log: Annotated[Path, typer.Argument(metavar="LOG", help="A monitor log: JSONL or CSV.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write the figure to this PNG file.")] = None,
    title: Annotated[str, typer.Option("--title", help="Title of the figure.")] = "Health over training",
) -> None:
    from deadneuron.integrations.writers import read_log

    entries = read_log(log, warn=lambda message: typer.echo(f"warning: {message}", err=True))
    if not entries:
        raise UsageError(f"{log}: the monitor log has no snapshot yet")
    if out is None:
        _print_last(entries[-1])
        return
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the figure is written as PNG; give a .png path")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    from deadneuron.render._style import figure_png
    from deadneuron.render.files import write_bytes_file
    from deadneuron.render.timeline_plots import plot_monitor_timeline

    write_bytes_file(figure_png(plot_monitor_timeline(entries, title=title)), out)
    typer.echo(str(out))


def _print_last(entry: dict) -> None:
    from deadneuron.render.timeline import timeline_frame

    frame = timeline_frame([entry])
    columns = [c for c in ("site", "channels", "dead", "dormant", "tau_dormant", "not_learning", "flat_fraction",
                           "grad_nonzero") if c in frame and not frame[c].isna().all()]  # fmt: skip
    typer.echo(f"step {entry.get('step')}: {len(frame)} sites")
    typer.echo(frame[columns].to_string(index=False))
