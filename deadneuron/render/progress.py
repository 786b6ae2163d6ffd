"""The terminal progress bar of an audit: a `deadneuron.measure.ProgressBar` drawn with rich on stderr,
removed when the audit ends. The command line supplies it; an audit run from Python draws nothing."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from deadneuron.measure import ProgressBar


@contextmanager
def audit_bar(total: int | None) -> Iterator[Callable[[], None]]:
    """A transient "auditing" bar over ``total`` batches (None: a count without an end)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("auditing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
                  console=Console(stderr=True)) as bar:  # fmt: skip
        task = bar.add_task("audit", total=total)
        yield lambda: bar.advance(task)


def terminal_bar(enabled: bool | None) -> ProgressBar | None:
    """`audit_bar` where ``enabled`` (None: where stderr is a terminal), else None."""
    on = sys.stderr.isatty() if enabled is None else enabled
    return audit_bar if on else None


__all__ = ["audit_bar", "terminal_bar"]
