"""Did the fix help? Baseline and patched arms compared metric by metric, with a verdict per metric.

Pure: Reports (and final training losses) in, a :class:`Verification` value out; renderers are in
:mod:`deadneuron.render.patch_table`.

**The verdict rule.** For each metric, d = mean(patched) - mean(baseline) over the seeds, and the
threshold is ``max(tolerance, spread)``, where ``spread`` is the larger of the two arms' sample standard
deviations (0 with a single seed) and ``tolerance`` is the metric's smallest meaningful change:
1 channel for dead/dormant counts, 1 percentage point for shares (sparsity, flat fraction, accuracy,
largest-slot share) and 0.01 for the mask entropy (0..1), 0.1 for active slots per image, 2% of the baseline for the loss,
1% of the baseline for a metric of the user's own (``--metric``).
``|d| <= threshold`` is "no change" (within the spread / the tolerance); otherwise the metric is
"improved" or "worse" according to its direction (fewer dead channels, higher accuracy...). Metrics with
no better direction (sparsity, mask entropy) get "higher" or "lower". Sparsity where the baseline
activation outputs exact zeros (ReLU) and the patched one cannot (LeakyReLU, GELU, ...) is "lower by
definition": compare the flat fraction. This is a screening rule, not a significance test: with one
seed a verdict is an anecdote, and three seeds are the least for a claim. Diverged runs are not averaged
away: a NaN/Inf loss or metric in one arm's runs only makes that arm "worse" there, and so do NaN/Inf
activations (a row of their own, shown only where a run had them).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

Direction = Literal["lower", "higher", "neutral"]
Unit = Literal["count", "share", "ratio", "slots", "loss", "value"]
RELATIVE_UNITS = frozenset({"loss", "value"})  # tolerances relative to the baseline's mean
ZERO_KINDS = frozenset({"relu", "relu6"})  # activations whose flat region outputs exact zeros


class Verdict(StrEnum):
    IMPROVED = "improved"
    WORSE = "worse"
    NO_CHANGE = "no change"
    HIGHER = "higher"
    LOWER = "lower"
    BY_DEFINITION = "lower by definition"
    NOT_AVAILABLE = "n/a"
    REFERENCE = "reference"


@dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    direction: Direction
    unit: Unit


TOLERANCE: Mapping[Unit, float] = {"count": 1.0, "share": 0.01, "ratio": 0.01, "slots": 0.1, "loss": 0.02,
                                   "value": 0.01}  # loss, value: relative

SITE_METRICS = (
    MetricSpec("dead", "dead channels", "lower", "count"),
    MetricSpec("dormant", "dormant channels", "lower", "count"),
    MetricSpec("sparsity", "sparsity (zeros)", "neutral", "share"),
    MetricSpec("flat_fraction", "flat fraction", "lower", "share"),
)
# NaN/Inf activation elements (a diverged run: NaN is never flat, so it shows no dead channel); a row only
# where some run had them
NONFINITE = MetricSpec("nonfinite", "non-finite activations", "lower", "count")
SLOT_METRICS = (
    MetricSpec("mean_active", "active slots/image", "higher", "slots"),
    MetricSpec("largest_slot_share", "largest-slot share", "lower", "share"),
    MetricSpec("mask_entropy", "mask entropy (1=uniform)", "neutral", "ratio"),
)
TASK_METRICS = (
    MetricSpec("valid_pixel_accuracy", "valid-pixel accuracy", "higher", "share"),
    MetricSpec("baseline_valid_pixel_accuracy", "(most-common colour)", "neutral", "share"),
    MetricSpec("exact_grid_accuracy", "exact grids", "higher", "share"),
    MetricSpec("loss", "final train loss", "lower", "loss"),
)
REFERENCE_KEYS = frozenset({"baseline_valid_pixel_accuracy"})  # the same data for both arms: no verdict
METRIC_GROUP = "metric"  # rows of the user's own metric (``--metric``)


def metric_spec(name: str) -> MetricSpec:
    """A user metric: lower is better where its name says loss or error, else higher."""
    lowered = name.lower()
    direction: Direction = "lower" if "loss" in lowered or "error" in lowered else "higher"
    return MetricSpec(name, name, direction, "value")


@dataclass(frozen=True)
class Sample:
    """One trained and audited run: figures keyed by (group, metric key), and each site's activation kind."""

    values: Mapping[tuple[str, str], float]
    kinds: Mapping[str, str]
    # where each site sits in the model: (module, producer, functional, k-th such site); a swap that
    # renames a site (``mlp.0>relu#1`` -> ``mlp.0>leaky_relu#1``) leaves its position as it was
    positions: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    group: str  # "overall", "slots", "task", or a site name
    spec: MetricSpec
    baseline: tuple[float, ...]
    patched: tuple[float, ...]
    reference: float | None  # the input checkpoint, as it was trained
    verdict: Verdict
    note: str = ""

    @property
    def difference(self) -> float:
        return _mean(self.patched) - _mean(self.baseline)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "group": self.group, "metric": self.spec.key, "label": self.spec.label.strip(),
            "baseline": [_plain(v) for v in self.baseline], "patched": [_plain(v) for v in self.patched],
            "reference": _plain(self.reference), "verdict": self.verdict.value, "note": self.note,
        }  # fmt: skip
        if self.group == METRIC_GROUP:
            out.update(direction=self.spec.direction, unit=self.spec.unit)
        return out


@dataclass(frozen=True)
class Verification:
    seeds: tuple[int, ...]
    rows: tuple[Row, ...]
    budget: Mapping[str, Any]
    labels: tuple[str, str] = ("baseline", "patched")

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds), "budget": dict(self.budget), "labels": list(self.labels),
                "rule": RULE_TEXT, "rows": [r.to_dict() for r in self.rows]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verification:
        """The value ``to_dict`` wrote (for example into a patched checkpoint's ``patch`` entry)."""
        def spec(r: Mapping[str, Any]) -> MetricSpec:
            if r["group"] == METRIC_GROUP:
                return MetricSpec(r["metric"], r.get("label", r["metric"]), r.get("direction", "higher"), r.get("unit", "value"))
            family = {"slots": SLOT_METRICS, "task": TASK_METRICS}.get(r["group"], (*SITE_METRICS, NONFINITE))
            return next(s for s in family if s.key == r["metric"])

        rows = tuple(
            Row(r["group"], spec(r), _floats(r["baseline"]), _floats(r["patched"]),
                r["reference"], Verdict(r["verdict"]), r.get("note", ""))
            for r in data["rows"]
        )  # fmt: skip
        return cls(tuple(data["seeds"]), rows, dict(data["budget"]), tuple(data.get("labels", ("baseline", "patched"))))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.verdict.value] = out.get(r.verdict.value, 0) + 1
        return out


RULE_TEXT = (
    "verdict: d = mean(patched) - mean(baseline); a change counts when |d| > max(tolerance, larger per-arm "
    "sample std); tolerances: 1 channel, 1 point for shares, 0.1 slots, 2% of the loss, 1% of a --metric; an arm "
    "whose runs alone diverged (NaN/Inf) is worse; 1 seed is not a claim"
)


def sample_from(report: Any, *, loss: float | None = None, metrics: Mapping[str, float] | None = None) -> Sample:
    """The figures of one audited run (a :class:`deadneuron.Report`), its final training loss and the
    user's own ``metrics`` (``--metric``)."""
    values: dict[tuple[str, str], float] = {}
    summary = report.summary
    values.update({("overall", "dead"): summary.dead, ("overall", "dormant"): summary.dormant,
                   ("overall", "sparsity"): summary.sparsity, ("overall", "flat_fraction"): summary.flat_fraction,
                   ("overall", "nonfinite"): summary.nonfinite})  # fmt: skip
    for name, s in report.sites.items():
        values.update({(name, "dead"): len(s.dead_channels), (name, "dormant"): len(s.dormant_channels),
                       (name, "sparsity"): s.sparsity, (name, "flat_fraction"): s.flat_fraction,
                       (name, "nonfinite"): s.nonfinite})  # fmt: skip
    if report.slots is not None:
        for spec in SLOT_METRICS:
            values[("slots", spec.key)] = float(getattr(report.slots, spec.key))
    for spec in TASK_METRICS:
        if spec.key in report.metrics:
            values[("task", spec.key)] = float(report.metrics[spec.key])
    if loss is not None:
        values[("task", "loss")] = float(loss)
    for key, value in (metrics or {}).items():
        values[(METRIC_GROUP, key)] = float(value)
    kinds = {name: s.kind for name, s in report.sites.items()}
    return Sample(values, kinds, site_positions(report))


def site_positions(report: Any) -> dict[str, tuple[Any, ...]]:
    """Where each site of a report sits in the model: (module, producer, functional, k-th such site)."""
    seen: dict[tuple[Any, ...], int] = {}
    positions: dict[str, tuple[Any, ...]] = {}
    for name, s in report.sites.items():
        where = (s.module, s.producer, s.functional)
        seen[where] = seen.get(where, 0) + 1
        positions[name] = (*where, seen[where] - 1)
    return positions


def renamed_sites(baseline: Sequence[Mapping[str, tuple[Any, ...]]], patched: Mapping[str, tuple[Any, ...]]) -> dict[str, str]:
    """Patched site name -> baseline site name, for the sites a swap renamed: a patched site no baseline
    run has, at the position (module, producer, k-th call) of a baseline site the patched run lacks, is
    the same site under its new activation's name."""
    names = {n for positions in baseline for n in positions}
    at = {p: n for positions in baseline for n, p in positions.items()}
    return {n: at[p] for n, p in patched.items() if n not in names and p in at and at[p] not in patched}


def verdict(baseline: Sequence[float], patched: Sequence[float], spec: MetricSpec) -> Verdict:
    """The rule in the module docstring, for one metric."""
    b = [v for v in baseline if math.isfinite(v)]
    p = [v for v in patched if math.isfinite(v)]
    if not b or not p:
        return Verdict.NOT_AVAILABLE
    d = _mean(p) - _mean(b)
    tolerance = TOLERANCE[spec.unit] * (abs(_mean(b)) if spec.unit in RELATIVE_UNITS else 1.0)
    if abs(d) <= max(tolerance, spread(b), spread(p)):
        return Verdict.NO_CHANGE
    if spec.direction == "neutral":
        return Verdict.HIGHER if d > 0 else Verdict.LOWER
    return Verdict.IMPROVED if (d < 0) == (spec.direction == "lower") else Verdict.WORSE


def spread(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) >= 2 else 0.0


def compare(
    baseline: Sequence[Sample],
    patched: Sequence[Sample],
    *,
    seeds: Sequence[int],
    budget: Mapping[str, Any],
    reference: Sample | None = None,
    labels: tuple[str, str] = ("baseline", "patched"),
) -> Verification:
    """Rows for the overall, slot, task and user-metric figures, then per site, each with its verdict."""
    if not baseline or len(baseline) != len(patched):
        raise ValueError("compare needs the same number (>= 1) of baseline and patched runs")
    patched = paired_sites(baseline, patched)
    user = tuple(metric_spec(k) for k in dict.fromkeys(k for s in (*baseline, *patched) for g, k in s.values if g == METRIC_GROUP))
    site_specs = (*SITE_METRICS, NONFINITE)
    groups: list[tuple[str, tuple[MetricSpec, ...]]] = [
        ("overall", site_specs), ("slots", SLOT_METRICS), ("task", TASK_METRICS), (METRIC_GROUP, user)]  # fmt: skip
    sites = list(dict.fromkeys(n for s in (*baseline, *patched) for n in s.kinds))
    groups += [(name, site_specs) for name in sites]
    rows: list[Row] = []
    for group, specs in groups:
        for spec in specs:
            key = (group, spec.key)
            if not any(key in s.values for s in (*baseline, *patched)):
                continue
            if spec is NONFINITE and not any(s.values.get(key) for s in (*baseline, *patched)):
                continue  # no run had a NaN/Inf activation here
            rows.append(_row(group, spec, baseline, patched, reference))
    return Verification(tuple(seeds), tuple(rows), dict(budget), labels)


def paired_sites(baseline: Sequence[Sample], patched: Sequence[Sample]) -> list[Sample]:
    """``patched`` with each site that a swap renamed under its baseline name (`renamed_sites`); its kind
    says which activation it now has."""
    out = []
    for sample in patched:
        rename = renamed_sites([s.positions for s in baseline], sample.positions)
        if not rename:
            out.append(sample)
            continue
        values = {(rename.get(g, g), k): v for (g, k), v in sample.values.items()}
        kinds = {rename.get(n, n): kind for n, kind in sample.kinds.items()}
        positions = {rename.get(n, n): p for n, p in sample.positions.items()}
        out.append(Sample(values, kinds, positions))
    return out


def _row(group: str, spec: MetricSpec, baseline: Sequence[Sample], patched: Sequence[Sample],
         reference: Sample | None) -> Row:  # fmt: skip
    key = (group, spec.key)
    b = tuple(float(s.values.get(key, math.nan)) for s in baseline)
    p = tuple(float(s.values.get(key, math.nan)) for s in patched)
    ref = reference.values.get(key) if reference is not None else None
    if spec.key in REFERENCE_KEYS:
        return Row(group, spec, b, p, ref, Verdict.REFERENCE, "painting each grid its most common colour, on the same grids")
    diverged = _nonfinite_row(group, spec, baseline, patched, b, p)
    if diverged is not None:
        return Row(group, spec, b, p, None if ref is None else float(ref), *diverged)
    result = verdict(b, p, spec)
    note = ""
    if spec.key == "sparsity" and result is Verdict.LOWER:
        switched, total, kinds = _switched_sites(baseline, patched, group)
        if switched and switched == total:
            result, note = Verdict.BY_DEFINITION, f"{kinds} has no exact zeros; see flat"
        elif switched:
            note = f"partly by definition: {switched} of {total} sites now {kinds}, which has no exact zeros; see flat"
    return Row(group, spec, b, p, None if ref is None else float(ref), result, note)


def _nonfinite_row(group: str, spec: MetricSpec, baseline: Sequence[Sample], patched: Sequence[Sample],
                   b: Sequence[float], p: Sequence[float]) -> tuple[Verdict, str] | None:  # fmt: skip
    """The verdict where runs measured a NaN/Inf value (a diverged run: its loss, its metric) or had NaN/Inf
    activations in one arm only, None where none did. A missing value (a site absent from a run) is not one: `verdict` leaves those out. The
    finite runs' mean never speaks for an arm with diverged runs: the arm with them is worse (with
    runs of both arms diverged, there is nothing to compare)."""
    key = (group, spec.key)
    if spec is NONFINITE:  # any NaN/Inf activation is a failed run, not noise about a mean
        bad_b, bad_p = sum(v > 0 for v in b), sum(v > 0 for v in p)
        if bool(bad_b) == bool(bad_p):
            return None
        runs = f"{bad_b} of {len(b)} baseline and {bad_p} of {len(p)} patched runs had NaN/Inf activations"
        return (Verdict.WORSE if bad_p else Verdict.IMPROVED), runs
    bad_b = sum(key in s.values and not math.isfinite(v) for s, v in zip(baseline, b, strict=True))
    bad_p = sum(key in s.values and not math.isfinite(v) for s, v in zip(patched, p, strict=True))
    if not bad_b and not bad_p:
        return None
    note = f"non-finite (NaN/Inf) in {bad_b} of {len(b)} baseline and {bad_p} of {len(p)} patched runs"
    if (bad_b and bad_p) or spec.direction == "neutral":
        return Verdict.NOT_AVAILABLE, note
    return (Verdict.WORSE if bad_p else Verdict.IMPROVED), note


def _switched_sites(baseline: Sequence[Sample], patched: Sequence[Sample], group: str) -> tuple[int, int, str]:
    """(sites that went from an activation with exact zeros to one without, sites, their new kinds), over
    ``group`` (a site name, or every site for "overall")."""
    names = {n for s in baseline for n in s.kinds} if group == "overall" else {group}
    switched, new = 0, set()
    for name in names:
        before = {s.kinds[name] for s in baseline if name in s.kinds}
        after = {s.kinds[name] for s in patched if name in s.kinds}
        if before and after and before <= ZERO_KINDS and not after & ZERO_KINDS:
            switched += 1
            new |= after
    return switched, len(names), "/".join(sorted(new))


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _floats(values: Sequence[float | None]) -> tuple[float, ...]:
    return tuple(math.nan if v is None else float(v) for v in values)


def _plain(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


__all__ = [
    "METRIC_GROUP",
    "RULE_TEXT",
    "MetricSpec",
    "Row",
    "Sample",
    "Verdict",
    "Verification",
    "compare",
    "metric_spec",
    "sample_from",
    "spread",
    "verdict",
]
