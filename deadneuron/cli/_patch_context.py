"""What the three ``deadneuron patch`` flows share: where the outputs go and how to talk to the user
(`Context`), the output set written all or none (`new_outputs`), and the Markdown table and before/after
figure asked for (`extras`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from deadneuron.cli._outputs import Outputs
from deadneuron.patch.verify import Verification
from deadneuron.report import Report


class Context:
    """Where the outputs go and how to talk to the user; shared by both flows."""

    def __init__(self, *, checkpoint: Path, out: Path, force: bool, dry_run: bool, progress: bool,
                 markdown: Path | None, figure: Path | None, console: Console, err: Console,
                 primary: bool = True) -> None:  # fmt: skip
        self.checkpoint, self.out, self.force, self.dry_run, self.progress = checkpoint, out, force, dry_run, progress
        self.markdown, self.figure, self.console, self.err = markdown, figure, console, err
        self.primary = primary  # the process that speaks and writes (rank 0 under torchrun)

    def say(self, text: str) -> None:
        if self.primary:
            self.err.print(text, highlight=False, markup=False, soft_wrap=True)


@dataclass(frozen=True)
class SubjectFlags:
    """How a plain state_dict becomes a model with data: --model, --model-arg, --data, --input-shape,
    --batches, --allow-global, --trust-code."""

    model_spec: str
    model_args: Mapping[str, Any]
    data: str | None
    input_shape: str | None
    batches: int | None
    allow_globals: Sequence[str]
    trust_code: bool


def new_outputs(ctx: Context) -> Outputs:
    return Outputs(protect=[ctx.checkpoint], force=ctx.force)


def extras(ctx: Context, outputs: Outputs, verification: Verification, before: list[Report], after: list[Report],
           labels: tuple[str, str], changes: Sequence[str] = ()) -> None:  # fmt: skip
    """The Markdown table and the before/after figure (titled with the ``changes`` and the budget), where
    asked for, rendered now into ``outputs``."""
    from deadneuron.render import training_plots
    from deadneuron.render._style import figure_png
    from deadneuron.render.patch_table import budget_line, verification_markdown

    if ctx.markdown is not None:
        outputs.text(ctx.markdown, verification_markdown(verification))
    if ctx.figure is not None:
        figure = training_plots.plot_before_after(before, after, labels=labels, changes=changes,
                                                  budget=budget_line(verification))  # fmt: skip
        outputs.data(ctx.figure, figure_png(figure))


__all__ = ["Context", "SubjectFlags", "extras", "new_outputs"]
