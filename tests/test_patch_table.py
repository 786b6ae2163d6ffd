"""The patch verdict table fits 80 columns: each group (all sites, slots, task, each site) on a line of its
own, its rows under it with the columns aligned, long site names wrapped on their own line."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from deadneuron.patch import compare, sample_from
from deadneuron.patch.verify import Verification
from deadneuron.render.patch_table import verification_table
from deadneuron.report import Report

GOLDEN = Path(__file__).parent / "golden"
LONG = "decoder.broadcast.upsampling_block_with_a_long_name.3>activation_function"


def _long_named(report: Report) -> Report:
    """The golden report with its last site renamed to a name longer than the table is wide."""
    sites = list(report.sites.values())
    sites[-1] = replace(sites[-1], name=LONG)
    return Report.build(sites, slots=report.slots, metrics=report.metrics, meta=report.meta)


def _verification(seeds: int) -> Verification:
    """Report A (ReLU, 3 dead encoder channels at one site) against report B (a LeakyReLU site, others gone),
    over ``seeds`` runs each with slightly different losses."""
    a = _long_named(Report.from_json((GOLDEN / "report_a.json").read_text()))
    b = _long_named(Report.from_json((GOLDEN / "report_b.json").read_text()))
    base = [sample_from(a, loss=1.45 - 0.1 * i) for i in range(seeds)]
    patched = [sample_from(b, loss=1.1 + 0.05 * i) for i in range(seeds)]
    return compare(base, patched, seeds=tuple(range(seeds)), budget={"steps": 602, "init": "scratch", "seconds": 1398},
                   reference=sample_from(a, loss=1.456))  # fmt: skip


def _text(v: Verification, width: int) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(verification_table(v))
    return buf.getvalue()


@pytest.mark.parametrize("seeds", [1, 3])
def test_fits_80_columns_with_one_line_per_group(seeds: int) -> None:
    v = _verification(seeds)
    text = _text(v, 80)
    lines = [line.rstrip() for line in text.splitlines()]
    assert max(len(line) for line in lines) <= 80
    groups = list(dict.fromkeys(r.group for r in v.rows))
    titles = {"overall": "all sites", "slots": "slots", "task": "task"}
    assert [line for line in lines if line and not line.startswith(" ") and line in
            {titles.get(g, g) for g in groups}] == [titles.get(g, g) for g in groups]  # fmt: skip
    assert LONG in lines  # the long site name whole, on its own line
    site_rows = [line for line in lines if line.startswith("  ") and line.strip().split()[0] in ("dead", "dormant",
                                                                                                "sparsity", "flat")]  # fmt: skip
    per_site = sum(1 for r in v.rows if r.group not in titles)
    assert len(site_rows) == per_site + 4  # per-site labels never wrap: one line each (+ the overall rows)
    assert sum("lower by definition" in line for line in lines if line.startswith("  ")) == sum(r.verdict.value == "lower by definition"
                                                                       for r in v.rows)  # fmt: skip


def test_rows_keep_their_numbers_and_columns_align() -> None:
    v = _verification(3)
    lines = _text(v, 80).splitlines()
    header = next(i for i, line in enumerate(lines) if "metric" in line and "verdict" in line)
    verdict_col = lines[header].index("verdict")
    dead = next(line for line in lines if line.startswith("  dead channels"))
    overall = next(r for r in v.rows if r.group == "overall" and r.spec.key == "dead")
    assert dead[verdict_col:].startswith(overall.verdict.value)
    # the mean and its spread (written without spaces where the console is too narrow for them)
    assert f"{overall.baseline[0]:.1f}±0.0" in dead or f"{overall.baseline[0]:.1f} ± 0.0" in dead
    assert len(dead.rstrip()) <= 80


def test_wide_console_keeps_spaced_spreads_on_one_line() -> None:
    text = _text(_verification(3), 140)
    assert "5.0 ± 0.0" in text and "baseline (3 seeds)" in text
    assert "mask entropy (1=uniform)" in text
