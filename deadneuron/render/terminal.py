"""Rich terminal rendering of a Report: a summary panel above the site table, then slots and findings.

Colours mark severity (red: dead channels or errors, yellow: dormant channels or warnings, dim: zero
counts). Rich drops colour under ``NO_COLOR`` and all escape codes when piped; everything here also
reads in plain text (counts and words, never colour alone) and fits 80 columns by folding long names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from deadneuron.render.markdown import (
    SEVERITY_ORDER,
    accuracy_text,
    axis_legend,
    channels_cell,
    finding_lines,
    ids_text,
    mask_text,
    pct,
    slots_text,
    source_of,
    top_findings,
)
from deadneuron.report import Report, SiteHealth

SEVERITY_STYLE = {"error": "bold red", "critical": "bold red", "warning": "yellow", "info": "cyan"}


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
    where = f" in {len(sm.dead_sites)} of {sm.sites} sites" if sm.dead else f" (of {sm.sites} sites)"
    rows = [
        ("sparsity", Text.assemble(pct(sm.sparsity), ("  exact zeros over all activation elements", "dim"))),
        ("flat", Text.assemble(pct(sm.flat_fraction), ("  pre-activations in the flat region", "dim"))),
        ("dead", Text.assemble((str(sm.dead), "bold red" if sm.dead else "green"), f" of {sm.channels} channels{where}")),
        ("dormant", Text.assemble((str(sm.dormant), "yellow" if sm.dormant else ""), ("  flat >= 99% of the time", "dim"))),
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
    meta = report.meta
    data = (f"{meta.get('samples', '?')} samples in {meta.get('batches', '?')} batches; eps={meta.get('eps')}, "
            f"delta={meta.get('delta')}")  # fmt: skip
    rows.append(("data", Text(data, style="dim")))
    return rows


def _slot_style(report: Report) -> str:
    sl = report.slots
    return "yellow" if sl is not None and sl.num_slots > 1 and sl.mean_active < 2 else ""


def _accuracy_style(metrics: Mapping[str, float]) -> str:
    base = metrics.get("baseline_valid_pixel_accuracy")
    return "" if base is None or metrics["valid_pixel_accuracy"] > base else "bold red"


def _finding_text(f: Mapping[str, Any], *, with_sites: bool = False) -> Text:
    severity, title, _, _ = finding_lines(f)
    text = Text.assemble((f"[{severity}] ", SEVERITY_STYLE.get(severity, "")), title)
    sites = [str(s) for s in f.get("sites") or ()] if with_sites else []
    if sites:
        text.append(" (" + ", ".join(sites[:3]) + (f" and {len(sites) - 3} more" if len(sites) > 3 else "") + ")", "dim")
    return text


def summary_panel(report: Report) -> Panel:
    """Headline figures and the most severe findings."""
    items: list[RenderableType] = [_facts_grid(report)]
    top = top_findings(report)
    if top:
        more = len(report.findings) - len(top)
        items.append(Text("top findings" + (f" ({more} more below)" if more else ""), style="bold"))
        items += [Padding(_finding_text(f, with_sites=True), (0, 0, 0, 2)) for f in top]
    return Panel(Group(*items), title=f"deadneuron audit: {source_of(report)}", title_align="left")


def _count_cell(k: int, style: str) -> Text:
    return Text(str(k), style=style if k else "dim")


def _site_style(s: SiteHealth) -> str:
    if s.dead_channels or s.nonfinite:
        return "bold red"
    return "yellow" if s.dormant_channels else ""


def site_table(report: Report) -> Table:
    """One row per site; the nonfinite column only when some site has NaN/Inf."""
    with_nonfinite = any(s.nonfinite for s in report.sites.values())
    table = Table(title="Activation sites", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("site", overflow="fold", min_width=20)
    table.add_column("kind", overflow="fold", max_width=16)
    for name in ("ch", "sparsity", "flat", "dead", "dormant", *(("nonfinite",) if with_nonfinite else ())):
        table.add_column(name, justify="right", no_wrap=True)
    for s in report.sites.values():
        row: list[RenderableType] = [
            Text(s.name, style=_site_style(s)), s.label, channels_cell(s), pct(s.sparsity), pct(s.flat_fraction),
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


def findings_block(findings: tuple[Mapping[str, Any], ...]) -> Group | None:
    if not findings:
        return None
    items: list[RenderableType] = [Text("Findings", style="bold underline")]
    for f in sorted(findings, key=lambda f: SEVERITY_ORDER.get(str(f.get("severity", "info")), 3)):
        _, _, message, commands = finding_lines(f)
        items.append(_finding_text(f))
        if message:
            items.append(Padding(Text(message), (0, 0, 0, 2)))
        items += [Padding(Text("try: " + c, style="green"), (0, 0, 0, 2)) for c in commands]
    return Group(*items)


def render(report: Report, console: Console) -> None:
    """Print the whole report."""
    console.print(summary_panel(report))
    for w in report.warnings:
        console.print(Text.assemble(("warning: ", "yellow"), w))
    console.print(site_table(report))
    legend = axis_legend(report)
    if legend is not None:
        console.print(Text(legend, style="yellow"))
    channels = channel_lines(report)
    if channels is not None:
        console.print(channels)
    usage = slot_usage_text(report)
    if usage is not None:
        console.print(usage)
    block = findings_block(report.findings)
    if block is not None:
        console.print(block)


def site_line(s: SiteHealth) -> str:
    return f"{s.name}: sparsity {pct(s.sparsity)}, flat {pct(s.flat_fraction)}, dead {len(s.dead_channels)}/{s.channels}"


__all__ = ["render", "site_line", "site_table", "summary_panel"]
