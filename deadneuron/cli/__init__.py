"""deadneuron command-line interface: one small command per module, errors as one line + exit code."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any

import typer

from deadneuron.cli import audit, compare, patch, report, rules, timeline, train
from deadneuron.errors import DeadneuronError

EXIT_CODES = (
    "Exit codes: 0 ok, 1 a health gate failed, 2 usage, 3 refused as unsafe, 4 unreadable/corrupt/unsupported "
    "input, 5 model/checkpoint mismatch, 6 runtime failure, 7 write failed."
)

app = typer.Typer(
    name="deadneuron",
    help="Activation-health auditor for PyTorch: dead and dormant channels, sparsity, slot occupancy. " + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)


def _version(value: bool) -> None:
    if value:
        from deadneuron import __version__

        typer.echo(f"deadneuron {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Activation-health auditor for PyTorch."""


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """A DeadneuronError becomes one line on stderr and its documented exit code, never a traceback; so
    does Ctrl-C (exit 130; `train` says itself what its checkpoint holds then)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DeadneuronError as err:
            typer.echo(f"deadneuron: error: {err}", err=True)
            raise typer.Exit(int(err.exit_code)) from None
        except KeyboardInterrupt:
            typer.echo("deadneuron: interrupted by Ctrl-C before the command finished", err=True)
            raise typer.Exit(130) from None

    return run


_COMMANDS: tuple[tuple[str, Any, Callable[..., Any]], ...] = (
    ("audit", audit, audit.audit_command),
    ("train", train, train.train_command),
    ("patch", patch, patch.patch_command),
    ("rules", rules, rules.rules_command),
    ("compare", compare, compare.compare_command),
    ("report", report, report.report_command),
    ("timeline", timeline, timeline.timeline_command),
)


def _register() -> None:
    for name, module, command in _COMMANDS:
        app.command(name, help=module.__doc__)(handle_errors(command))


_register()


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """deadneuron's own Python warnings (a Monitor's, under `deadneuron train`) as one line on stderr, without
    the source line Python adds; any other warning as Python shows it."""
    text = str(message)
    if not text.startswith("deadneuron"):
        _SHOW_WARNING(message, category, filename, lineno, file, line)
        return
    print(f"deadneuron: warning: {text.split(': ', 1)[-1]}", file=sys.stderr)


_SHOW_WARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a DeadneuronError becomes one line on stderr and its exit code, a warning of
    deadneuron's one line too."""
    shown, warnings.showwarning = warnings.showwarning, _warning_line
    try:
        app(args=argv, standalone_mode=True)
    except DeadneuronError as err:
        print(f"deadneuron: error: {err}", file=sys.stderr)
        sys.exit(int(err.exit_code))
    except KeyboardInterrupt:
        print("deadneuron: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.showwarning = shown
