"""Compare two saved reports: new dead channels, sparsity and flat changes per site, slots, accuracy.

A and B are report.json files (from `deadneuron audit --out DIR` or `--format json`). Prints a site-by-site
diff, or Markdown with --format md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deadneuron.errors import UnreadableInputError, UsageError
from deadneuron.report import Report


def load_report(path: Path) -> Report:
    """A saved report; one-line errors for a missing, unreadable or foreign file."""
    if path.is_dir():
        path = path / "report.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnreadableInputError(f"{path}: no such report file") from None
    except UnicodeDecodeError:
        raise UnreadableInputError(f"{path}: not a deadneuron report but a binary file (a checkpoint?); give the "
                                   "report.json that `deadneuron audit --out DIR` wrote") from None  # fmt: skip
    except OSError as exc:
        raise UnreadableInputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return Report.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise UnreadableInputError(f"{path}: not a readable deadneuron report ({detail})") from None
    except RecursionError:  # json.loads recurses once per nesting level: hostile or damaged
        raise UnreadableInputError(f"{path}: nested too deeply for a deadneuron report (corrupt or hostile?); "
                                   "not loaded: give the report.json an audit wrote") from None  # fmt: skip


def compare_command(
    a: Annotated[Path, typer.Argument(help="Report A (the baseline): report.json or its folder.")],
    b: Annotated[Path, typer.Argument(help="Report B (the candidate): report.json or its folder.")],
    fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="table (terminal) or md (Markdown on stdout).")] = "table",
    out: Annotated[Path | None, typer.Option("--out", help="Also write the Markdown diff to this file.")] = None,
) -> None:
    from deadneuron.render.compare import diff_reports, render_diff, render_diff_markdown

    if fmt not in ("table", "md"):
        raise UsageError(f"--format takes table or md, not {fmt!r}")
    if out is not None:
        from deadneuron.cli._outputs import check_output

        inputs = [p / "report.json" if p.is_dir() else p for p in (a, b)]
        check_output(out, option="--out", inputs=inputs, force=True)  # before any work; it is replaced
    diff = diff_reports(load_report(a), load_report(b))
    if out is not None:
        from deadneuron.render.files import write_text_file

        write_text_file(render_diff_markdown(diff), out)
    if fmt == "md":
        typer.echo(render_diff_markdown(diff), nl=False)
        return
    render_diff(diff, Console())
