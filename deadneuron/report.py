"""The Report: one immutable, schema-versioned value built once from an audit.

Definitions (DESIGN section 3): per channel, ``sparsity`` is zero/n, a channel is **dead** when its
pre-activation never left the flat region (flat == n) and **dormant** when it was flat at least 99% of
the time but not always (so dead and dormant are disjoint). Site and summary figures are element-
weighted over all channels: the summary's ``sparsity`` is the seed's "Activation Sparsity" figure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from deadneuron.probe import SiteResult
    from deadneuron.rules.finding import Finding

SCHEMA = "deadneuron.report"
SCHEMA_VERSION = 2
DORMANT_FRACTION = 0.99
# Says, in a warning, that a part of the model runs where no hook reaches (a recurrent layer's gates): the
# warning bounds what the figures cover, the figures themselves are intact (`rules.training`'s caveats skip it).
UNREACHED = "where no hook or probe runs"


def flat_channels(flat: np.ndarray, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The dead and the dormant channels (ids) of a site from its per-channel flat counts (a float64 numpy
    array of integers) over ``n`` elements per channel: flat == n, and flat < n with flat / n >= 99%."""
    import numpy as np

    if not n:
        return (), ()
    dead = np.flatnonzero(flat == n).tolist()
    dormant = np.flatnonzero((flat < n) & (flat / n >= DORMANT_FRACTION)).tolist()
    return tuple(dead), tuple(dormant)


def _clean(x: float) -> float | None:
    """JSON has no NaN/Inf: store them as None."""
    return x if math.isfinite(x) else None


def _restore(x: float | None) -> float:
    return float("nan") if x is None else float(x)


@dataclass(frozen=True)
class SiteHealth:
    """Health of one activation call site."""

    name: str
    module: str
    producer: str | None
    functional: bool
    kind: str
    label: str
    channel_axis: int
    axis_source: str  # how the channel axis was decided: producer, traced, rank, guessed or user
    flat_region: str
    shape: tuple[int, ...]
    calls: int
    channels: int
    n: int  # elements seen per channel (valid positions only, where a mask applied)
    masked: bool  # a padding mask applied at this site
    excluded: int  # elements per channel the mask excluded
    sparsity: float
    flat_fraction: float
    dead_channels: tuple[int, ...]
    dormant_channels: tuple[int, ...]
    nonfinite: int
    mean: float
    std: float
    min: float
    max: float
    # per channel
    channel_zero: tuple[float, ...]  # zero fraction
    channel_flat: tuple[float, ...]  # flat fraction (1 - firing rate)
    channel_nonfinite: tuple[int, ...]
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    channel_min: tuple[float, ...]
    channel_max: tuple[float, ...]
    # counts of finite activation values over deadneuron.stats.HISTOGRAM_EDGES, when requested
    histogram: tuple[int, ...] | None = None

    @property
    def dead_fraction(self) -> float:
        return len(self.dead_channels) / self.channels if self.channels else 0.0

    @property
    def firing_rate(self) -> tuple[float, ...]:
        return tuple(1.0 - f for f in self.channel_flat)

    @classmethod
    def from_result(cls, r: SiteResult) -> SiteHealth:
        import numpy as np

        s = r.summary
        c = len(s.zero)
        n = s.n
        total = n * c
        arr = s.arrays if s.arrays is not None else {
            k: np.asarray(getattr(s, k), dtype=np.float64)
            for k in ("zero", "flat", "nonfinite", "mean", "std", "min", "max")
        }
        zero, flat = arr["zero"], arr["flat"]
        finite = n - arr["nonfinite"]
        seen = finite > 0
        fin_total = float(finite.sum())
        ch_mean, ch_std = arr["mean"], arr["std"]
        if fin_total:  # the channels' moments pooled about the site's mean (no E[a^2] - E[a]^2 cancellation)
            weight = finite[seen] / fin_total
            mean = float((ch_mean[seen] * weight).sum())
            std = math.sqrt(float(((ch_std[seen] ** 2 + (ch_mean[seen] - mean) ** 2) * weight).sum()))
        else:
            mean = std = math.nan
        ch_min, ch_max = arr["min"], arr["max"]
        finite_min, finite_max = ch_min[np.isfinite(ch_min)], ch_max[np.isfinite(ch_max)]
        rate = flat / n if n else np.zeros(c)
        dead, dormant = flat_channels(flat, n)
        return cls(
            name=r.name, module=r.module, producer=r.producer, functional=r.functional, kind=r.kind,
            label=r.label, channel_axis=r.channel_axis, axis_source=r.axis_source, flat_region=r.flat_region,
            shape=r.example_shape, calls=r.calls, channels=c, n=n, masked=r.masked, excluded=r.excluded,
            sparsity=float(zero.sum()) / total if total else 0.0,
            flat_fraction=float(flat.sum()) / total if total else 0.0,
            dead_channels=dead, dormant_channels=dormant,
            nonfinite=sum(s.nonfinite),
            mean=mean, std=std,
            min=float(finite_min.min()) if finite_min.size else math.nan,
            max=float(finite_max.max()) if finite_max.size else math.nan,
            channel_zero=tuple((zero / n).tolist()) if n else (0.0,) * c,
            channel_flat=tuple(rate.tolist()),
            channel_nonfinite=tuple(s.nonfinite),
            channel_mean=tuple(s.mean), channel_std=tuple(s.std),
            channel_min=tuple(s.min), channel_max=tuple(s.max),
            histogram=r.histogram,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = _clean(v)
            elif isinstance(v, tuple) and v and isinstance(v[0], float):
                d[k] = [_clean(x) for x in v]
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteHealth:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "histogram":
                kw[f.name] = tuple(d["histogram"]) if d.get("histogram") is not None else None
                continue
            v = d[f.name]
            if f.name in ("mean", "std", "min", "max"):
                v = _restore(v)
            elif f.name.startswith("channel_") and f.name not in ("channel_axis", "channel_nonfinite"):
                v = tuple(_restore(x) for x in v)
            elif isinstance(v, list):
                v = tuple(v)
            kw[f.name] = v
        return cls(**kw)


@dataclass(frozen=True)
class Summary:
    """Totals over every recorded site."""

    sites: int
    channels: int
    elements: int
    sparsity: float
    flat_fraction: float
    dead: int
    dormant: int
    nonfinite: int
    dead_sites: tuple[str, ...]

    @classmethod
    def of(cls, sites: Iterable[SiteHealth]) -> Summary:
        sites = list(sites)
        elements = sum(s.n * s.channels for s in sites)
        zero = sum(s.sparsity * s.n * s.channels for s in sites)
        flat = sum(s.flat_fraction * s.n * s.channels for s in sites)
        return cls(
            sites=len(sites),
            channels=sum(s.channels for s in sites),
            elements=elements,
            sparsity=zero / elements if elements else 0.0,
            flat_fraction=flat / elements if elements else 0.0,
            dead=sum(len(s.dead_channels) for s in sites),
            dormant=sum(len(s.dormant_channels) for s in sites),
            nonfinite=sum(s.nonfinite for s in sites),
            dead_sites=tuple(s.name for s in sites if s.dead_channels),
        )


@dataclass(frozen=True)
class Report:
    """What an audit measured. Build once; derive new values with `with_findings` / `with_meta`."""

    sites: Mapping[str, SiteHealth]
    summary: Summary
    slots: Any = None  # deadneuron.slots.SlotHealth for slot models
    metrics: Mapping[str, float] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()  # deadneuron.rules.Finding values, most severe first

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", MappingProxyType(dict(self.sites)))
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        object.__setattr__(self, "findings", _typed(self.findings))

    @classmethod
    def build(
        cls,
        sites: Iterable[SiteHealth],
        *,
        slots: Any = None,
        metrics: Mapping[str, float] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Report:
        sites = list(sites)
        return cls({s.name: s for s in sites}, Summary.of(sites), slots, metrics or {}, meta or {})

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.meta.get("warnings", ()))

    def with_findings(self, findings: Iterable[Finding | Mapping[str, Any]]) -> Report:
        """This report with ``findings`` (Finding values, or their ``to_dict()``, read back as Findings)."""
        return replace(self, findings=_typed(findings))

    def with_meta(self, **extra: Any) -> Report:
        return replace(self, meta={**self.meta, **extra})

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "summary": {**asdict(self.summary), "dead_sites": list(self.summary.dead_sites)},
            "sites": [s.to_dict() for s in self.sites.values()],
            "slots": self.slots.to_dict() if self.slots is not None else None,
            "metrics": {k: _clean(float(v)) for k, v in self.metrics.items()},
            "meta": _jsonable(dict(self.meta)),
            "findings": [_jsonable(f.to_dict()) for f in self.findings],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        if d.get("schema") != SCHEMA:
            raise ValueError("not a deadneuron report (missing schema tag)")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"report schema version {version} is not supported (this deadneuron reads {SCHEMA_VERSION})")
        sites = [SiteHealth.from_dict(s) for s in d["sites"]]
        slots = None
        if d.get("slots") is not None:
            from deadneuron.slots import SlotHealth

            slots = SlotHealth.from_dict(d["slots"])
        metrics = {k: _restore(v) for k, v in d.get("metrics", {}).items()}
        report = cls.build(sites, slots=slots, metrics=metrics, meta=d.get("meta", {}))
        return report.with_findings(d.get("findings", []))

    def to_json(self, *, indent: int | None = 1) -> str:
        """The report as JSON text (`deadneuron.save_report` writes it to a file)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Report:
        """The report from its JSON text (what `to_json` returns and `deadneuron.save_report` writes)."""
        if not text.lstrip().startswith(("{", "[")) and text.rstrip().endswith(".json"):
            raise ValueError(f"Report.from_json takes the report's JSON text, not a path: "
                             f"Report.from_json(Path({text.strip()!r}).read_text())")  # fmt: skip
        return cls.from_dict(json.loads(text))


def _typed(findings: Iterable[Finding | Mapping[str, Any]]) -> tuple[Finding, ...]:
    """Findings as typed values; the type lives in the rules core, imported here on use (the rules
    import this module)."""
    findings = tuple(findings)
    if not findings:
        return ()
    from deadneuron.rules.finding import Finding

    return tuple(Finding.from_dict(f) for f in findings)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _clean(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    return str(obj)
