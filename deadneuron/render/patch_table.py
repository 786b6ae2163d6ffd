"""Renderings of a :class:`~deadneuron.patch.verify.Verification`: a rich table and a Markdown table.

A cell is ``mean ± std`` over seeds (just the value with one seed); the change is patched minus
baseline (percentage points for shares). The rich table fits the console (80 columns too): each group
(all sites, slots, task, each site) heads its own rows instead of filling a column. rich is imported
inside the functions that need it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from deadneuron.patch.verify import Row, Verdict, Verification, spread

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.table import Table

_VERDICT_STYLE = {
    Verdict.IMPROVED: "green",
    Verdict.WORSE: "red",
    Verdict.NO_CHANGE: "dim",
    Verdict.BY_DEFINITION: "yellow",
    Verdict.NOT_AVAILABLE: "dim",
    Verdict.REFERENCE: "dim",
}
_GROUP_TITLES = {"overall": "all sites", "slots": "slots", "task": "task", "metric": "--metric"}


def fmt_value(values: Sequence[float], unit: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    mean = statistics.fmean(finite)
    sd = spread(finite)
    scale, digits, suffix = _format(unit)
    text = f"{mean * scale:.{digits}f}"
    if len(finite) > 1:
        text += f" ± {sd * scale:.{digits}f}"
    return text + suffix


def fmt_change(row: Row) -> str:
    d = row.difference
    if not math.isfinite(d) or row.verdict is Verdict.REFERENCE:
        return ""
    scale, digits, _ = _format(row.spec.unit)
    suffix = " pp" if row.spec.unit == "share" else ""
    return f"{d * scale:+.{digits}f}{suffix}"


def _format(unit: str) -> tuple[float, int, str]:
    formats = {"count": (1.0, 1, ""), "share": (100.0, 1, "%"), "ratio": (1.0, 3, ""), "slots": (1.0, 2, ""),
               "loss": (1.0, 3, ""), "value": (1.0, 4, "")}  # fmt: skip
    return formats[unit]


def _count_format(values: Sequence[float]) -> bool:
    return all(float(v).is_integer() for v in values if math.isfinite(v))


def _cell(values: Sequence[float], unit: str) -> str:
    if unit == "count" and len(values) == 1 and _count_format(values):
        return f"{values[0]:.0f}"
    return fmt_value(values, unit)


def _reference(row: Row) -> str:
    return "" if row.reference is None else _cell((row.reference,), row.spec.unit)


def notes(v: Verification) -> list[str]:
    """The distinct notes of the rows, in order; a row's verdict cell refers to its note by number."""
    return list(dict.fromkeys(r.note for r in v.rows if r.note))


def _verdict(row: Row, numbered: list[str]) -> str:
    return row.verdict.value + (f" [{numbered.index(row.note) + 1}]" if row.note else "")


def has_reference(v: Verification) -> bool:
    return any(r.reference is not None for r in v.rows)


def header(v: Verification) -> list[str]:
    n = len(v.seeds)
    count = f" ({n} seed{'s' if n > 1 else ''})" if _trained(v) else ""
    arms = [f"{v.labels[0]}{count}", v.labels[1], "change", "verdict"]
    return ["where", "metric", *(["input"] if has_reference(v) else []), *arms]


def rows_text(v: Verification) -> list[list[str]]:
    out = []
    previous = None
    reference = has_reference(v)
    numbered = notes(v)
    for row in v.rows:
        where = _GROUP_TITLES.get(row.group, row.group) if row.group != previous else ""
        previous = row.group
        ref = [_reference(row)] if reference else []
        out.append([where, row.spec.label, *ref, _cell(row.baseline, row.spec.unit),
                    _cell(row.patched, row.spec.unit), fmt_change(row), _verdict(row, numbered)])  # fmt: skip
    return out


def budget_line(v: Verification) -> str:
    b = v.budget
    parts = [f"seeds {', '.join(map(str, v.seeds))}"] if b.get("steps") is not None or len(v.seeds) > 1 else []
    parts += [f"{k.replace('_', ' ')} {b[k]}" for k in ("init", "steps", "audit") if b.get(k) is not None]
    if b.get("seconds") is not None:
        parts.append(f"{float(b['seconds']) / 60:.1f} min wall time")
    return "; ".join(parts)


def verification_table(v: Verification) -> VerificationTable:
    """A rich renderable of every row, verdicts coloured, that fits the console: each group (all sites,
    slots, task, then each site) on a line of its own, its rows indented under it, columns aligned."""
    return VerificationTable(v)


_INDENT = 2
_MIN_VERDICT = len(Verdict.BY_DEFINITION.value)  # a verdict's words never break; only its note number wraps
_WANTED_LABEL = 16  # "dormant channels", "sparsity (zeros)": the per-site labels on one line


class VerificationTable:
    """Renders at the console's width (``__rich_console__``): a long site name wraps on its own line
    instead of widening a column, so the table reads at 80 columns."""

    def __init__(self, v: Verification) -> None:
        self.v = v

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.padding import Padding
        from rich.text import Text

        v = self.v
        yield Text(f"{v.labels[0]} vs {v.labels[1]}: {budget_line(v)}", style="italic")
        cells = [c[1:] for c in rows_text(v)]
        names = header(v)[1:]
        widths = _widths(cells, names, options.max_width - _INDENT)
        if widths[0] < _WANTED_LABEL and any(" ± " in c for row in cells for c in row):
            cells = [[c.replace(" ± ", "±") for c in row] for row in cells]  # 4 columns more for the labels
            widths = _widths(cells, names, options.max_width - _INDENT)
        yield Padding(_rows_table(widths, names, []), (0, 0, 0, _INDENT))
        yield Padding(Text("─" * (sum(widths) + len(widths) - 1), style="dim"), (0, 0, 0, _INDENT))
        groups: list[tuple[str, list[tuple[Row, list[str]]]]] = []
        for row, first, rest in zip(v.rows, rows_text(v), cells, strict=True):
            if first[0] or not groups:
                groups.append((_GROUP_TITLES.get(row.group, row.group), []))
            groups[-1][1].append((row, rest))
        for title, rows in groups:
            yield Text(title, style="bold", overflow="fold")
            yield Padding(_rows_table(widths, None, rows), (0, 0, 0, _INDENT))
        yield Text(_caption(v), style="dim")


def _two_lines(text: str) -> int:
    """The narrowest width at which ``text`` wraps into at most two lines (at a space)."""
    cuts = [i for i, ch in enumerate(text) if ch == " "]
    return min([len(text), *(max(i, len(text) - i - 1) for i in cuts)])


def _widths(cells: list[list[str]], names: list[str], width: int) -> list[int]:
    """Column widths, metric label first. Numbers get their longest cell and their header on one line;
    where the label would get narrower than ``_WANTED_LABEL``, the headers wrap into two lines, then the
    verdict's note number wraps; the label takes the rest (it wraps at its spaces)."""
    longest = [max([len(row[i]) for row in cells] or [0]) for i in range(len(names))]
    label = max(longest[0], max(len(w) for w in names[0].split()))
    fixed = [max(n, len(h)) for n, h in zip(longest[1:], names[1:], strict=True)]
    steps: tuple[list[int], ...] = ([max(n, _two_lines(h)) for n, h in zip(longest[1:], names[1:], strict=True)],)
    steps += ([*steps[0][:-1], max(min(steps[0][-1], _MIN_VERDICT), _two_lines(names[-1]))],)
    for smaller in steps:
        if width - (len(names) - 1) - sum(fixed) >= min(label, _WANTED_LABEL):
            break
        fixed = smaller
    spare = width - (len(names) - 1) - sum(fixed)
    return [max(8, min(label, spare)), *fixed]


def _rows_table(widths: list[int], names: list[str] | None, rows: list[tuple[Row, list[str]]]) -> Table:
    from rich.table import Table

    table = Table(box=None, show_header=names is not None, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  collapse_padding=True)  # fmt: skip
    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        table.add_column((names or [""] * len(widths))[i], width=width, justify="left" if i == 0 or last else "right",
                         overflow="fold")  # fmt: skip
    for row, cells in rows:
        style = _VERDICT_STYLE.get(row.verdict, "")
        table.add_row(*cells[:-1], f"[{style}]{cells[-1]}[/]" if style else cells[-1])
    return table


def _trained(v: Verification) -> bool:
    """Whether the arms were trained (a step budget): seeds mean something only then."""
    return v.budget.get("steps") is not None


def _caption(v: Verification) -> str:
    counts = v.counts()
    tally = ", ".join(f"{counts[k.value]} {k.value}" for k in Verdict if k.value in counts)
    claim = " One seed is not a claim: use --seeds 3." if len(v.seeds) < 2 and _trained(v) else ""
    lines = [f"{tally}.{claim} A change counts when |mean difference| > max(tolerance, larger per-arm std)."]
    if has_reference(v):
        lines.append("input: the checkpoint as it was trained (its own budget).")
    lines += [f"[{i}] {note}" for i, note in enumerate(notes(v), 1)]
    return "\n".join(lines)


def verification_markdown(v: Verification, *, sites: Sequence[str] | None = None) -> str:
    """A Markdown table (``sites`` limits the per-site rows; the overall, slot and task rows stay)."""
    keep = [r for r in v.rows if r.group in _GROUP_TITLES or sites is None or r.group in sites]
    shown = Verification(v.seeds, tuple(keep), v.budget, v.labels)
    names = header(shown)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * 2 + "---:|" * (len(names) - 3) + "---|"]
    for cells in rows_text(shown):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    caption = _caption(shown).replace("\n", "  \n")  # Markdown line breaks
    return "\n".join([f"Budget: {budget_line(v)}.", "", *lines, "", caption]) + "\n"


__all__ = ["VerificationTable", "budget_line", "fmt_change", "fmt_value", "verification_markdown", "verification_table"]
