"""The diff of two Reports (pure: ``diff_reports``) and its renderings (rich terminal and Markdown).

Sites are matched by name, and a site that an activation swap renamed (``mlp.0>relu#1`` in A,
``mlp.0>leaky_relu#1`` in B: the same module, producer and call, under the new kind's name) with itself,
as the patch table pairs them. A channel is **newly dead** when it is dead in B and was not in A, **revived**
when the reverse; where a site's channel count changed between the reports, its channel indices do not
correspond, so every dead channel of B counts as new and none as revived (and the row says so).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from deadneuron.patch.verify import renamed_sites, site_positions
from deadneuron.render.markdown import ids_text, pct, source_of
from deadneuron.report import Report, SiteHealth

Presence = Literal["both", "only_a", "only_b"]
Pair = tuple[float | None, float | None]

SLOT_FIELDS: tuple[tuple[str, str, Kind], ...] = (
    ("mean_active", "active slots per image", "value"),
    ("mean_argmax_active", "argmax-only slots per image", "value"),
    ("mean_mass_active", "mass>=5% slots per image", "value"),
    ("largest_slot_share", "largest slot share", "share"),
    ("mask_entropy", "mask entropy", "value"),
)
Kind = Literal["share", "count", "value"]  # shown as 45.7% / 3 / 1.60


@dataclass(frozen=True)
class SiteDiff:
    """One site in A and/or B (``name_b``: its name in B, another where a swap renamed it)."""

    name: str
    presence: Presence
    channels: Pair
    sparsity: Pair
    flat_fraction: Pair
    dead: Pair
    dormant: Pair
    new_dead: tuple[int, ...]
    revived: tuple[int, ...]
    reshaped: bool  # channel count differs: indices do not correspond
    name_b: str = ""

    def __post_init__(self) -> None:
        if not self.name_b:
            object.__setattr__(self, "name_b", self.name)

    @property
    def label(self) -> str:
        """The name, and B's where a swap renamed the site."""
        return self.name if self.name_b == self.name else f"{self.name} (B: {self.name_b})"


@dataclass(frozen=True)
class ReportDiff:
    """Everything that changed from report A to report B."""

    a: str
    b: str
    overall: Mapping[str, Pair]  # sparsity, flat_fraction, dead, dormant, channels
    sites: tuple[SiteDiff, ...]
    slots: Mapping[str, Pair]
    metrics: Mapping[str, Pair]

    @property
    def new_dead(self) -> int:
        return sum(len(s.new_dead) for s in self.sites)

    @property
    def revived(self) -> int:
        return sum(len(s.revived) for s in self.sites)

    @property
    def note(self) -> str | None:
        """What a reader must know before reading the counts: that no site is in both reports."""
        if not self.sites or any(s.presence == "both" for s in self.sites):
            return None
        return ("A and B have no activation site in common (reports of different models?): no channel is "
                "compared, so 0 newly dead and 0 revived say nothing")  # fmt: skip


def _pair(a: SiteHealth | None, b: SiteHealth | None, value: str) -> Pair:
    def get(s: SiteHealth | None) -> float | None:
        if s is None:
            return None
        v = getattr(s, value)
        return float(len(v)) if isinstance(v, tuple) else float(v)

    return get(a), get(b)


def _site_diff(name: str, a: SiteHealth | None, b: SiteHealth | None, name_b: str = "") -> SiteDiff:
    presence: Presence = "both" if a and b else ("only_a" if a else "only_b")
    reshaped = bool(a and b and a.channels != b.channels)
    dead_a = set(a.dead_channels) if a and not reshaped else set()
    dead_b = set(b.dead_channels) if b else set()
    return SiteDiff(
        name=name, presence=presence, channels=_pair(a, b, "channels"), sparsity=_pair(a, b, "sparsity"),
        flat_fraction=_pair(a, b, "flat_fraction"), dead=_pair(a, b, "dead_channels"),
        dormant=_pair(a, b, "dormant_channels"),
        new_dead=tuple(sorted(dead_b - dead_a)) if b and a else (),
        revived=tuple(sorted(dead_a - dead_b)) if a and b else (),
        reshaped=reshaped, name_b=name_b,
    )  # fmt: skip


def diff_reports(a: Report, b: Report) -> ReportDiff:
    """Site-by-site and overall differences from ``a`` to ``b``."""
    renamed = {old: new for new, old in renamed_sites([site_positions(a)], site_positions(b)).items()}
    names = list(dict.fromkeys([*a.sites, *(n for n in b.sites if n not in renamed.values())]))
    sa, sb = a.summary, b.summary
    overall = {k: (float(getattr(sa, k)), float(getattr(sb, k))) for k in ("sparsity", "flat_fraction", "dead", "dormant", "channels")}
    slots: dict[str, Pair] = {}
    if a.slots is not None or b.slots is not None:
        for key, _, _ in SLOT_FIELDS:
            slots[key] = tuple(float(getattr(r.slots, key)) if r.slots is not None else None for r in (a, b))  # type: ignore[assignment]
    metrics = {k: (a.metrics.get(k), b.metrics.get(k)) for k in dict.fromkeys([*a.metrics, *b.metrics])}
    return ReportDiff(
        a=source_of(a), b=source_of(b), overall=overall,
        sites=tuple(_site_diff(n, a.sites.get(n), b.sites.get(renamed.get(n, n)), renamed.get(n, n)) for n in names),
        slots=slots, metrics=metrics,
    )  # fmt: skip


# -- formatting --------------------------------------------------------------------------------------
def _num(x: float | None, kind: Kind) -> str:
    if x is None or x != x:
        return "-"
    return {"share": pct(x), "count": f"{x:.0f}", "value": f"{x:.2f}"}[kind]


def change(p: Pair, *, kind: Kind, delta: bool = True) -> str:
    """``"45.7% -> 0.0% (-45.7 pp)"``, ``"3 -> 1 (-2)"``, ``"1.60 -> 3.40 (+1.80)"``; ``-`` for a missing side."""
    a, b = p
    text = f"{_num(a, kind)} -> {_num(b, kind)}"
    if not delta or a is None or b is None or a != a or b != b or a == b:
        return text
    d = b - a
    step = {"share": f"{100 * d:+.1f} pp", "count": f"{d:+.0f}", "value": f"{d:+.2f}"}[kind]
    return f"{text} ({step})"


def _channel_note(s: SiteDiff, *, ids: bool = True) -> str:
    """What happened to the site's dead channels; with ``ids``, which ones."""
    if s.presence != "both":
        return "only in A" if s.presence == "only_a" else "only in B"
    parts = []
    if s.new_dead:
        parts.append(f"new dead {ids_text(s.new_dead, 12)}" if ids else f"{len(s.new_dead)} new")
    if s.revived:
        parts.append(f"revived {ids_text(s.revived, 12)}" if ids else f"{len(s.revived)} revived")
    if s.reshaped:
        parts.append("channel count changed")
    return "; ".join(parts) if ids else ", ".join(parts)


def _headline_rows(diff: ReportDiff) -> list[tuple[str, str]]:
    o = diff.overall
    rows = [
        ("sparsity", change(o["sparsity"], kind="share")),
        ("flat", change(o["flat_fraction"], kind="share")),
        ("dead channels", change(o["dead"], kind="count") + f"; {diff.new_dead} newly dead, {diff.revived} revived"),
        ("dormant", change(o["dormant"], kind="count")),
    ]
    rows += [(label, change(diff.slots[k], kind=kind)) for k, label, kind in SLOT_FIELDS if k in diff.slots]
    rows += [(k, change(p, kind="share" if "accuracy" in k else "value")) for k, p in diff.metrics.items()]
    return rows


# -- terminal ----------------------------------------------------------------------------------------
def _site_style(s: SiteDiff) -> str:
    if s.new_dead:
        return "bold red"
    return "green" if s.revived else ""


def _arrow(p: Pair, scale: float) -> str:
    """Compact ``"64.8 → 49.4"`` (percent columns) or ``"28 → 0"`` (counts) for the narrow site table."""
    digits = 1 if scale == 100 else 0
    return " → ".join("-" if v is None or v != v else f"{scale * v:.{digits}f}" for v in p)


def _site_table(diff: ReportDiff, *, fold_names: bool) -> Table:
    """Site by site; the notes wrap before a site name is broken (``fold_names``: names may fold too)."""
    table = Table(title="Sites (A -> B)", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, collapse_padding=True)  # fmt: skip
    table.add_column("site", overflow="fold", min_width=20, no_wrap=not fold_names)
    for name in ("sparsity %", "flat %", "dead"):
        table.add_column(name, no_wrap=True)
    table.add_column("dead channels")
    for s in diff.sites:
        table.add_row(
            Text(s.label, style=_site_style(s)), _arrow(s.sparsity, 100), _arrow(s.flat_fraction, 100),
            _arrow(s.dead, 1), Text(_channel_note(s, ids=False), style=_site_style(s)),
        )  # fmt: skip
    return table


def render_diff(diff: ReportDiff, console: Console) -> None:
    """Print the diff: headline figures, then the site table."""
    head = Table.grid(padding=(0, 1))
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")
    for label, text in _headline_rows(diff):
        head.add_row(label, text)
    items: list[RenderableType] = [Text.assemble(("A ", "bold"), diff.a), Text.assemble(("B ", "bold"), diff.b), head]
    if diff.note is not None:
        items.append(Text.assemble(("note: ", "yellow"), diff.note))
    console.print(Group(*items))
    table = _site_table(diff, fold_names=False)  # a site name whole where the table fits the width so
    if console.measure(table).minimum > console.width:
        table = _site_table(diff, fold_names=True)
    console.print(table)
    listed = Table.grid(padding=(0, 1))
    listed.add_column(no_wrap=True)
    listed.add_column(overflow="fold")
    for s in diff.sites:
        if s.new_dead:
            listed.add_row(Text("new dead", style="bold red"), f"{s.label}: channels {ids_text(s.new_dead)}")
        if s.revived:
            listed.add_row(Text("revived", style="green"), f"{s.label}: channels {ids_text(s.revived)}")
    if listed.row_count:
        console.print(listed)


# -- Markdown ----------------------------------------------------------------------------------------
def _md(text: object) -> str:
    return str(text).replace("|", "\\|")


def render_diff_markdown(diff: ReportDiff) -> str:
    lines = ["# deadneuron compare", "", f"- A: `{diff.a}`", f"- B: `{diff.b}`", "", "| | A -> B |", "|---|---|"]
    lines += [f"| {label} | {_md(text)} |" for label, text in _headline_rows(diff)]
    lines += ["", f"Note: {diff.note}"] if diff.note is not None else []
    lines += ["", "## Sites", "", "| site | sparsity | flat | dead | dead channels |", "|---|---|---|---|---|"]
    for s in diff.sites:
        cells = (change(s.sparsity, kind="share"), change(s.flat_fraction, kind="share"), change(s.dead, kind="count"))
        name = f"`{_md(s.name)}`" + (f" (B: `{_md(s.name_b)}`)" if s.name_b != s.name else "")
        lines.append(f"| {name} | " + " | ".join(_md(c) for c in cells) + f" | {_md(_channel_note(s))} |")
    return "\n".join(lines) + "\n"


__all__ = ["ReportDiff", "SiteDiff", "change", "diff_reports", "render_diff", "render_diff_markdown"]
