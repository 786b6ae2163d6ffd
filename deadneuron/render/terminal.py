"""Rich terminal rendering of a Report that leads with the answer.

First a panel with the verdict (one line) and the three most important findings, each grouped per rule
with one line per site and its commands; then the headline figures, the site table and the other
findings. The channel ids, slot usage and each finding's whole text come with ``verbose``.

Colours mark severity (red: dead channels or errors, yellow: dormant channels or warnings, dim: zero
counts). Rich drops colour under ``NO_COLOR`` and all escape codes when piped; everything here also
reads in plain text (counts and words, never colour alone) and fits 80 columns by folding long names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from deadneuron.render.findings_view import FindingGroup, group_findings, verdict
from deadneuron.render.markdown import (
    accuracy_text,
    axis_legend,
    channels_cell,
    data_text,
    dead_where,
    ids_text,
    mask_text,
    pct,
    slots_text,
    source_of,
)
from deadneuron.report import Report, SiteHealth
from deadneuron.rules.common import plural
from deadneuron.rules.model import Severity

SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def _facts_grid(report: Report) -> Table:
    """Label / value rows; long values wrap under their value column, not under the labels."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in _summary_rows(report):
        grid.add_row(label, value)
    return grid


def _summary_rows(report: Report) -> list[tuple[str, Text]]:
    sm = report.summary
    where = dead_where(report)
    rows = [
        ("sparsity", Text.assemble(pct(sm.sparsity), " exact zeros; ", ("flat ", "bold"), pct(sm.flat_fraction),
                                   (" (pre-activations in the flat region)", "dim"))),
        ("dead", Text.assemble((str(sm.dead), "bold red" if sm.dead else "green"), f" of {sm.channels} channels{where}; ",
                               ("dormant ", "bold"), (str(sm.dormant), "yellow" if sm.dormant else ""),
                               (" (flat >= 99%)", "dim"))),
    ]  # fmt: skip
    if sm.nonfinite:
        rows.append(("nonfinite", Text(f"{sm.nonfinite} NaN/Inf activation elements", style="bold red")))
    slots = slots_text(report)
    if slots is not None:
        rows.append(("slots", Text(slots, style=_slot_style(report))))
    acc = accuracy_text(report.metrics)
    if acc is not None:
        rows.append(("accuracy", Text(acc, style=_accuracy_style(report.metrics))))
    mask = mask_text(report)
    if mask is not None:
        rows.append(("mask", Text(mask)))
    rows.append(("data", Text(data_text(report), style="dim")))
    return rows


def _slot_style(report: Report) -> str:
    sl = report.slots
    return "yellow" if sl is not None and sl.num_slots > 1 and sl.mean_active < 2 else ""


def _accuracy_style(metrics: Mapping[str, float]) -> str:
    base = metrics.get("baseline_valid_pixel_accuracy")
    return "" if base is None or metrics["valid_pixel_accuracy"] > base else "bold red"


def summary_panel(report: Report, *, seen: set[str] | None = None, top: int = 3, verbose: bool = False) -> Panel:
    """The answer first: the verdict, then the ``top`` most important findings with their commands
    (``seen`` collects the commands shown, so that later groups do not repeat them; ``verbose``: every
    site and command of those findings)."""
    groups = group_findings(report.findings)
    items: list[RenderableType] = [Text.assemble(("verdict: ", "bold"), (verdict(report, groups), _verdict_style(report, groups)))]
    for group in groups[:top]:
        items.append(group_block(group, seen=seen if seen is not None else set(), verbose=verbose))
    if len(groups) > top:
        items.append(Text(f"{len(groups) - top} more finding{'s' if len(groups) - top > 1 else ''} below the site table", style="dim"))
    return Panel(Group(*items), title=f"deadneuron audit: {source_of(report)}", title_align="left")


MAX_SITES = 3  # per finding group in the default view


def _verdict_style(report: Report, groups: Sequence[FindingGroup]) -> str:
    if any(g.severity is Severity.ERROR for g in groups) or report.summary.nonfinite:
        return "bold red"
    return "yellow" if report.summary.dead or any(g.severity is Severity.WARNING for g in groups) else "green"


def group_block(group: FindingGroup, *, seen: set[str], verbose: bool = False, max_commands: int = 1) -> Group:
    """A rule's findings: its title, one line per site (the first ``MAX_SITES`` unless ``verbose``: the
    site table has them all), then each command not shown before (the first ``max_commands``)."""
    items: list[RenderableType] = [Text.assemble((f"[{group.severity.value}] ", SEVERITY_STYLE[group.severity]),
                                                 (group.headline, "bold"))]  # fmt: skip
    items += _evidence_items(group, max_sites=None if verbose else MAX_SITES)
    new = [c for c in group.commands if c not in seen]
    shown = new if verbose else new[:max_commands]
    seen.update(shown)
    if shown:
        items.append(Padding(_commands_grid(shown), (0, 0, 0, 2)))
    if len(new) > len(shown):
        items.append(Padding(Text(f"and {plural(len(new) - len(shown), 'more command', 'more commands')} (--verbose)", style="dim"), (0, 0, 0, 2)))
    return Group(*items)


def _evidence_items(group: FindingGroup, *, max_sites: int | None) -> list[RenderableType]:
    """Model-wide evidence as one wrapped line, then one line per site (names in one column)."""
    items: list[RenderableType] = [Padding(Text(line.text), (0, 0, 0, 2)) for line in group.lines if not line.site]
    per_site = [line for line in group.lines if line.site]
    if per_site:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(overflow="fold", max_width=32)
        grid.add_column(overflow="fold")
        for line in per_site[:max_sites]:
            grid.add_row(line.site, line.text)
        items.append(Padding(grid, (0, 0, 0, 2)))
        if max_sites is not None and len(per_site) > max_sites:
            more = len(per_site) - max_sites
            items.append(Padding(Text(f"and {more} more site{'s' if more > 1 else ''} (--verbose)", style="dim"),
                                 (0, 0, 0, 2)))
    if not group.lines:  # a finding without evidence: its message is all there is
        items += [Padding(Text(m), (0, 0, 0, 2)) for m in group.messages]
    return items


def _commands_grid(commands: Sequence[str]) -> Table:
    """``try:`` beside each command; a long command wraps under itself, not under ``try:``."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for c in commands:
        grid.add_row("try:", Text(c, style="green"))
    return grid


def more_findings(report: Report, *, seen: set[str], verbose: bool, top: int = 3) -> Group | None:
    """The groups the panel did not show."""
    rest = group_findings(report.findings)[top:]
    if not rest:
        return None
    items: list[RenderableType] = [Text("More findings", style="bold underline")]
    items += [group_block(g, seen=seen, verbose=verbose) for g in rest]
    return Group(*items)


def full_findings(report: Report) -> Group | None:
    """Every finding's whole text (per-site paragraphs with their channel lists), grouped by rule; a finding
    without evidence showed its text in its group already."""
    groups = [g for g in group_findings(report.findings) if g.lines and g.messages]
    if not groups:
        return None
    items: list[RenderableType] = [Text("Findings in full", style="bold underline")]
    for group in groups:
        items.append(Text.assemble((f"[{group.severity.value}] ", SEVERITY_STYLE[group.severity]), (group.title, "bold")))
        items += [Padding(Text(m), (0, 0, 1 if i + 1 < len(group.messages) else 0, 2)) for i, m in enumerate(group.messages)]
    return Group(*items)


def _count_cell(k: int, style: str) -> Text:
    return Text(str(k), style=style if k else "dim")


def _site_style(s: SiteHealth) -> str:
    if s.dead_channels or s.nonfinite:
        return "bold red"
    return "yellow" if s.dormant_channels else ""


def kind_cell(label: str) -> str:
    """A site's kind as the narrow table shows it: the parameters' values without their names, GELU's
    default approximation left out (``leaky_relu(0.01)``, ``gelu``, ``gelu(tanh)``); the reports keep the
    whole label, with what an activation written out was written as (``written=``, the last parameter), which
    the narrow table leaves out."""
    label = re.sub(r"(\(|, )written=.*\)$", lambda m: ")" if m.group(1) == ", " else "", label)
    label = label.replace("(approximate=none)", "")
    return re.sub(r"(?<=[(,\s])[A-Za-z_]\w*=", "", label)


def site_table(report: Report, *, console: Console | None = None) -> Table:
    """One row per site; the nonfinite column only when some site has NaN/Inf. A site name is never
    broken over two lines where the table fits the ``console``'s width with every name whole."""
    table = _site_table(report, fold_names=False)
    if console is not None and console.measure(table).minimum <= console.width:
        return table
    return _site_table(report, fold_names=True)


def _site_table(report: Report, *, fold_names: bool) -> Table:
    with_nonfinite = any(s.nonfinite for s in report.sites.values())
    table = Table(title="Activation sites", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("site", overflow="fold", min_width=20, no_wrap=not fold_names)
    table.add_column("kind", overflow="fold", max_width=16)
    for name in ("ch", "sparsity", "flat", "dead", "dormant", *(("nonfinite",) if with_nonfinite else ())):
        table.add_column(name, justify="right", no_wrap=True)
    for s in report.sites.values():
        row: list[RenderableType] = [
            Text(s.name, style=_site_style(s)), kind_cell(s.label), channels_cell(s), pct(s.sparsity), pct(s.flat_fraction),
            _count_cell(len(s.dead_channels), "bold red"), _count_cell(len(s.dormant_channels), "yellow"),
        ]  # fmt: skip
        if with_nonfinite:
            row.append(_count_cell(s.nonfinite, "bold red"))
        table.add_row(*row)
    return table


def channel_lines(report: Report) -> Table | None:
    """Which channels are dead or dormant, site by site (long lists wrap under their text)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for s in report.sites.values():
        if s.dead_channels:
            grid.add_row(Text("dead", style="bold red"), f"{s.name}: channels {ids_text(s.dead_channels)}")
        if s.dormant_channels:
            grid.add_row(Text("dormant", style="yellow"), f"{s.name}: channels {ids_text(s.dormant_channels)}")
    return grid if grid.row_count else None


def slot_usage_text(report: Report) -> Text | None:
    """Share of images in which each slot is active, on one wrapped line (K can be large)."""
    sl = report.slots
    if sl is None:
        return None
    text = Text.assemble(("slot usage", "bold"), " (share of images where the slot is active): ")
    for k, u in enumerate(sl.slot_usage):
        text.append(f"{k}:")
        text.append(pct(u), style="dim" if u == 0 else "")
        text.append("  " if k + 1 < len(sl.slot_usage) else "")
    return text


def render(report: Report, console: Console, *, verbose: bool = False) -> None:
    """Print the report: the verdict panel, the headline figures, the site table, the other findings.

    ``verbose`` adds what a first reading does not need: the dead and dormant channel ids per site, each
    slot's usage, every command (not just the first few of a rule) and every finding's whole text."""
    seen: set[str] = set()
    console.print(summary_panel(report, seen=seen, verbose=verbose))
    for w in report.warnings:
        console.print(Text.assemble(("warning: ", "yellow"), w))
    console.print(_facts_grid(report))
    console.print(site_table(report, console=console))
    legend = axis_legend(report)
    if legend is not None:
        console.print(Text(legend, style="yellow"))
    if verbose:
        for part in (channel_lines(report), slot_usage_text(report)):
            if part is not None:
                console.print(part)
    more = more_findings(report, seen=seen, verbose=verbose)
    if more is not None:
        console.print(more)
    if verbose:
        full = full_findings(report)
        if full is not None:
            console.print(full)
    elif report.findings or report.summary.dead or report.summary.dormant:
        console.print(Text("--verbose: the dead and dormant channel ids and the full text of every finding", style="dim"))


def site_line(s: SiteHealth) -> str:
    return f"{s.name}: sparsity {pct(s.sparsity)}, flat {pct(s.flat_fraction)}, dead {len(s.dead_channels)}/{s.channels}"


__all__ = ["render", "site_line", "site_table", "summary_panel"]
