"""Render a saved report again: Markdown, a self-contained HTML page, PNG figures, or the terminal view.

REPORT is a report.json (or its folder). A timeline.json beside it (written by `deadneuron audit --out`
for checkpoints with a health timeline) is drawn too; slot samples need the model: `audit --out` draws them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deadneuron.errors import UsageError


def report_command(
    report_path: Annotated[Path, typer.Argument(metavar="REPORT", help="A report.json (or the folder holding it).")],
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="table, or one or more of md,html,png,json (comma-separated), or all.")] = "table",
    out: Annotated[Path | None, typer.Option("--out", help="Folder to write into (needed for html, png, json; md prints to stdout without it).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Table: also the dead/dormant channel ids, slot usage and every finding's full text.")] = False,
) -> None:
    from deadneuron.cli.compare import load_report
    from deadneuron.render.files import parse_formats, read_timeline, write_report

    if out is not None:
        from deadneuron.cli._outputs import check_folder

        check_folder(out, option="--out")  # before any work
    report = load_report(report_path)
    folder = report_path if report_path.is_dir() else report_path.parent
    if fmt == "table":
        from deadneuron.render.terminal import render

        render(report, Console(), verbose=verbose)
        return
    try:
        formats = parse_formats(fmt)
    except ValueError as exc:
        raise UsageError(f"--format: {exc}") from None
    if out is None:
        if formats != ("md",):
            raise UsageError(f"--format {fmt} writes files: pass --out DIR")
        from deadneuron.render.markdown import render_markdown

        typer.echo(render_markdown(report), nl=False)
        return
    written = write_report(report, out, checkpoint=read_timeline(folder), formats=formats)
    for path in written:
        typer.echo(str(path))
