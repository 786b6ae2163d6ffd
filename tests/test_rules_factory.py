"""Synthetic Report values for the rule tests: build SiteHealth / SlotHealth / Report directly.

Every channel of a synthetic site is consistent with its lists: a dead channel is flat on every element,
a dormant one on 99.5% of them, the others half of the time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deadneuron.report import Report, SiteHealth
from deadneuron.rules import Finding, RuleContext, RulesConfig, Severity, builtin_rules, evaluate
from deadneuron.slots import SlotHealth, SlotParams

_FLAT_REGION = {"relu": "z <= 0", "leaky_relu": "z <= 0", "gelu": "z <= -2.28", "prelu": "z <= 0",
                "tanh": "z <= -2.2 or z >= 2.2"}


def make_site(
    name: str = "encoder.bn_layers.0>relu",
    *,
    kind: str = "relu",
    channels: int = 8,
    dead: Sequence[int] = (),
    dormant: Sequence[int] = (),
    sparsity: float = 0.3,
    nonfinite: int = 0,
    producer: str | None = "auto",
    module: str | None = None,
    n: int = 10_000,
    axis_source: str = "producer",
) -> SiteHealth:
    if producer == "auto":
        producer = name.split(">")[0] if ">" in name else None
    flat = tuple(1.0 if c in dead else 0.995 if c in dormant else 0.5 for c in range(channels))
    per_channel_nonfinite = tuple(nonfinite if c == 0 else 0 for c in range(channels))
    return SiteHealth(
        name=name, module=module or (name.split(">")[1] if ">" in name else name), producer=producer,
        functional=False, kind=kind, label=kind, channel_axis=1, axis_source=axis_source, flat_region=_FLAT_REGION.get(kind, "z <= 0"),
        shape=(4, channels, 5, 5), calls=3, channels=channels, n=n, masked=False, excluded=0, sparsity=sparsity,
        flat_fraction=sum(flat) / channels, dead_channels=tuple(dead), dormant_channels=tuple(dormant),
        nonfinite=nonfinite, mean=0.4, std=0.6, min=0.0, max=3.0,
        channel_zero=tuple(sparsity for _ in range(channels)), channel_flat=flat,
        channel_nonfinite=per_channel_nonfinite, channel_mean=(0.4,) * channels, channel_std=(0.6,) * channels,
        channel_min=(0.0,) * channels, channel_max=(3.0,) * channels,
    )  # fmt: skip


def make_slots(
    *,
    num_slots: int = 7,
    images: int = 100,
    largest_share: float = 0.5,
    entropy: float = 0.4,
    unowned: int = 0,
    mean_active: float = 3.0,
) -> SlotHealth:
    histogram = [0] * (num_slots + 1)
    histogram[0] = unowned
    histogram[min(3, num_slots)] = images - unowned
    return SlotHealth(
        num_slots=num_slots, images=images, pixels=images * 100, mean_active=mean_active,
        active_histogram=histogram, mean_argmax_active=3.2, mean_mass_active=5.0,
        largest_slot_share=largest_share, mask_entropy=entropy, slot_usage=[0.5] * num_slots,
        never_used=[], duplicate_pairs=[], params=SlotParams(),
    )  # fmt: skip


def make_report(
    *sites: SiteHealth,
    slots: SlotHealth | None = None,
    metrics: Mapping[str, float] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Report:
    base_meta: dict[str, Any] = {"samples": 64, "batches": 4, "eps": 0.0, "delta": 0.05, "warnings": [],
                                 "source": "ck.pth"}  # the checkpoint suggested commands name  # fmt: skip
    return Report.build(sites, slots=slots, metrics=metrics, meta={**base_meta, **(meta or {})})


def only(findings: Sequence[Finding], rule: str) -> list[Finding]:
    return [f for f in findings if f.rule == rule]


def warnings_or_worse(findings: Sequence[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity >= Severity.WARNING]


RULES = builtin_rules()


def run(report: Report, context: RuleContext | None = None, **thresholds: Mapping[str, float]) -> list[Finding]:
    findings = evaluate(report, context, rules=RULES, config=RulesConfig(thresholds))
    for f in findings:
        assert f.evidence, f"{f.rule} fired without evidence"
        assert all(e.holds() for e in f.evidence), f"{f.rule}: evidence that does not hold: {f.evidence}"
    return findings


def fired(report: Report, rule: str, context: RuleContext | None = None, **thresholds: Any) -> list[Finding]:
    return only(run(report, context, **thresholds), rule)


def metric(f: Finding, name: str, site: str | None = None) -> Any:
    matches = [e for e in f.evidence if e.metric == name and (site is None or e.site == site)]
    assert matches, f"no {name} evidence in {f.evidence}"
    return matches[0]
